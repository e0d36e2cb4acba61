"""The embedding network and the loss heads the long-tail demo compares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import marginkit as mk

__all__ = ["TrainConfig", "EmbeddingNet", "ClassMarginCosFace", "frequency_margins", "build_head", "METHODS",
           "DEFAULT_METHODS", "STUDY_METHODS", "PAPER_METHODS"]

# The methods Fair Loss has to beat come first; the rest of the zoo is opt-in.
DEFAULT_METHODS = ("cosface", "cosface-0.45", "cosface-freq", "arcface", "fairloss", "fairloss-paper")
STUDY_METHODS = ("cosface-0.45", "cosface-freq", "fairloss", "fairloss-paper", "fairloss-paper-local")
PAPER_METHODS = ("fairloss-paper", "fairloss-paper-local")  # trained with a frozen table from the offline phase
EXTRA_METHODS = ("softmax", "ir-softmax", "range+softmax", "fairloss-paper-local", "ldam", "adacos", "curricularface",
                 "subcenter", "adaface")
METHODS = DEFAULT_METHODS + EXTRA_METHODS
FREQ_MARGIN_RANGE = (0.15, 0.45)  # the paper's margin range; the rarest class gets the top


@dataclass(frozen=True)
class TrainConfig:
    embedding_dim: int = 32
    hidden: int = 256
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    scale: float = 30.0
    range_lambda: float = 0.05
    fair_update_every: int = 20
    fair_pretrain_epochs: int = 10  # the paper's "pre-trained model" for the offline phase
    fair_finetune_epochs: int = 2  # length of each sample network's fine-tune (the paper does not say)
    seed: int = 0


class EmbeddingNet(nn.Module):
    """input -> [Linear, BN, ReLU] × 2 -> Linear -> BN: a small face-model-shaped MLP."""

    def __init__(self, in_dim: int, hidden: int, emb_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, emb_dim), nn.BatchNorm1d(emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class LinearSoftmax(nn.Module):
    """Plain softmax: an unnormalised linear classifier with bias and cross-entropy."""

    def __init__(self, num_classes: int, emb_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(emb_dim, num_classes)

    def forward(self, emb, labels):
        return F.cross_entropy(self.fc(emb), labels)

    def logits(self, emb):
        return self.fc(emb)


class SoftmaxPlusRange(nn.Module):
    """softmax + λ·RangeLoss on the normalised embeddings (the paper's joint supervision)."""

    def __init__(self, num_classes: int, emb_dim: int, lam: float) -> None:
        super().__init__()
        self.softmax = LinearSoftmax(num_classes, emb_dim)
        self.range_loss = mk.RangeLoss(k=2, margin=1.0)
        self.lam = lam

    def forward(self, emb, labels):
        return self.softmax(emb, labels) + self.lam * self.range_loss(F.normalize(emb, dim=1), labels)

    def logits(self, emb):
        return self.softmax.logits(emb)


class ClassMarginCosFace(nn.Module):
    """CosFace with fixed per-class margins (C,): ``margin_cross_entropy(..., class_margins=)``."""

    def __init__(self, num_classes: int, emb_dim: int, margins: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, emb_dim) * 0.01)
        self.register_buffer("class_margins", margins.detach().to(torch.float32).clone())
        self.scale = scale

    def forward(self, emb, labels):
        return mk.margin_cross_entropy(emb, self.weight, labels, mk.CosFace(0.0), self.scale,
                                       class_margins=self.class_margins)


def frequency_margins(class_counts: torch.Tensor, low: float = FREQ_MARGIN_RANGE[0], high: float = FREQ_MARGIN_RANGE[1]) -> torch.Tensor:
    """LDAM-style schedule: m_c ∝ n_c^(−1/4), mapped affinely onto [low, high] (rarest class ``high``,
    largest ``low``); all ``high`` when every class has the same size. (C,) float32."""
    if int(class_counts.min()) == int(class_counts.max()):  # not from v: pow's SIMD and scalar paths differ by an ulp
        return torch.full(class_counts.shape, high, dtype=torch.float32)
    v = class_counts.to(torch.float64).pow(-0.25)
    return (low + (high - low) * (v - v.min()) / (v.max() - v.min())).to(torch.float32)


def cosine_logits(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda emb: F.normalize(emb, dim=1) @ F.normalize(weight.detach().float(), dim=1).T


def build_head(method: str, num_classes: int, cfg: TrainConfig, class_counts: torch.Tensor, steps_per_epoch: int,
               paper: Optional[dict] = None):
    """(loss module, closed-set logits function). ``paper``: the offline phase's output
    (``fair_paper.offline_phase``), needed by the fairloss-paper methods."""
    C, E, s = num_classes, cfg.embedding_dim, cfg.scale
    if method == "softmax":
        head = LinearSoftmax(C, E)
        return head, head.logits
    if method == "range+softmax":
        head = SoftmaxPlusRange(C, E, cfg.range_lambda)
        return head, head.logits
    if method == "cosface":
        head = mk.MarginSoftmax(C, E, mk.CosFace(0.35), s)
    elif method == "cosface-0.45":
        head = mk.MarginSoftmax(C, E, mk.CosFace(0.45), s)
    elif method == "cosface-freq":
        head = ClassMarginCosFace(C, E, frequency_margins(class_counts), s)
    elif method == "arcface":
        head = mk.MarginSoftmax(C, E, mk.ArcFace(0.5), s)
    elif method == "ir-softmax":
        head = mk.IRSoftmax(C, E, mk.CosFace(0.35), s, momentum=0.9)
        return head, cosine_logits(head.centers)
    elif method == "fairloss":
        head = mk.FairLoss(C, E, s, update_every=cfg.fair_update_every, seed=cfg.seed)
    elif method in PAPER_METHODS:
        if paper is None:
            raise ValueError(f"{method} needs the offline phase's policy (fair_paper.offline_phase)")
        reward = "local" if method.endswith("-local") else "global"
        head = mk.FairLoss(C, E, s, update_every=steps_per_epoch, policy=paper["tables"][reward],
                           class_count_bins=paper["count_bins"], spread_thresholds=paper["spread_thresholds"])
    elif method == "ldam":
        head = mk.LDAMSoftmax(C, E, class_counts=class_counts, max_margin=0.5, scale=s)
    elif method == "adacos":
        head = mk.AdaCos(C, E)
    elif method == "curricularface":
        head = mk.CurricularFace(C, E, mk.ArcFace(0.5), s)
    elif method == "subcenter":
        head = mk.SubCenterArcFace(C, E, k=3, margin=mk.ArcFace(0.5), scale=s)
        return head, lambda emb: cosine_logits(head.weight)(emb).view(emb.shape[0], C, 3).max(dim=2).values
    elif method == "adaface":
        head = mk.AdaFace(C, E, scale=s)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return head, cosine_logits(head.weight)
