"""Margin specs: the target logit ψ(cos θ_y) of each margin family and its derivative.

This module is the single home of the margin math. Every backend (torch,
Triton, reference, distributed) turns per-row target cosines into the target
logit and dψ/dcos through :meth:`MarginSpec.target_terms`, so a formula is
written once. Everything here works on tensors of per-row values (shape (B,)),
never on (B, C) logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from marginkit.errors import check_gradient_mode, check_real

__all__ = [
    "COS_CLAMP",
    "MarginSpec",
    "NoMargin",
    "CosFace",
    "ArcFace",
    "SphereFace",
    "CombinedMargin",
]

# API.md: cos θ_y is clamped to [-1 + 1e-7, 1 - 1e-7] before any arccos or derivative.
COS_CLAMP = 1e-7

MarginValue = Union[float, torch.Tensor]


def _clamped(cos: torch.Tensor) -> torch.Tensor:
    """cos clamped into the arccos-safe range; the gradient passes through the clamp
    so that autograd evaluates the derivative at the clamped point (the same point
    the analytic derivative uses)."""
    return cos + (cos.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP) - cos).detach()


def _sin_theta(c: torch.Tensor) -> torch.Tensor:
    # c is already clamped, so sin θ ≥ ~4.5e-4 and never divides by zero.
    return torch.sqrt(1.0 - c * c)


@dataclass(frozen=True)
class MarginSpec:
    """Base of all margin specs. Subclasses define ``psi`` and ``dpsi_exact``.

    ``gradient="exact"`` differentiates ψ; ``gradient="straight_through"`` takes
    dψ/dcos θ_y = 1 (insightface's arcface_torch convention).
    """

    gradient: str = field(default="exact", kw_only=True)

    #: the CSV / benchmark name of the margin family
    name = "base"
    #: whether the spec has one margin ``m`` that class/sample margins may replace
    has_single_margin = False

    def __post_init__(self) -> None:
        check_gradient_mode(self.gradient)

    # -- to be provided by subclasses -------------------------------------------------
    def psi(self, cos: torch.Tensor, m: Optional[MarginValue] = None) -> torch.Tensor:
        """Target logit before scaling, (B,) -> (B,). Differentiable with autograd."""
        raise NotImplementedError

    def dpsi_exact(self, cos: torch.Tensor, m: Optional[MarginValue] = None) -> torch.Tensor:
        """Analytic dψ/dcos θ_y at the clamped cosine, (B,) -> (B,)."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------
    def default_margin(self) -> Optional[float]:
        """The spec's own ``m`` (the value class/sample margins replace), or None."""
        return None

    def target_terms(
        self, cos: torch.Tensor, m: Optional[MarginValue] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ψ, dψ/dcos) for per-row target cosines ``cos`` (B,).

        ``m`` is None (use the spec's margin) or a per-row (B,) tensor of margins.
        Computed in float64 whatever the input dtype: it is O(B) work and keeps the
        margin math exact to the last bit the backends can use.
        """
        cos64 = cos.detach().to(torch.float64)
        m64 = m.detach().to(device=cos.device, dtype=torch.float64) if isinstance(m, torch.Tensor) else m
        psi = self.psi(cos64, m64)
        if self.gradient == "straight_through":
            dpsi = torch.ones_like(cos64)
        else:
            dpsi = self.dpsi_exact(cos64, m64)
        return psi, dpsi

    def differentiable_target(self, cos: torch.Tensor, m: Optional[MarginValue] = None) -> torch.Tensor:
        """ψ with autograd following the spec's gradient mode (used by the reference)."""
        psi = self.psi(cos, m)
        if self.gradient == "straight_through":
            return cos + (psi - cos).detach()
        return psi

    def _m(self, m: Optional[MarginValue]) -> MarginValue:
        return self.default_margin() if m is None else m


@dataclass(frozen=True)
class NoMargin(MarginSpec):
    """Plain normalised softmax: ψ = cos θ_y."""

    name = "none"

    def psi(self, cos, m=None):
        return cos.clone()

    def dpsi_exact(self, cos, m=None):
        return torch.ones_like(cos)


@dataclass(frozen=True)
class CosFace(MarginSpec):
    """CosFace / AM-Softmax: ψ = cos θ_y − m."""

    m: float = 0.35
    name = "cosface"
    has_single_margin = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("m", self.m, low=0.0)

    def default_margin(self):
        return float(self.m)

    def psi(self, cos, m=None):
        return cos - self._m(m)

    def dpsi_exact(self, cos, m=None):
        return torch.ones_like(cos)


@dataclass(frozen=True)
class ArcFace(MarginSpec):
    """ArcFace: ψ = cos(θ_y + m) where θ_y + m ≤ π, else cos θ_y − m·sin m.

    With ``easy_margin=True``: cos(θ_y + m) where cos θ_y > 0, else cos θ_y.
    """

    m: float = 0.5
    easy_margin: bool = False
    name = "arcface"
    has_single_margin = True

    def __post_init__(self) -> None:
        super().__post_init__()
        # m ≥ π is allowed: θ + m > π everywhere then, and the fallback applies to every row.
        check_real("m", self.m, low=0.0)
        if not isinstance(self.easy_margin, bool):
            raise TypeError(f"easy_margin must be a bool, got {self.easy_margin!r}")

    def default_margin(self):
        return float(self.m)

    def psi(self, cos, m=None):
        m = self._m(m)
        c = _clamped(cos)
        theta = torch.acos(c)
        arc = torch.cos(theta + m)
        if self.easy_margin:
            return torch.where(cos > 0, arc, c)
        fallback = c - m * (torch.sin(m) if isinstance(m, torch.Tensor) else math.sin(m))
        return torch.where(theta + m <= math.pi, arc, fallback)

    def dpsi_exact(self, cos, m=None):
        m = self._m(m)
        c = cos.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP)
        theta = torch.acos(c)
        arc = torch.sin(theta + m) / _sin_theta(c)
        one = torch.ones_like(c)
        if self.easy_margin:
            return torch.where(cos > 0, arc, one)
        return torch.where(theta + m <= math.pi, arc, one)


@dataclass(frozen=True)
class SphereFace(MarginSpec):
    """SphereFace / A-Softmax: ψ = (−1)^k·cos(m·θ_y) − 2k, k = floor(m·θ_y/π), real m ≥ 1.

    With ``lambda_ > 0`` the target is (λ·cos θ_y + ψ)/(1 + λ) (A-Softmax annealing).
    """

    m: float = 4.0
    lambda_: float = 0.0
    name = "sphereface"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("m", self.m, low=1.0)
        check_real("lambda_", self.lambda_, low=0.0)

    def _k_sign(self, theta):
        k = torch.floor(self.m * theta / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        return k, sign

    def psi(self, cos, m=None):
        c = _clamped(cos)
        theta = torch.acos(c)
        k, sign = self._k_sign(theta.detach())
        psi = sign * torch.cos(self.m * theta) - 2.0 * k
        return (self.lambda_ * c + psi) / (1.0 + self.lambda_)

    def dpsi_exact(self, cos, m=None):
        c = cos.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP)
        theta = torch.acos(c)
        _, sign = self._k_sign(theta)
        dpsi = sign * self.m * torch.sin(self.m * theta) / _sin_theta(c)
        return (self.lambda_ + dpsi) / (1.0 + self.lambda_)


@dataclass(frozen=True)
class CombinedMargin(MarginSpec):
    """insightface's combined margin: ψ = cos(m1·θ_y + m2) − m3, no fallback.

    Class/sample margins replace ``m2``.
    """

    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    name = "combined"
    has_single_margin = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("m1", self.m1, low=1.0)
        check_real("m2", self.m2, low=0.0)
        check_real("m3", self.m3, low=0.0)

    def default_margin(self):
        return float(self.m2)

    def psi(self, cos, m=None):
        m2 = self._m(m)
        theta = torch.acos(_clamped(cos))
        return torch.cos(self.m1 * theta + m2) - self.m3

    def dpsi_exact(self, cos, m=None):
        m2 = self._m(m)
        c = cos.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP)
        theta = torch.acos(c)
        return self.m1 * torch.sin(self.m1 * theta + m2) / _sin_theta(c)
