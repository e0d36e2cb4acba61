"""AdaCos (Zhang et al., CVPR 2019): no margin, a scale set from the batch."""

from __future__ import annotations

import math
from typing import Optional

import torch

from marginkit import backends
from marginkit._pipeline import autocast_inputs, no_autocast
from marginkit.backends.common import target_cosine
from marginkit.cuda_graphs import refuse_capture
from marginkit.autograd_guards import refuse_recomputation
from marginkit.nn._head import ClassWeightHead, eager_when_training
from marginkit.specs import COS_CLAMP, NoMargin

__all__ = ["AdaCos"]


class AdaCos(ClassWeightHead):
    """AdaCos (Zhang et al., CVPR 2019): no margin, a scale set from the batch.

    Fixed start s₀ = √2·log(C − 1). In training mode each forward first updates

        s ← log(B_avg) / cos(min(π/4, θ_med))

    with the previous s inside B_avg = (1/N) Σ_i Σ_{k≠y_i} exp(s·cos θ_{i,k}) (N: the
    batch's non-ignored rows) and θ_med the median of the batch's target angles
    θ_{i,y_i} (``torch.median``: the lower median for an even count), then computes the
    loss ``margin_cross_entropy(x, W, y, NoMargin(), s)`` with the new s, as the paper's
    algorithm (and its common implementations) do. s is a constant for autograd.

    B_avg is exact, not approximated: it is the non-target log-sum-exp the backend's
    ``lse_partials`` already computes (no (B, C) tensor), combined over rows in log space.
    The price is one extra no-grad pass over the classes per training step.
    A degenerate batch (no rows, or a non-finite or non-positive new s, which needs
    B_avg < 1) leaves s unchanged; a non-finite batch in training mode raises ``ValueError``
    and s is written only after the batch's loss has been computed.

    ``.scale`` is a 0-d float64 buffer. Needs C ≥ 2.
    """

    _keep_dtype_buffers = ("scale",)

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
        super().__init__(
            num_classes, embedding_dim, NoMargin(), None, reduction=reduction, ignore_index=ignore_index,
            normalize=normalize, backend=backend, dtype=dtype, device=device,
        )
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
        labels_local = torch.where(keep, labels, torch.full_like(labels, -1))
        s_prev = float(self.scale)
        engine = backends.resolve(self.backend, embeddings.device)
        # the inputs and precision the loss computes with (under autocast: its GEMMs not recast)
        x, w = autocast_inputs(embeddings.detach(), self.weight.detach())
        with no_autocast(embeddings.device):
            row_max, row_sumexp = engine.lse_partials(x, w, labels_local, s_prev, self.normalize)
            cos = target_cosine(x, w, labels_local, self.normalize)[keep]
        log_b = row_max.to(torch.float64) + torch.log(row_sumexp.to(torch.float64))
        log_b_avg = torch.logsumexp(log_b[keep], dim=0) - math.log(int(keep.sum()))
        theta_med = torch.median(torch.acos(cos.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP)))
        s_new = float(log_b_avg / torch.cos(torch.clamp(theta_med, max=math.pi / 4)))
        return s_new if math.isfinite(s_new) and s_new > 0 else None

    @eager_when_training
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        refuse_capture(self, "reads its running scale on the host every step (a kernel argument)")
        if self.training:
            refuse_recomputation(self, "scale")
        self.check_batch(embeddings, labels, refuse_non_finite=self.training)
        s_new = self.dynamic_scale(embeddings, labels) if self.training else None
        s = float(self.scale) if s_new is None else s_new
        loss = self.loss(embeddings, labels, NoMargin(), s)
        if s_new is not None:  # state moves only once the loss has succeeded
            self.scale.fill_(s_new)
        return loss
