"""CurricularFace (Huang et al., CVPR 2020), chunked over classes.

Target logit: the ArcFace target ψ(cos θ_y) = cos(θ_y + m) (with ArcFace's fallback
cos θ_y − m·sin m where θ_y + m > π). Non-target logits are modulated by the
running curriculum parameter t:

    N(t, cos θ_j) = cos θ_j                 if cos θ_j ≤ ψ_i   (easy negative)
                    cos θ_j · (t + cos θ_j)  if cos θ_j > ψ_i   (hard negative)

and the loss is cross-entropy over s·[ψ_i, N(t, cos θ_j)_{j≠y}]. t is an exponential
moving average of the batch's mean target cosine r = mean_i cos θ_{y_i}, updated in
training mode *before* the batch's logits are formed (as the authors' code does):

    t ← t_momentum · t + (1 − t_momentum) · r,     t₀ = 0, t_momentum = 0.99.

(The paper writes t⁽ᵏ⁾ = α·r⁽ᵏ⁾ + (1 − α)·t⁽ᵏ⁻¹⁾ with "α = 0.99", but the released code
keeps 0.99 on the old t; we follow the code.) t and the hard/easy mask are constants
for autograd; the gradient of a hard negative's logit is s·(t + 2 cos θ_j).

Hard negatives are decided against the *final* target logit ψ_i (the paper's
T(cos θ_{y_i})). The authors' code compares with cos(θ_y + m) before its fallback;
the two differ only for rows with θ_y + m > π.

It runs on the fused path of either backend through the pipeline's one non-target hook,
``marginkit.modulation.curricular`` (threshold ψ_i, quadratic 1, linear t). Nothing (B, C)
is allocated.
"""

from __future__ import annotations

from typing import Optional

import torch

from marginkit._pipeline import margin_loss
from marginkit.cuda_graphs import refuse_capture
from marginkit.autograd_guards import refuse_recomputation
from marginkit.errors import check_real
from marginkit.modulation import curricular
from marginkit.nn._head import ClassWeightHead, eager_when_training
from marginkit.specs import ArcFace, MarginSpec

__all__ = ["CurricularFace", "curricular_cross_entropy"]


def curricular_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    t: float,
    margin: MarginSpec = ArcFace(0.5),
    scale: float = 64.0,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """CurricularFace cross-entropy for a given curriculum parameter ``t`` (no state).

    The target logit is ``margin``'s ψ (ArcFace(0.5) in the paper); negatives with
    cos θ_j > ψ_i become cos θ_j·(t + cos θ_j). Shapes and reductions as
    ``mk.margin_cross_entropy``; never holds a (B, C) tensor.
    """
    check_real("t", t)
    return margin_loss(
        embeddings, weight, labels, margin, scale, reduction=reduction, ignore_index=ignore_index,
        normalize=normalize, backend=backend, negatives=lambda psi, cos, valid: curricular(psi, float(t)),
    )


class CurricularFace(ClassWeightHead):
    """CurricularFace head: ArcFace target, hard negatives modulated by a running t.

    Args:
        num_classes, embedding_dim: C and D.
        margin: the target's margin spec (paper: ``ArcFace(0.5)``).
        scale: s (paper: 64).
        t_momentum: weight of the old t in its moving average (authors' code: 0.99).
        reduction, ignore_index, normalize, backend: as ``margin_cross_entropy``.

    ``.weight`` (C, D) parameter, ``.t`` 0-d float64 buffer (starts at 0; in training mode the
    batch's loss uses the t moved by the batch's mean target cosine over its non-ignored rows,
    and the buffer is written only once that loss has been computed; it stays float64 under
    ``.half()``). ``forward(embeddings, labels) -> loss``. A non-finite batch in training mode
    raises ``ValueError`` and leaves t unchanged.
    """

    _keep_dtype_buffers = ("t",)

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: MarginSpec = ArcFace(0.5),
        scale: float = 64.0,
        t_momentum: float = 0.99,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        normalize: bool = True,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        super().__init__(
            num_classes, embedding_dim, margin, scale, reduction=reduction, ignore_index=ignore_index,
            normalize=normalize, backend=backend, dtype=dtype, device=device,
        )
        check_real("t_momentum", t_momentum, low=0.0, high=1.0)
        self.t_momentum = float(t_momentum)
        self.register_buffer("t", torch.zeros((), dtype=torch.float64, device=device))

    def _moved_t(self, cos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """t_momentum·t + (1 − t_momentum)·mean target cosine of the valid rows (t if none)."""
        count = valid.sum()
        mean = torch.where(valid, cos.clamp(-1.0, 1.0), torch.zeros_like(cos)).sum() / count.clamp_min(1)
        moved = self.t * self.t_momentum + (1.0 - self.t_momentum) * mean.to(self.t)
        return torch.where(count > 0, moved, self.t)

    @eager_when_training
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        refuse_capture(self, "reads its running t on the host every step (a kernel argument)")
        if self.training:
            refuse_recomputation(self, "running t")
        self.check_batch(embeddings, labels, refuse_non_finite=self.training)
        proposed = {}

        def negatives(psi, cos, valid):
            t = self._moved_t(cos, valid) if self.training else self.t
            proposed["t"] = t
            return curricular(psi, float(t))

        loss = self.loss(embeddings, labels, negatives=negatives)
        if self.training:
            self.t.copy_(proposed["t"])
        return loss

    def extra_repr(self) -> str:
        return super().extra_repr() + f", t_momentum={self.t_momentum}"
