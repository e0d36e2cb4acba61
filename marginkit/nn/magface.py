"""MagFace (Meng et al., CVPR 2021): an ArcFace margin growing with the feature norm."""

from __future__ import annotations

import math
from typing import Optional

import torch

from marginkit._pipeline import in_range, reduce_losses
from marginkit.backends.common import compute_dtype, target_cosine
from marginkit.errors import check_real
from marginkit.nn._head import ClassWeightHead
from marginkit.specs import ArcFace

__all__ = ["MagFace"]


class MagFace(ClassWeightHead):
    """MagFace (Meng et al., CVPR 2021): an ArcFace margin growing with the feature norm.

    With a = clamp(‖x_i‖, l_a, u_a) (the raw embedding norm):

        m(a) = (u_m − l_m)/(u_a − l_a) · (a − l_a) + l_m,     g(a) = a/u_a² + 1/a,
        loss = mean_i CE_i(ArcFace with margin m(a_i)) + λ_g · mean_i g(a_i)

    The target is cos(θ + m) where cos θ > 0, else cos θ (``easy_margin=True``, the default of the
    authors' ``MagLinear``); ``easy_margin=False`` takes ArcFace's fallback cos θ − m·sin m where
    θ + m > π instead, as their code does with that flag. Defaults are the paper's and its code's:
    l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 35, s = 64, easy_margin.

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
        easy_margin: bool = True,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        check_real("l_a", l_a, low=0.0, low_inclusive=False)
        check_real("u_a", u_a, low=float(l_a), low_inclusive=False)
        check_real("l_m", l_m, low=0.0)
        check_real("u_m", u_m, low=float(l_m), high=math.pi, high_inclusive=False)
        check_real("lambda_g", lambda_g, low=0.0)
        super().__init__(
            num_classes, embedding_dim, ArcFace(float(l_m), easy_margin=easy_margin), scale, reduction=reduction, ignore_index=ignore_index,
            normalize=True, backend=backend, dtype=dtype, device=device,
        )
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)

    def feature_norm(self, embeddings: torch.Tensor) -> torch.Tensor:
        """a = clamp(‖x‖, l_a, u_a), (B,) in float32 (float64 for float64 input), differentiable."""
        dtype = compute_dtype(embeddings)
        return torch.linalg.vector_norm(embeddings.to(dtype), dim=1).clamp(self.l_a, self.u_a)

    def margin_for_norm(self, a: torch.Tensor) -> torch.Tensor:
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def regularizer(self, a: torch.Tensor) -> torch.Tensor:
        return a / (self.u_a**2) + 1.0 / a

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_batch(embeddings, labels, refuse_non_finite=True,
                         why="takes each row's margin from its norm (a non-finite row has none)")
        a = self.feature_norm(embeddings)
        m = self.margin_for_norm(a)
        ce = self.loss(embeddings, labels, reduction="none", sample_margins=m.detach())
        # in range too: under torch.compile a bad label is not raised but left out, as the loss leaves it out
        keep = (labels != self.ignore_index) & in_range(labels, self.num_classes)
        with torch.no_grad():
            labels_local = torch.where(keep, labels, torch.full_like(labels, -1))
            cos = target_cosine(embeddings, self.weight, labels_local, True)
            m64 = m.detach().to(torch.float64)
            coef = self.scale * torch.expm1(-ce.detach().to(torch.float64)) * self.margin.dpsi_dm(cos, m64)
            coef = torch.where(keep, coef, torch.zeros_like(coef)).to(ce.dtype)
        ce = ce + (m.to(ce.dtype) - m.detach().to(ce.dtype)) * coef
        rows = ce + self.lambda_g * torch.where(keep, self.regularizer(a).to(ce.dtype), torch.zeros_like(ce))
        return reduce_losses(rows, keep, self.reduction)
