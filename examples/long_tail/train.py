"""Training one head on the demo data, and the metrics that tell head from tail."""

from __future__ import annotations

import math
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .data import DemoData
from .heads import PAPER_METHODS, EmbeddingNet, TrainConfig, build_head

__all__ = ["train_one", "train_epochs", "evaluate", "tar_at_far", "thirds", "spearman", "margin_summary"]


@torch.no_grad()
def tar_at_far(emb: torch.Tensor, labels: torch.Tensor, far: float) -> float:
    """True accept rate at the threshold where a fraction ``far`` of impostor pairs is accepted.

    All pairs i < j; score = cosine similarity. The threshold is the ⌈far·N_imp⌉-th largest
    impostor score (accept: score > threshold).
    """
    e = F.normalize(emb.double(), dim=1)
    sim = e @ e.T
    iu = torch.triu_indices(len(labels), len(labels), offset=1)
    scores = sim[iu[0], iu[1]]
    same = labels[iu[0]] == labels[iu[1]]
    impostor, genuine = scores[~same], scores[same]
    k = max(1, math.ceil(far * impostor.numel()))
    threshold = torch.topk(impostor, k).values[-1]
    return float((genuine > threshold).double().mean())


def thirds(class_counts: torch.Tensor) -> torch.Tensor:
    """(C,) int64: 0 for the head third (most samples), 1 middle, 2 tail third (ties by class id)."""
    C = class_counts.numel()
    rank = torch.empty(C, dtype=torch.int64)
    rank[torch.argsort(class_counts, descending=True, stable=True)] = torch.arange(C)
    return (rank >= C // 3).to(torch.int64) + (rank >= C - C // 3).to(torch.int64)


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties sharing their average rank (float64)."""
    v = v.to(torch.float64)
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(1, v.numel() + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(v, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse, minlength=uniq.numel()).to(torch.float64)
    return (sums / counts)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation with average ranks for ties; NaN when either side is constant."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


@torch.no_grad()
def evaluate(model, logits_fn, data: DemoData) -> Dict[str, float]:
    """TAR@FAR on unseen identities; closed-set accuracy overall, per third, head − tail gap and
    the spread (std over classes) of per-class accuracy."""
    model.eval()
    open_emb = model(data.open_x)
    pred = logits_fn(model(data.closed_x)).argmax(dim=1)
    correct = (pred == data.closed_y).double()
    C = data.class_counts.numel()
    per_class = torch.zeros(C, dtype=torch.float64).index_add_(0, data.closed_y, correct)
    per_class /= torch.bincount(data.closed_y, minlength=C).clamp_min(1).to(torch.float64)
    third = thirds(data.class_counts)
    head, mid, tail = (float(per_class[third == t].mean()) for t in range(3))
    return {
        "tar@far=1e-3": tar_at_far(open_emb, data.open_y, 1e-3),
        "tar@far=1e-2": tar_at_far(open_emb, data.open_y, 1e-2),
        "tail_acc": tail,
        "mid_acc": mid,
        "head_acc": head,
        "all_acc": float(per_class.mean()),
        "gap": head - tail,
        "class_acc_std": float(per_class.std(unbiased=False)),
    }


def margin_summary(margins: torch.Tensor, class_counts: torch.Tensor) -> Dict[str, float]:
    """Mean final margin per third (head, mid, tail) and its Spearman correlation with class size."""
    m = margins.detach().cpu().to(torch.float64)
    third = thirds(class_counts)
    return {"margin_head": float(m[third == 0].mean()), "margin_mid": float(m[third == 1].mean()),
            "margin_tail": float(m[third == 2].mean()), "margin_size_spearman": spearman(class_counts, m)}


def train_epochs(model, head, data: DemoData, cfg: TrainConfig, epochs: int, opt, sched=None,
                 generator: Optional[torch.Generator] = None, bar=None) -> None:
    """``epochs`` passes of uniformly shuffled batches (the long tail stays long)."""
    n = data.train_y.numel()
    steps_per_epoch = max(1, n // cfg.batch_size)
    model.train()
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            loss = head(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def train_one(method: str, data: DemoData, cfg: TrainConfig, progress: bool = True, paper: Optional[dict] = None) -> dict:
    """Train ``method`` from the seed's shared initialisation and batch order; returns its metrics row."""
    torch.manual_seed(cfg.seed)  # the same network initialisation and batch order for every method
    C = data.class_counts.numel()
    steps_per_epoch = max(1, data.train_y.numel() // cfg.batch_size)
    steps = steps_per_epoch * cfg.epochs
    model = EmbeddingNet(data.train_x.shape[1], cfg.hidden, cfg.embedding_dim)
    head, logits_fn = build_head(method, C, cfg, data.class_counts, steps_per_epoch, paper)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # OneCycleLR divides by its phase lengths: at least 20 steps keep both non-zero (a --tiny run may
    # stop before the schedule ends; real runs have hundreds of steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 20), pct_start=0.1)
    bar = _progress(steps, method, progress)
    start = time.perf_counter()
    train_epochs(model, head, data, cfg, cfg.epochs, opt, sched, torch.Generator().manual_seed(cfg.seed + 1), bar)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start + (paper["seconds"] if paper and method in PAPER_METHODS else 0.0)
    head.eval()
    row = {"method": method, **evaluate(model, logits_fn, data), "train_s": seconds}
    margins = getattr(head, "class_margins", None)  # the heads whose margins differ per class
    if torch.is_tensor(margins):
        row.update(margin_summary(margins, data.class_counts))
    return row


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: plain runs without bars
        return None
    return tqdm(total=total, desc=f"{desc:>20}", leave=False, dynamic_ncols=True, mininterval=0.5)
