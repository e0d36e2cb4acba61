"""Adaptive margin softmax heads: AdaCos, LDAM-style count margins, MagFace, AdaFace,
plus CurricularFace and sub-center ArcFace (re-exported from their own files).

AdaCos, LDAMSoftmax, MagFace and AdaFace run on the fused path
(``mk.margin_cross_entropy``: Triton on CUDA, the chunked torch backend elsewhere;
no (B, C) logits): their adaptivity lives in the scale, in ``class_margins`` or in
``sample_margins``, all O(B) or O(C) work beside the kernels. CurricularFace and
sub-center ArcFace change the non-target logits, which the margin-agnostic kernels
cannot, so they run a chunked PyTorch loop with a bounded (B, chunk) working set
(see ``curricular_face.py`` and ``sub_center.py``).

Every head: ``forward(embeddings (B, D), labels (B,) int64) -> loss`` (float32
scalar, or (B,) with ``reduction="none"``), ``.weight`` a (C, D) parameter
initialised normal(0, 0.01), state in buffers (it survives ``state_dict``), and
state moves only in training mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from marginkit.backends import torch_chunked
from marginkit.backends.common import owned_labels, target_cosine
from marginkit.errors import check_positive_ints, check_real
from marginkit.functional import margin_cross_entropy, reduce_losses
from marginkit.nn._chunked import KeepBufferDtypes
from marginkit.nn.curricular_face import CurricularFace, curricular_cross_entropy
from marginkit.nn.sub_center import SubCenterArcFace, sub_center_cross_entropy
from marginkit.specs import COS_CLAMP, ArcFace, CosFace, MarginSpec, NoMargin

__all__ = [
    "AdaCos",
    "AdaFace",
    "AdaFaceMargin",
    "CurricularFace",
    "LDAMSoftmax",
    "MagFace",
    "SubCenterArcFace",
    "curricular_cross_entropy",
    "ldam_margins",
    "sub_center_cross_entropy",
]


class _Head(KeepBufferDtypes):
    """A (C, D) weight plus the loss keywords every head shares; state buffers keep their dtype."""

    _keep_dtype_buffers = ("scale", "class_margins", "batch_mean", "batch_std")

    def __init__(self, num_classes, embedding_dim, scale, reduction, ignore_index, normalize, backend, dtype, device):
        super().__init__()
        check_positive_ints(num_classes=num_classes, embedding_dim=embedding_dim)
        if scale is not None:
            check_real("scale", scale, low=0.0, low_inclusive=False)
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.reduction, self.ignore_index = reduction, ignore_index
        self.normalize, self.backend = normalize, backend
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, dtype=dtype, device=device))
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def _loss(self, embeddings, labels, margin, scale, reduction=None, **kwargs):
        return margin_cross_entropy(
            embeddings, self.weight, labels, margin, scale, reduction=reduction or self.reduction,
            ignore_index=self.ignore_index, normalize=self.normalize, backend=self.backend, **kwargs,
        )


# ----------------------------------------------------------------------------------------- AdaCos
class AdaCos(_Head):
    """AdaCos (Zhang et al., CVPR 2019): no margin, a scale set from the batch.

    Fixed start s₀ = √2·log(C − 1). In training mode each forward first updates

        s ← log(B_avg) / cos(min(π/4, θ_med))

    with the previous s inside B_avg = (1/N) Σ_i Σ_{k≠y_i} exp(s·cos θ_{i,k}) (N: the
    batch's non-ignored rows) and θ_med the median of the batch's target angles
    θ_{i,y_i} (``torch.median``: the lower median for an even count), then computes the
    loss ``margin_cross_entropy(x, W, y, NoMargin(), s)`` with the new s, as the paper's
    algorithm (and its common implementations) do. s is a constant for autograd.

    B_avg is exact, not approximated: it is the non-target log-sum-exp the torch
    backend's ``lse_partials`` already computes chunk by chunk (no (B, C) tensor),
    combined over rows in log space. The price is one extra no-grad pass over the
    classes per training step (on CUDA it runs the torch backend's cuBLAS chunks).
    A degenerate batch (no rows, or a non-finite or non-positive new s, which needs
    B_avg < 1) leaves s unchanged.

    ``.scale`` is a 0-d float64 buffer. Needs C ≥ 2.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        normalize: bool = True,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        super().__init__(num_classes, embedding_dim, None, reduction, ignore_index, normalize, backend, dtype, device)
        if num_classes < 2:
            raise ValueError(f"AdaCos needs num_classes >= 2 (its start scale is sqrt(2)*log(C-1)), got {num_classes}")
        self.register_buffer("scale", torch.tensor(self.initial_scale(num_classes), dtype=torch.float64, device=device))

    @staticmethod
    def initial_scale(num_classes: int) -> float:
        return math.sqrt(2.0) * math.log(num_classes - 1)

    @torch.no_grad()
    def dynamic_scale(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Optional[float]:
        """The scale the next training step would set (None when the batch says nothing)."""
        keep = labels != self.ignore_index
        if not bool(keep.any()):
            return None
        labels_local = owned_labels(labels, self.ignore_index)
        s_prev = float(self.scale)
        row_max, row_sumexp = torch_chunked.lse_partials(
            embeddings.detach(), self.weight.detach(), labels_local, s_prev, self.normalize
        )
        log_b = row_max.to(torch.float64) + torch.log(row_sumexp.to(torch.float64))
        log_b_avg = torch.logsumexp(log_b[keep], dim=0) - math.log(int(keep.sum()))
        cos = target_cosine(embeddings, self.weight, labels_local, self.normalize)[keep]
        theta_med = torch.median(torch.acos(cos.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP)))
        s_new = float(log_b_avg / torch.cos(torch.clamp(theta_med, max=math.pi / 4)))
        return s_new if math.isfinite(s_new) and s_new > 0 else None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training:
            s_new = self.dynamic_scale(embeddings, labels)
            if s_new is not None:
                self.scale.fill_(s_new)
        return self._loss(embeddings, labels, NoMargin(), float(self.scale))


# ------------------------------------------------------------------------------------ LDAM margins
def ldam_margins(class_counts: torch.Tensor, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM per-class margins (Cao et al., NeurIPS 2019): m_c = max_margin · n_c^(−1/4) / max_j n_j^(−1/4).

    The rarest class gets ``max_margin``. Counts below 1 (unseen classes) count as 1.
    Returns float32 (C,).
    """
    n = class_counts.detach().to(torch.float64).clamp_min(1.0)
    r = n.pow(-0.25)
    return (max_margin * r / r.max()).to(torch.float32)


class LDAMSoftmax(_Head):
    """Margin softmax with LDAM-style per-class margins m_c ∝ n_c^(−1/4) (``class_margins``).

    Args:
        num_classes, embedding_dim: C and D.
        class_counts: (C,) training samples per class. ``None``: counted online from the
            labels of training-mode forwards (margins follow the counts seen so far;
            classes not seen yet get ``max_margin``).
        max_margin: the largest margin (LDAM: 0.5), given to the rarest class.
        scale: s (LDAM: 30).
        margin: the spec whose m the class margins replace: ``CosFace()`` (LDAM's additive
            logit margin on normalised features, the default), ``ArcFace()`` or
            ``CombinedMargin`` (m2).

    Buffers ``.class_counts`` (C,) int64 and ``.class_margins`` (C,) float32. LDAM's
    deferred re-weighting (DRW) schedule is a sampler/weighting choice and not part of
    this head.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        class_counts: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        max_margin: float = 0.5,
        scale: float = 30.0,
        margin: MarginSpec = CosFace(),
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        normalize: bool = True,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        super().__init__(num_classes, embedding_dim, scale, reduction, ignore_index, normalize, backend, dtype, device)
        if not isinstance(margin, MarginSpec) or not margin.has_single_margin:
            raise ValueError(f"margin must be a spec with a single m (CosFace, ArcFace, CombinedMargin), got {margin!r}")
        check_real("max_margin", max_margin, low=0.0)
        self.margin, self.scale, self.max_margin = margin, float(scale), float(max_margin)
        self.online = class_counts is None
        counts = torch.zeros(num_classes, dtype=torch.int64) if class_counts is None else torch.as_tensor(class_counts)
        if tuple(counts.shape) != (num_classes,):
            raise ValueError(f"class_counts must have shape ({num_classes},), got {tuple(counts.shape)}")
        if not bool(torch.isfinite(counts.double()).all()) or bool((counts < 0).any()):
            raise ValueError("class_counts must be finite and >= 0")
        counts = counts.detach().cpu().round().to(torch.int64)
        self.register_buffer("class_counts", counts.to(device))
        self.register_buffer("class_margins", ldam_margins(counts, self.max_margin).to(device))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.online:
            with torch.no_grad():
                keep = (labels >= 0) & (labels < self.num_classes)
                self.class_counts.index_add_(0, torch.where(keep, labels, torch.zeros_like(labels)), keep.to(torch.int64))
                self.class_margins.copy_(ldam_margins(self.class_counts, self.max_margin))
        return self._loss(embeddings, labels, self.margin, self.scale, class_margins=self.class_margins)


# ------------------------------------------------------------------------------------------ MagFace
class MagFace(_Head):
    """MagFace (Meng et al., CVPR 2021): an ArcFace margin growing with the feature norm.

    With a = clamp(‖x_i‖, l_a, u_a) (the raw embedding norm):

        m(a) = (u_m − l_m)/(u_a − l_a) · (a − l_a) + l_m,     g(a) = a/u_a² + 1/a,
        loss = mean_i CE_i(ArcFace with margin m(a_i)) + λ_g · mean_i g(a_i)

    (ArcFace's fallback cos θ − m·sin m where θ + m > π, as the authors' code).
    Defaults are the paper's: l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 35, s = 64.

    The cross-entropy runs on the fused path with ``sample_margins = m(a)``. The fused
    path treats margins as constants, but in MagFace the margin is a function of the
    norm and the authors' code back-propagates through it; that share is added exactly
    here per row (O(B)): ∂CE_i/∂m_i = s·(p_y − 1)·∂ψ/∂m with p_y − 1 = expm1(−CE_i) and
    ∂ψ/∂m = −sin(θ + m) (−(sin m + m·cos m) on the fallback), through a surrogate term
    (m − m.detach())·∂CE/∂m whose value is 0. The norm's gradient is 0 outside [l_a, u_a]
    (the clamp). ``reduction="none"`` returns the per-row CE_i + λ_g·g(a_i).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        scale: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = False,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        super().__init__(num_classes, embedding_dim, scale, reduction, ignore_index, True, backend, dtype, device)
        check_real("l_a", l_a, low=0.0, low_inclusive=False)
        check_real("u_a", u_a, low=float(l_a), low_inclusive=False)
        check_real("l_m", l_m, low=0.0)
        check_real("u_m", u_m, low=float(l_m), high=math.pi, high_inclusive=False)
        check_real("lambda_g", lambda_g, low=0.0)
        self.scale = float(scale)
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)
        self.spec = ArcFace(self.l_m, easy_margin=easy_margin)

    def feature_norm(self, embeddings: torch.Tensor) -> torch.Tensor:
        """a = clamp(‖x‖, l_a, u_a), (B,) in float32 (float64 for float64 input), differentiable."""
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        return torch.linalg.vector_norm(embeddings.to(dtype), dim=1).clamp(self.l_a, self.u_a)

    def margin_for_norm(self, a: torch.Tensor) -> torch.Tensor:
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def regularizer(self, a: torch.Tensor) -> torch.Tensor:
        return a / (self.u_a**2) + 1.0 / a

    def _dpsi_dm(self, cos: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        c = cos.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP)
        theta = torch.acos(c)
        arc = -torch.sin(theta + m)
        if self.spec.easy_margin:
            return torch.where(cos > 0, arc, torch.zeros_like(arc))
        return torch.where(theta + m <= math.pi, arc, -(torch.sin(m) + m * torch.cos(m)))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a = self.feature_norm(embeddings)
        m = self.margin_for_norm(a)
        ce = self._loss(embeddings, labels, self.spec, self.scale, reduction="none", sample_margins=m.detach())
        keep = labels != self.ignore_index
        with torch.no_grad():
            labels_local = owned_labels(labels, self.ignore_index)
            cos = target_cosine(embeddings, self.weight, labels_local, True)
            m64 = m.detach().to(torch.float64)
            coef = self.scale * torch.expm1(-ce.detach().to(torch.float64)) * self._dpsi_dm(cos, m64)
            coef = torch.where(keep, coef, torch.zeros_like(coef)).to(ce.dtype)
        ce = ce + (m.to(ce.dtype) - m.detach().to(ce.dtype)) * coef
        rows = ce + self.lambda_g * torch.where(keep, self.regularizer(a).to(ce.dtype), torch.zeros_like(ce))
        return reduce_losses(rows, labels, self.ignore_index, self.reduction)


# ------------------------------------------------------------------------------------------ AdaFace
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
        check_real("m", self.m, low=0.0)
        check_real("eps", self.eps, low=0.0, high=0.5)

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


class AdaFace(_Head):
    """AdaFace (Kim et al., CVPR 2022): margins adapted to image quality via the feature norm.

    For rows with norm ‖z_i‖ (clipped to [0.001, 100], no gradient), batch statistics
    are tracked with momentum t_alpha (training mode, over non-ignored rows, needs ≥ 2):

        μ ← t_alpha·mean(‖z‖) + (1 − t_alpha)·μ,   σ ← t_alpha·std(‖z‖) + (1 − t_alpha)·σ
        (μ₀ = 20, σ₀ = 100, unbiased std, updated before the batch's margins are formed)
        ẑ_i = clip(h·(‖z_i‖ − μ)/(σ + ε), −1, 1)

    and the target logit mixes an angular and an additive margin per row,
    ψ_i = cos(θ_y − m·ẑ_i) − (m·ẑ_i + m) (see ``AdaFaceMargin`` for the clips). This is
    the paper's formula exactly, on the fused path: ``AdaFaceMargin`` is a margin spec
    whose per-row value is u = ẑ + 1. One documented difference from the authors' code:
    they also clamp every *non-target* cosine to [−1 + ε, 1 − ε]; the fused kernels leave
    non-target cosines as they are (a difference only where |cos| > 0.999).
    Defaults: m = 0.4, h = 0.333, s = 64, t_alpha = 0.01, ε = 1e-3.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        m: float = 0.4,
        h: float = 0.333,
        scale: float = 64.0,
        t_alpha: float = 0.01,
        eps: float = 1e-3,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        super().__init__(num_classes, embedding_dim, scale, reduction, ignore_index, True, backend, dtype, device)
        check_real("h", h, low=0.0)
        check_real("t_alpha", t_alpha, low=0.0, high=1.0)
        self.scale, self.h, self.t_alpha, self.eps = float(scale), float(h), float(t_alpha), float(eps)
        self.spec = AdaFaceMargin(m=float(m), eps=float(eps))
        self.register_buffer("batch_mean", torch.tensor(20.0, dtype=torch.float64, device=device))
        self.register_buffer("batch_std", torch.tensor(100.0, dtype=torch.float64, device=device))

    @torch.no_grad()
    def norm_quality(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, update: bool = False) -> torch.Tensor:
        """ẑ (B,) float64 from the current statistics (updated first when ``update``)."""
        norms = torch.linalg.vector_norm(embeddings.detach().to(torch.float64), dim=1).clamp(0.001, 100.0)
        if update:
            keep = torch.ones_like(norms, dtype=torch.bool) if labels is None else labels != self.ignore_index
            if int(keep.sum()) >= 2:
                a = self.t_alpha
                self.batch_mean.mul_(1.0 - a).add_(a * norms[keep].mean())
                self.batch_std.mul_(1.0 - a).add_(a * norms[keep].std())
        return ((norms - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1.0, 1.0)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = self.norm_quality(embeddings, labels, update=self.training)
        u = (z + 1.0).to(torch.float64 if embeddings.dtype == torch.float64 else torch.float32)
        return self._loss(embeddings, labels, self.spec, self.scale, sample_margins=u)
