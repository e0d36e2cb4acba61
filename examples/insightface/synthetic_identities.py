"""Synthetic identities and a small backbone: the stand-ins for insightface's dataset and ResNet.

Every batch is a pure function of (seed, step, rank): a resumed run sees exactly the batches the
uninterrupted run saw, with no data-loader or RNG state to checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


class SyntheticIdentities:
    """``num_classes`` identities, each a random center in ``input_dim`` dimensions; a sample is
    its identity's center plus Gaussian noise (``noise`` times a unit-variance draw per feature),
    so the classes are separable and a working loss must fall.

    ``batch(step, rank, batch_size)`` -> (inputs (b, input_dim) float32, labels (b,) int64 global
    ids), drawn from a generator seeded by (seed, step, rank).
    """

    def __init__(self, num_classes: int, input_dim: int, seed: int = 0, noise: float = 0.5) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.centers = torch.randn(num_classes, input_dim, generator=generator)
        self.num_classes = num_classes
        self.seed = seed
        self.noise = noise

    def batch(self, step: int, rank: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        # one stream per (seed, step, rank): distinct across ranks and steps, reproducible on resume
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + rank)
        labels = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        noise = torch.randn(batch_size, self.centers.shape[1], generator=generator)
        return self.centers[labels] + self.noise * noise, labels


def make_backbone(input_dim: int, hidden_dim: int, embedding_size: int) -> nn.Sequential:
    """(b, input_dim) -> (b, embedding_size) embeddings; ends in BatchNorm1d like insightface's
    backbones (its ``features`` layer)."""
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim),
        nn.PReLU(hidden_dim),
        nn.Linear(hidden_dim, embedding_size, bias=False),
        nn.BatchNorm1d(embedding_size),
    )
