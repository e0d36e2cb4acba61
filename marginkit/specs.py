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
    "AdaFaceMargin",
    "AngleForm",
    "insightface_margin",
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
class AngleForm:
    """A spec written as ψ = cos(θ_y + m2) − m3 = c·cos m2 − sin θ_y·sin m2 − m3 (c = cos θ_y): what
    the Triton backend's fused per-row kernel computes, without arccos (``triton_kernels/target_column.py``).

    ``angle``: m2 applies, on c clamped by ``COS_CLAMP``; else ψ = cos θ_y − m3 unclamped, dψ = 1.
    ``fallback``: 0 none; 1 ArcFace's cos θ_y − m2·sin m2 (dψ = 1) where θ_y + m2 > π; 2 its easy
    margin (ψ = cos θ_y where cos θ_y <= 0); both take cos θ_y unclamped. ``row_margin_slot``: 2 or 3, the term per-row margins replace (0: none).
    """

    m2: float = 0.0
    m3: float = 0.0
    angle: bool = False
    fallback: int = 0
    row_margin_slot: int = 0
    straight_through: bool = False


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

    def _check_field(self, name: str, **bounds) -> float:
        """``check_real`` of the field ``name``, its errors naming the spec ("ArcFace m must be ...")."""
        return check_real(f"{type(self).__name__} {name}", getattr(self, name), **bounds)

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

    #: exclusive upper bound of per-class/per-row margins (None: any m >= 0); a class attribute, not a field
    margin_limit = None

    def check_margin_values(self, name: str, margins: torch.Tensor) -> None:
        """Raise ``ValueError`` if per-class/per-row margins are outside what the spec allows
        (finiteness and sign are checked by the caller). Reads values: eager mode only."""

    def angle_form(self) -> Optional[AngleForm]:
        """The spec as ψ = cos(θ_y + m2) − m3 when it is one (a fused kernel then computes it), else None.

        Only a class that defines ``_angle_form`` itself has one: a subclass of ArcFace that changes
        the formula is computed by its own ``target_terms``, never by its parent's fused form.
        tests/backends/test_target_column.py checks each form against ``target_terms``."""
        own = type(self).__dict__.get("_angle_form")
        return own(self) if own is not None else None


@dataclass(frozen=True)
class NoMargin(MarginSpec):
    """Plain normalised softmax: ψ = cos θ_y."""

    name = "none"

    def psi(self, cos, m=None):
        return cos.clone()

    def _angle_form(self):
        return AngleForm()

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
        self._check_field("m", low=0.0)

    def default_margin(self):
        return float(self.m)

    def psi(self, cos, m=None):
        return cos - self._m(m)

    def _angle_form(self):
        return AngleForm(m3=float(self.m), row_margin_slot=3, straight_through=self.gradient == "straight_through")

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
        # m ≥ π would turn the margin into a bonus (cos(θ + m) rises again past π).
        self._check_field("m", low=0.0, high=math.pi, high_inclusive=False)
        if not isinstance(self.easy_margin, bool):
            raise TypeError(f"easy_margin must be a bool, got {self.easy_margin!r}")

    def default_margin(self):
        return float(self.m)

    margin_limit = math.pi

    def check_margin_values(self, name, margins):
        if margins.numel() and bool((margins >= math.pi).any()):
            raise ValueError(
                f"{name} contains {float(margins.max())}; ArcFace margins must lie in [0, π) (an angle past π "
                "turns the margin into a bonus)"
            )

    def _angle_form(self):
        return AngleForm(m2=float(self.m), angle=True, fallback=2 if self.easy_margin else 1, row_margin_slot=2,
                         straight_through=self.gradient == "straight_through")

    def psi(self, cos, m=None):
        m = self._m(m)
        c = _clamped(cos)
        theta = torch.acos(c)
        arc = torch.cos(theta + m)
        if self.easy_margin:  # the fallbacks take cos θ_y itself: API.md clamps only for arccos
            return torch.where(cos > 0, arc, cos)
        fallback = cos - m * (torch.sin(m) if isinstance(m, torch.Tensor) else math.sin(m))
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

    def target_terms(self, cos, m=None):
        """(ψ, dψ/dcos) in one pass sharing θ (half the small ops of ``psi`` + ``dpsi_exact``: this
        runs every step on the host's critical path); the same formulas, in float64."""
        if not isinstance(m, (torch.Tensor, type(None))):
            return super().target_terms(cos, m)
        cos64 = cos.detach().to(torch.float64)
        c = cos64.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP)
        m = self._m(None if m is None else m.detach().to(device=c.device, dtype=torch.float64))
        theta_m = torch.acos(c) + m
        if self.easy_margin:
            use_arc = c > 0
            psi = torch.where(use_arc, torch.cos(theta_m), cos64)
        else:
            use_arc = theta_m <= math.pi
            sin_m = torch.sin(m) if isinstance(m, torch.Tensor) else math.sin(m)
            psi = torch.where(use_arc, torch.cos(theta_m), cos64 - m * sin_m)
        if self.gradient == "straight_through":
            return psi, torch.ones_like(c)
        dpsi = torch.where(use_arc, torch.sin(theta_m) / torch.sqrt(1.0 - c * c), 1.0)
        return psi, dpsi

    def dpsi_dm(self, cos: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """∂ψ/∂m per row: −sin(θ + m), −(sin m + m·cos m) on the fallback (0 past easy_margin's cut);
        MagFace back-propagates through its norm-dependent margin with it."""
        c = cos.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP)
        theta = torch.acos(c)
        arc = -torch.sin(theta + m)
        if self.easy_margin:
            return torch.where(cos > 0, arc, torch.zeros_like(arc))
        return torch.where(theta + m <= math.pi, arc, -(torch.sin(m) + m * torch.cos(m)))


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
        self._check_field("m", low=1.0)
        self._check_field("lambda_", low=0.0)

    def _k_sign(self, theta):
        k = torch.floor(self.m * theta / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        return k, sign

    def psi(self, cos, m=None):
        c = _clamped(cos)
        theta = torch.acos(c)
        k, sign = self._k_sign(theta.detach())
        psi = sign * torch.cos(self.m * theta) - 2.0 * k
        return (self.lambda_ * cos + psi) / (1.0 + self.lambda_)

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
        self._check_field("m1", low=1.0)
        self._check_field("m2", low=0.0)
        self._check_field("m3", low=0.0)

    def default_margin(self):
        return float(self.m2)

    def _angle_form(self):
        if self.m1 != 1.0:  # cos(m1·θ + m2) needs θ itself
            return None
        return AngleForm(m2=float(self.m2), m3=float(self.m3), angle=True, row_margin_slot=2,
                         straight_through=self.gradient == "straight_through")

    def psi(self, cos, m=None):
        m2 = self._m(m)
        theta = torch.acos(_clamped(cos))
        return torch.cos(self.m1 * theta + m2) - self.m3

    def dpsi_exact(self, cos, m=None):
        m2 = self._m(m)
        c = cos.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP)
        theta = torch.acos(c)
        return self.m1 * torch.sin(self.m1 * theta + m2) / _sin_theta(c)


