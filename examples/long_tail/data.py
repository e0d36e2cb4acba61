"""A long-tailed synthetic identity dataset for the long-tail demo, generated in code.

Identities are points μ_c on the unit sphere of a small latent space. A sample of
identity c is an angular perturbation of μ_c, concatenated with nuisance factors
(think pose, lighting) that carry no identity, and pushed through a fixed, frozen,
randomly initialised non-linear map (a 2-layer tanh MLP) into the observed input
space, plus a little sensor noise. A network has to undo the map and discard the
nuisance factors to recover identity: there is something to learn, and the
geometry (clusters on a sphere) is the one margin losses assume.

Class sizes follow a Zipf law (n_r ∝ r^(−α) for the r-th largest class, at least
``min_per_class``): a few head identities with many samples, a long tail with 2–5.
Splits:

* ``train``: the long-tailed training set (identities 0..C−1);
* ``val``: ``val_per_class`` further samples of every training identity, for decisions
  taken during training (the Fair Loss offline phase's global reward), never for results;
* ``closed``: ``test_per_class`` further samples of every training identity, for
  closed-set accuracy (per class count: head, middle and tail thirds);
* ``open``: ``open_classes`` identities never seen in training, ``open_per_class``
  samples each, for open-set verification (TAR at a fixed FAR over all pairs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

__all__ = ["DataConfig", "DemoData", "make_dataset", "zipf_counts"]


@dataclass(frozen=True)
class DataConfig:
    num_classes: int = 300
    max_per_class: int = 300
    min_per_class: int = 2
    zipf_exponent: float = 0.75
    test_per_class: int = 4
    val_per_class: int = 2
    open_classes: int = 150
    open_per_class: int = 6
    latent_dim: int = 12
    nuisance_dim: int = 6
    input_dim: int = 48
    hidden_dim: int = 96
    spread: float = 0.3
    nuisance_scale: float = 0.5
    input_noise: float = 0.05
    seed: int = 0


@dataclass
class DemoData:
    config: DataConfig
    train_x: torch.Tensor
    train_y: torch.Tensor
    closed_x: torch.Tensor
    closed_y: torch.Tensor
    open_x: torch.Tensor
    open_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    class_counts: torch.Tensor  # training samples per class (C,)

    def summary(self) -> dict:
        c = self.class_counts
        return {
            "train_samples": int(c.sum()),
            "classes": int(c.numel()),
            "largest_class": int(c.max()),
            "classes_with_<=5": int((c <= 5).sum()),
            "open_identities": int(self.open_y.unique().numel()),
            "open_samples": int(self.open_y.numel()),
            **{k: v for k, v in asdict(self.config).items() if k in ("zipf_exponent", "spread", "seed")},
        }


def zipf_counts(num_classes: int, max_per_class: int, exponent: float, min_per_class: int) -> torch.Tensor:
    """n_r = max(min_per_class, round(max_per_class · r^(−exponent))), r = 1..C (largest first)."""
    r = torch.arange(1, num_classes + 1, dtype=torch.float64)
    return torch.clamp(torch.round(max_per_class * r.pow(-exponent)), min=min_per_class).to(torch.int64)


class _FrozenMap:
    """x = tanh(tanh(u·A + a)·B + b)·G: a random non-linear map, fixed by the seed."""

    def __init__(self, cfg: DataConfig, g: torch.Generator) -> None:
        d_in = cfg.latent_dim + cfg.nuisance_dim
        self.A = torch.randn(d_in, cfg.hidden_dim, generator=g) * (1.5 / math.sqrt(d_in))
        self.a = torch.randn(cfg.hidden_dim, generator=g) * 0.3
        self.B = torch.randn(cfg.hidden_dim, cfg.input_dim, generator=g) * (1.5 / math.sqrt(cfg.hidden_dim))
        self.b = torch.randn(cfg.input_dim, generator=g) * 0.3
        self.G = torch.randn(cfg.input_dim, cfg.input_dim, generator=g) / math.sqrt(cfg.input_dim)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.tanh(u @ self.A + self.a) @ self.B + self.b) @ self.G


def _samples(mu: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, fmap: _FrozenMap, g: torch.Generator) -> torch.Tensor:
    n, d = labels.numel(), cfg.latent_dim
    z = mu[labels] + cfg.spread * torch.randn(n, d, generator=g) / math.sqrt(d)
    z = z / z.norm(dim=1, keepdim=True)
    nuisance = cfg.nuisance_scale * torch.randn(n, cfg.nuisance_dim, generator=g)
    x = fmap(torch.cat([z, nuisance], dim=1))
    return (x + cfg.input_noise * torch.randn(x.shape, generator=g)).to(torch.float32)


def _sphere(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    v = torch.randn(n, d, generator=g)
    return v / v.norm(dim=1, keepdim=True)


def make_dataset(cfg: DataConfig = DataConfig()) -> DemoData:
    """Build the splits deterministically from ``cfg.seed``."""
    g = torch.Generator().manual_seed(cfg.seed)
    fmap = _FrozenMap(cfg, g)
    mu = _sphere(cfg.num_classes, cfg.latent_dim, g)
    counts = zipf_counts(cfg.num_classes, cfg.max_per_class, cfg.zipf_exponent, cfg.min_per_class)
    train_y = torch.repeat_interleave(torch.arange(cfg.num_classes), counts)
    train_x = _samples(mu, train_y, cfg, fmap, g)
    closed_y = torch.arange(cfg.num_classes).repeat_interleave(cfg.test_per_class)
    closed_x = _samples(mu, closed_y, cfg, fmap, g)
    mu_open = _sphere(cfg.open_classes, cfg.latent_dim, g)
    open_y = torch.arange(cfg.open_classes).repeat_interleave(cfg.open_per_class)
    open_x = _samples(mu_open, open_y, cfg, fmap, g)
    # Drawn last, so the other splits are those of a config without a validation split.
    val_y = torch.arange(cfg.num_classes).repeat_interleave(cfg.val_per_class)
    val_x = _samples(mu, val_y, cfg, fmap, g)
    # Standardise inputs with the training statistics (as one would real data).
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    norm = lambda t: (t - mean) / std  # noqa: E731
    return DemoData(cfg, norm(train_x), train_y, norm(closed_x), closed_y, norm(open_x), open_y, norm(val_x), val_y,
                    counts)
