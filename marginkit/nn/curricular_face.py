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

It runs on the fused path of either backend through its negative hook: on CUDA the
Triton kernels' ``hard_negatives`` (the modulation and its slope applied in the tile
epilogues), elsewhere the torch backend's ``negative_hook`` (``curricular_hook``).
Nothing (B, C) is allocated.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from marginkit.backends import torch_chunked
from marginkit.backends.common import owned_labels, target_cosine
from marginkit.backends.torch_chunked import NegativeHook
from marginkit.errors import check_positive_ints, check_real
from marginkit.functional import reduce_losses, resolve_backend, validate_inputs
from marginkit.nn._chunked import KeepBufferDtypes
from marginkit.specs import ArcFace, MarginSpec

__all__ = ["CurricularFace", "curricular_cross_entropy"]


def curricular_hook(threshold: torch.Tensor, t: float) -> NegativeHook:
    """CurricularFace's negative modulation for the torch backend: hard negatives
    (cos θ_j > ψ_i, ``threshold`` (B,)) become cos·(t + cos), with slope t + 2·cos."""
    threshold = threshold[:, None]

    def hook(cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hard = cos > threshold.to(cos.dtype)
        modulated = torch.where(hard, cos * (t + cos), cos)
        slope = torch.where(hard, t + 2.0 * cos, torch.ones_like(cos))
        return modulated, slope

    return hook


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
    chunk_elements: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """CurricularFace cross-entropy for a given curriculum parameter ``t`` (no state).

    The target logit is ``margin``'s ψ (ArcFace(0.5) in the paper); negatives with
    cos θ_j > ψ_i become cos θ_j·(t + cos θ_j). Shapes and reductions as
    ``mk.margin_cross_entropy``; never holds a (B, C) tensor.
    """
    validate_inputs(embeddings, weight, labels, margin, scale, None, None, reduction, ignore_index, backend)
    check_real("t", t)
    labels_local = owned_labels(labels, ignore_index)
    cos_target = target_cosine(embeddings, weight, labels_local, normalize)
    psi, dpsi = margin.target_terms(cos_target)
    if resolve_backend(backend, embeddings.device) == "triton":
        from marginkit.backends import triton as triton_backend

        losses = triton_backend.row_losses(
            embeddings, weight, labels, psi, dpsi, float(scale), ignore_index, normalize,
            hard_negatives=(psi, float(t)),
        )
    else:
        losses = torch_chunked.row_losses(
            embeddings, weight, labels, psi, dpsi, float(scale), ignore_index, normalize, chunk_elements,
            negative_hook=curricular_hook(psi, float(t)),
        )
    return reduce_losses(losses, labels, ignore_index, reduction)


class CurricularFace(KeepBufferDtypes):
    """CurricularFace head: ArcFace target, hard negatives modulated by a running t.

    Args:
        num_classes, embedding_dim: C and D.
        margin: the target's margin spec (paper: ``ArcFace(0.5)``).
        scale: s (paper: 64).
        t_momentum: weight of the old t in its moving average (authors' code: 0.99).
        reduction, ignore_index, normalize, backend: as ``margin_cross_entropy`` ("auto":
            the Triton kernels' negative hook on CUDA, the torch backend's elsewhere).
        chunk_elements: the torch backend's (B, chunk) budget.

    ``.weight`` (C, D) parameter, ``.t`` 0-d float64 buffer (starts at 0; moves only in
    training mode, before the batch's loss is formed, from the mean target cosine of the
    batch's non-ignored rows; it stays float64 under ``.half()``). ``forward(embeddings, labels) -> loss``.
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
        chunk_elements: Optional[int] = None,
        backend: str = "auto",
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        super().__init__()
        check_positive_ints(num_classes=num_classes, embedding_dim=embedding_dim)
        if not isinstance(margin, MarginSpec):
            raise TypeError(f"margin must be a marginkit margin spec, got {margin!r}")
        check_real("scale", scale, low=0.0, low_inclusive=False)
        check_real("t_momentum", t_momentum, low=0.0, high=1.0)
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.margin, self.scale, self.t_momentum = margin, float(scale), float(t_momentum)
        self.reduction, self.ignore_index, self.normalize = reduction, ignore_index, normalize
        self.chunk_elements, self.backend = chunk_elements, backend
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, dtype=dtype, device=device))
        nn.init.normal_(self.weight, mean=0.0, std=0.01)
        self.register_buffer("t", torch.zeros((), dtype=torch.float64, device=device))

    @torch.no_grad()
    def update_t(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """t ← t_momentum·t + (1 − t_momentum)·mean target cosine of the batch (no-op if empty)."""
        keep = labels != self.ignore_index
        if not bool(keep.any()):
            return
        cos = target_cosine(embeddings, self.weight, owned_labels(labels, self.ignore_index), self.normalize)
        r = cos[keep].clamp(-1.0, 1.0).mean()
        self.t.mul_(self.t_momentum).add_((1.0 - self.t_momentum) * r.to(self.t))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        validate_inputs(
            embeddings, self.weight, labels, self.margin, self.scale, None, None, self.reduction,
            self.ignore_index, self.backend,
        )
        if self.training:
            self.update_t(embeddings, labels)
        return curricular_cross_entropy(
            embeddings, self.weight, labels, float(self.t), self.margin, self.scale,
            reduction=self.reduction, ignore_index=self.ignore_index, normalize=self.normalize,
            chunk_elements=self.chunk_elements, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, margin={self.margin}, "
            f"scale={self.scale}, t_momentum={self.t_momentum}"
        )
