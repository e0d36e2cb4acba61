"""The textbook margin softmax, written the way insightface and most repositories do it.

normalise both inputs, ``F.linear`` to get the (B, C) cosines, upcast the logits
to float32, replace the target column by the margin's target logit, scale, and
call ``F.cross_entropy``. It materialises several (B, C) tensors: that is the
point, it is the baseline users switch away from.

The margin formulas here are written out again from API.md on purpose (they do
not call :mod:`marginkit.specs`), so that the benchmark's "agrees with
marginkit" check compares two independent implementations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["textbook_target_logit", "textbook_margin_loss"]

_EPS = 1e-7  # API.md: cos θ_y clamped to [-1 + 1e-7, 1 - 1e-7]


def textbook_target_logit(spec, cos: torch.Tensor) -> torch.Tensor:
    """Target logit ψ(cos θ_y) before scaling for the spec's family (per-row values)."""
    family = getattr(spec, "name", type(spec).__name__.lower())
    c = cos.clamp(-1.0 + _EPS, 1.0 - _EPS)
    if family == "none":
        psi = cos
    elif family == "cosface":
        psi = cos - spec.m
    elif family == "arcface":
        m = spec.m
        theta = torch.acos(c)
        arc = torch.cos(theta + m)
        if spec.easy_margin:
            psi = torch.where(cos > 0, arc, cos)
        else:
            psi = torch.where(theta + m <= math.pi, arc, cos - m * math.sin(m))
    elif family == "sphereface":
        m = spec.m
        theta = torch.acos(c)
        k = torch.floor(m * theta.detach() / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        psi = sign * torch.cos(m * theta) - 2.0 * k
        lam = spec.lambda_
        if lam > 0:
            psi = (lam * cos + psi) / (1.0 + lam)
    elif family == "combined":
        theta = torch.acos(c)
        psi = torch.cos(spec.m1 * theta + spec.m2) - spec.m3
    else:
        raise ValueError(f"textbook: unknown margin family {family!r}")
    if getattr(spec, "gradient", "exact") == "straight_through":
        psi = cos + (psi - cos).detach()
    return psi


def textbook_margin_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    spec,
    scale: float = 64.0,
) -> torch.Tensor:
    """Mean margin cross-entropy, the insightface way. Returns a float32 scalar."""
    cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1))  # (B, C), input dtype
    # insightface: logits.float() before the margin (float64 inputs, used in checks, stay float64)
    logits = cos if cos.dtype == torch.float64 else cos.float()
    index = labels.view(-1, 1)
    target = logits.gather(1, index).squeeze(1)
    psi = textbook_target_logit(spec, target)
    logits = logits.scatter(1, index, psi.unsqueeze(1))
    return F.cross_entropy(logits * scale, labels)
