"""AdaFace (Kim et al., CVPR 2022): margins adapted to image quality via the feature norm."""

from __future__ import annotations

from typing import Optional

import torch

from marginkit.backends.common import compute_dtype
from marginkit.errors import check_real
from marginkit.nn._head import ClassWeightHead, eager_when_training
from marginkit.autograd_guards import refuse_recomputation
from marginkit.specs import AdaFaceMargin

__all__ = ["AdaFace", "AdaFaceMargin"]


class AdaFace(ClassWeightHead):
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
    Defaults: m = 0.4, h = 0.333, s = 64, t_alpha = 0.01, ε = 1e-3. A non-finite batch raises
    ``ValueError`` naming ``embeddings`` (its norms would give NaN margins); μ and σ are written
    only after the batch's loss.
    """

    _keep_dtype_buffers = ("batch_mean", "batch_std")

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
        super().__init__(
            num_classes, embedding_dim, AdaFaceMargin(m=float(m), eps=float(eps)), scale, reduction=reduction, ignore_index=ignore_index,
            normalize=True, backend=backend, dtype=dtype, device=device,
        )
        check_real("h", h, low=0.0)
        check_real("t_alpha", t_alpha, low=0.0, high=1.0)
        self.h, self.t_alpha, self.eps = float(h), float(t_alpha), float(eps)
        self.register_buffer("batch_mean", torch.tensor(20.0, dtype=torch.float64, device=device))
        self.register_buffer("batch_std", torch.tensor(100.0, dtype=torch.float64, device=device))

    @torch.no_grad()
    def moved_statistics(self, norms: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) after this batch (unchanged with fewer than 2 kept rows); nothing is written."""
        if int(keep.sum()) < 2:
            return self.batch_mean, self.batch_std
        a = self.t_alpha
        mean = self.batch_mean * (1.0 - a) + a * norms[keep].mean()
        std = self.batch_std * (1.0 - a) + a * norms[keep].std()
        return mean, std

    @torch.no_grad()
    def norm_quality(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, update: bool = False) -> torch.Tensor:
        """ẑ (B,) float64 from the current statistics (moved by this batch first when ``update``;
        the buffers are written at once here: ``forward`` writes them only after its loss)."""
        norms = torch.linalg.vector_norm(embeddings.detach().to(torch.float64), dim=1).clamp(0.001, 100.0)
        mean, std = self.batch_mean, self.batch_std
        if update:
            keep = torch.ones_like(norms, dtype=torch.bool) if labels is None else labels != self.ignore_index
            mean, std = self.moved_statistics(norms, keep)
            self.batch_mean.copy_(mean)
            self.batch_std.copy_(std)
        return ((norms - mean) / (std + self.eps) * self.h).clamp(-1.0, 1.0)

    @eager_when_training
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training:
            refuse_recomputation(self, "feature-norm statistics")
        why = ("keeps running norm statistics and refuses a non-finite batch (they are unchanged)" if self.training
               else "takes each row's margin from its norm (a non-finite row has none)")
        self.check_batch(embeddings, labels, refuse_non_finite=True, why=why)
        with torch.no_grad():
            norms = torch.linalg.vector_norm(embeddings.detach().to(torch.float64), dim=1).clamp(0.001, 100.0)
            mean, std = self.batch_mean, self.batch_std
            if self.training:
                mean, std = self.moved_statistics(norms, labels != self.ignore_index)
            z = ((norms - mean) / (std + self.eps) * self.h).clamp(-1.0, 1.0)
        u = (z + 1.0).to(compute_dtype(embeddings))
        loss = self.loss(embeddings, labels, sample_margins=u)
        if self.training:  # state moves only once the loss has succeeded
            self.batch_mean.copy_(mean)
            self.batch_std.copy_(std)
        return loss