@dataclass(frozen=True)
class AdaFaceMargin(MarginSpec):
    """AdaFace's target logit as a margin spec; the per-row "margin" is u = ẑ + 1 ∈ [0, 2].

    With ẑ the row's norm quality in [−1, 1] (``AdaFace`` computes it):

        g_angle = −m·ẑ,  g_add = m·ẑ + m,
        ψ = cos(clip(θ_y + g_angle, ε, π − ε)) − g_add,   θ_y = arccos(clamp(cos θ_y, −1 + ε, 1 − ε))

    exactly as the authors' code (ε = 1e-3; the derivative is 0 where a clip or clamp is
    active). ẑ is passed shifted to u = ẑ + 1 so that it fits the fused path's
    non-negative ``sample_margins``: ψ is then cos(clip(θ − m(u − 1))) − m·u. Without
    per-row values u = 1 (ẑ = 0): ψ = cos θ − m, CosFace.
    """

    m: float = 0.4
    eps: float = 1e-3
    name = "adaface"
    has_single_margin = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_field("m", low=0.0)
        self._check_field("eps", low=0.0, high=0.5)

    def default_margin(self):
        return 1.0

    def _angles(self, cos, u):
        u = self._m(u)
        c = cos.clamp(-1.0 + self.eps, 1.0 - self.eps)
        theta = torch.acos(c)
        pre = theta - self.m * (u - 1.0)
        return u, c, theta, pre

    def psi(self, cos, m=None):
        u, _, _, pre = self._angles(cos, m)
        return torch.cos(pre.clamp(self.eps, math.pi - self.eps)) - self.m * u

    def dpsi_exact(self, cos, m=None):
        _, c, _, pre = self._angles(cos, m)
        theta_m = pre.clamp(self.eps, math.pi - self.eps)
        d = torch.sin(theta_m) / torch.sqrt(1.0 - c * c)
        active = (cos >= -1.0 + self.eps) & (cos <= 1.0 - self.eps) & (pre >= self.eps) & (pre <= math.pi - self.eps)
        return torch.where(active, d, torch.zeros_like(d))


def insightface_margin(margins) -> MarginSpec:
    """The spec that computes what insightface arcface_torch's ``CombinedMarginLoss(s, m1, m2, m3)``
    computes today, gradient included.

    ``margins`` is the ``(m1, m2, m3)`` triple of its configs (``config.margin_list``). Its quirks,
    reproduced on purpose:

    - (1, m2, 0) (ArcFace): the target is cos(θ_y + m2) with NO fallback past π (rows with
      θ_y + m2 > π get a target logit that rises again), and the margin is applied under
      ``torch.no_grad``, so the gradient is straight-through (dψ/dcos = 1);
    - m3 > 0 (CosFace): the target is cos θ_y − m3 and m1, m2 are ignored;
    - any other triple, which its code rejects: ``CombinedMargin(m1, m2, m3)``.

    ``mk.ArcFace(0.5)`` differs from insightface in gradient and past π; use this to port a
    training script without changing what it trains.
    """
    try:
        m1, m2, m3 = (float(v) for v in margins)
    except (TypeError, ValueError):
        raise ValueError(f"margins must be a (m1, m2, m3) triple of numbers, got {margins!r}") from None
    if m3 > 0.0:
        return CosFace(m3)
    if m1 == 1.0 and m3 == 0.0:
        return CombinedMargin(1.0, m2, 0.0, gradient="straight_through")
    return CombinedMargin(m1, m2, m3)
