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

Why not the fused backends: they are margin-agnostic by contract (the non-target
logits are always s·cos θ_j), so the negative hook cannot be expressed there without
touching the kernels. This module runs its own chunked PyTorch loop
(``marginkit.nn._chunked``): a (B, chunk) working set with B·chunk ≤ 2^21 floats, an
online log-sum-exp forward and a recompute backward; nothing (B, C) is allocated.
On CUDA it is cuBLAS GEMMs driven from Python, not a fused Triton kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from marginkit.backends.common import (
    add_rows_,
    combine_partials,
    compute_dtype,
    inverse_norms,
    normalization_backward,
    owned_labels,
    target_backward,
    target_cosine,
    target_gradient,
)
from marginkit.errors import check_positive_ints, check_real
from marginkit.functional import reduce_losses, validate_inputs
from marginkit.backends.torch_chunked import class_chunks, online_lse_step
from marginkit.nn._chunked import KeepBufferDtypes, unit_rows
from marginkit.specs import ArcFace, MarginSpec

__all__ = ["CurricularFace", "curricular_cross_entropy"]


def _chunk_terms(x_unit, weight, w_inv, start, stop, labels_local, threshold, t, scale):
    """cos (B, n), w_unit (n, D), target mask, hard mask, scaled modulated logits."""
    w_unit = weight[start:stop].to(x_unit.dtype) * w_inv[start:stop, None]
    cos = x_unit @ w_unit.T
    cols = torch.arange(start, stop, device=labels_local.device)
    is_target = labels_local[:, None] == cols[None, :]
    hard = (cos > threshold) & ~is_target
    logits = torch.where(hard, cos * (t + cos), cos).mul_(scale)
    return cos, w_unit, is_target, hard, logits


class _CurricularCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, weight, labels_local, psi, dpsi, t, scale, normalize, chunk_elements):
        with torch.no_grad():
            x_unit, _ = unit_rows(embeddings, normalize)
            w_inv = inverse_norms(weight, normalize)
            threshold = psi.to(x_unit.dtype)[:, None]
            B = embeddings.shape[0]
            row_max = torch.full((B,), float("-inf"), dtype=x_unit.dtype, device=embeddings.device)
            row_sumexp = torch.zeros(B, dtype=x_unit.dtype, device=embeddings.device)
            for start, stop in class_chunks(B, weight.shape[0], chunk_elements):
                _, _, is_target, _, logits = _chunk_terms(
                    x_unit, weight, w_inv, start, stop, labels_local, threshold, t, scale
                )
                row_max, row_sumexp = online_lse_step(row_max, row_sumexp, logits.masked_fill_(is_target, float("-inf")))
            losses, lse = combine_partials(row_max, row_sumexp, psi, scale)
            losses = torch.where(labels_local >= 0, losses, torch.zeros_like(losses))
        ctx.save_for_backward(embeddings, weight, labels_local, psi, dpsi, losses, lse)
        ctx.t, ctx.scale, ctx.normalize, ctx.chunk_elements = t, scale, normalize, chunk_elements
        return losses.to(compute_dtype(embeddings))

    @staticmethod
    @torch.no_grad()
    def backward(ctx, grad_losses):
        embeddings, weight, labels_local, psi, dpsi, losses, lse = ctx.saved_tensors
        t, scale, normalize = ctx.t, ctx.scale, ctx.normalize

        grad_rows = torch.where(labels_local >= 0, grad_losses, torch.zeros_like(grad_losses))
        x_unit, x_inv = unit_rows(embeddings, normalize)
        w_inv = inverse_norms(weight, normalize)
        threshold = psi.to(x_unit.dtype)[:, None]
        g_scaled = (grad_rows.to(x_unit.dtype) * scale)[:, None]
        lse_c = lse.to(x_unit.dtype)[:, None]
        grad_x_unit = torch.zeros_like(x_unit)
        grad_weight = torch.empty_like(weight)
        B = embeddings.shape[0]
        for start, stop in class_chunks(B, weight.shape[0], ctx.chunk_elements):
            cos, w_unit, is_target, hard, logits = _chunk_terms(
                x_unit, weight, w_inv, start, stop, labels_local, threshold, t, scale
            )
            # d loss/d cos_j = s·g·p_j·dN/dcos_j, dN/dcos = t + 2cos on hard negatives, 1 on easy ones.
            grad_cos = torch.exp(logits - lse_c).mul_(g_scaled)
            grad_cos = torch.where(hard, grad_cos * (t + 2.0 * cos), grad_cos).masked_fill_(is_target, 0.0)
            grad_x_unit += grad_cos @ w_unit
            grad_weight[start:stop] = normalization_backward(
                grad_cos.T @ x_unit, weight[start:stop], w_inv[start:stop], normalize
            ).to(weight.dtype)
        grad_embeddings = normalization_backward(grad_x_unit, embeddings, x_inv, normalize)
        target_grad = target_gradient(losses, dpsi, grad_rows, scale)
        target_dx, classes, target_dw = target_backward(embeddings, weight, labels_local, target_grad, normalize)
        grad_embeddings = (grad_embeddings + target_dx).to(embeddings.dtype)
        add_rows_(grad_weight, classes, target_dw)
        return grad_embeddings, grad_weight, None, None, None, None, None, None, None


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
) -> torch.Tensor:
    """CurricularFace cross-entropy for a given curriculum parameter ``t`` (no state).

    The target logit is ``margin``'s ψ (ArcFace(0.5) in the paper); negatives with
    cos θ_j > ψ_i become cos θ_j·(t + cos θ_j). Shapes and reductions as
    ``mk.margin_cross_entropy``; never holds a (B, C) tensor.
    """
    validate_inputs(embeddings, weight, labels, margin, scale, None, None, reduction, ignore_index, "torch")
    check_real("t", t)
    labels_local = owned_labels(labels, ignore_index)
    cos_target = target_cosine(embeddings, weight, labels_local, normalize)
    psi, dpsi = margin.target_terms(cos_target)
    losses = _CurricularCE.apply(
        embeddings, weight, labels_local, psi, dpsi, float(t), float(scale), normalize, chunk_elements
    )
    return reduce_losses(losses, labels, ignore_index, reduction)


class CurricularFace(KeepBufferDtypes):
    """CurricularFace head: ArcFace target, hard negatives modulated by a running t.

    Args:
        num_classes, embedding_dim: C and D.
        margin: the target's margin spec (paper: ``ArcFace(0.5)``).
        scale: s (paper: 64).
        t_momentum: weight of the old t in its moving average (authors' code: 0.99).
        reduction, ignore_index, normalize, chunk_elements: as ``margin_cross_entropy``.

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
        self.chunk_elements = chunk_elements
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
            self.ignore_index, "torch",
        )
        if self.training:
            self.update_t(embeddings, labels)
        return curricular_cross_entropy(
            embeddings, self.weight, labels, float(self.t), self.margin, self.scale,
            reduction=self.reduction, ignore_index=self.ignore_index, normalize=self.normalize,
            chunk_elements=self.chunk_elements,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, margin={self.margin}, "
            f"scale={self.scale}, t_momentum={self.t_momentum}"
        )
