"""The pure-PyTorch fused backend: margin cross-entropy chunked over classes.

The CPU path and the fallback everywhere. It follows the same algorithm as the
Triton kernels: a forward that keeps only an online log-sum-exp per row, and a
backward that recomputes each chunk of logits. It never holds a (B, C) tensor:
the largest temporary is (B, chunk) with B·chunk ≤ ``CHUNK_ELEMENTS``.

Two phases, shared with the distributed layer (notes/CONTRACTS.md):
``lse_partials`` (non-target partials over this weight's classes) and
``grads_from_lse`` (gradients given the global log-sum-exp).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from marginkit.backends.common import (
    apply_target_gradients,
    combine_partials,
    compute_dtype,
    inverse_norms,
    normalization_backward,
    owned_labels,
    target_gradient,
)

# Element budget of one (B, chunk) fp32 logits tile: 2^21 floats = 8 MiB.
CHUNK_ELEMENTS = 1 << 21

#: A hook on the non-target cosines of a (B, n) chunk: cos -> (N(cos), dN/dcos), both
#: (B, n). Heads such as CurricularFace modulate their negatives with it; per-row
#: parameters broadcast as (B, 1). The target column is excluded whatever it returns.
NegativeHook = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def class_chunks(
    num_rows: int, num_classes: int, budget: Optional[int] = None, per_class: int = 1
) -> Iterator[tuple[int, int]]:
    """[start, stop) class ranges with num_rows·(stop − start)·per_class ≤ budget (≥ 1 class)."""
    chunk = max(1, (budget or CHUNK_ELEMENTS) // max(num_rows * per_class, 1))
    for start in range(0, num_classes, chunk):
        yield start, min(start + chunk, num_classes)


def online_lse_step(
    row_max: torch.Tensor, row_sumexp: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a (B, n) chunk of logits (−inf where excluded) into the running (max, Σexp)."""
    new_max = torch.maximum(row_max, logits.max(dim=1).values)
    # Rows whose max is still -inf shift by 0 instead (exp(-inf - -inf) would be NaN).
    shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
    row_sumexp = row_sumexp * torch.exp(row_max - shift) + torch.exp(logits - shift[:, None]).sum(dim=1)
    return new_max, row_sumexp


def _scaled_cos_chunk(x_unit, weight, w_inv_norm, start, stop, labels_local, scale, negative_hook=None):
    """s·cos (or s·N(cos) with a hook) of classes [start, stop).

    Returns (logits (B, n), w_unit (n, D), target mask (B, n), dN/dcos (B, n) or None).
    """
    w_unit = weight[start:stop].to(x_unit.dtype) * w_inv_norm[start:stop, None]
    logits = x_unit @ w_unit.T
    slope = None
    if negative_hook is not None:
        logits, slope = negative_hook(logits)
    cols = torch.arange(start, stop, device=labels_local.device)
    return logits.mul_(scale), w_unit, labels_local[:, None] == cols[None, :], slope


@torch.no_grad()
def lse_partials(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    scale: float,
    normalize: bool,
    chunk_elements: Optional[int] = None,
    *,
    negative_hook: Optional[NegativeHook] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (max, Σ exp(logit − max)) over this weight's non-target classes.

    embeddings (B, D), weight (C, D); labels_local (B,) int64: the column of the row's
    target in this weight (-1 or ≥ C when it is not here). Both outputs (B,), float32
    (float64 for float64 inputs). A row with no non-target class gets (-inf, 0).
    """
    num_rows = embeddings.shape[0]
    dtype = compute_dtype(embeddings)
    x_unit = embeddings.to(dtype) * inverse_norms(embeddings, normalize)[:, None]
    w_inv_norm = inverse_norms(weight, normalize)
    row_max = torch.full((num_rows,), float("-inf"), dtype=dtype, device=embeddings.device)
    row_sumexp = torch.zeros(num_rows, dtype=dtype, device=embeddings.device)
    for start, stop in class_chunks(num_rows, weight.shape[0], chunk_elements):
        logits, _, is_target, _ = _scaled_cos_chunk(
            x_unit, weight, w_inv_norm, start, stop, labels_local, scale, negative_hook
        )
        row_max, row_sumexp = online_lse_step(row_max, row_sumexp, logits.masked_fill_(is_target, float("-inf")))
    return row_max, row_sumexp


@torch.no_grad()
def grads_from_lse(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    scale: float,
    normalize: bool,
    chunk_elements: Optional[int] = None,
    *,
    need_weight_grad: bool = True,
    negative_hook: Optional[NegativeHook] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Non-target share of the gradients of Σ_i grad_rows_i · loss_i, given the global
    log-sum-exp ``lse`` (B,). The target column is left out (``common.apply_target_gradients``).

    Returns (grad_embeddings (B, D) float32 (float64 for float64 inputs), grad_weight
    (C, D) in weight.dtype, or None with ``need_weight_grad=False``, which skips a third
    of the work, e.g. for IR-Softmax's gradient-free centers). The embedding gradient is
    this weight's share: sum it over shards.
    """
    num_rows = embeddings.shape[0]
    x_inv_norm = inverse_norms(embeddings, normalize)
    x_unit = embeddings.to(x_inv_norm.dtype) * x_inv_norm[:, None]
    w_inv_norm = inverse_norms(weight, normalize)
    g_scaled = (grad_rows.to(x_unit.dtype) * scale)[:, None]
    lse = lse.to(x_unit.dtype)[:, None]
    grad_x_unit = torch.zeros_like(x_unit)
    grad_weight = torch.empty_like(weight) if need_weight_grad else None
    for start, stop in class_chunks(num_rows, weight.shape[0], chunk_elements):
        logits, w_unit, is_target, slope = _scaled_cos_chunk(
            x_unit, weight, w_inv_norm, start, stop, labels_local, scale, negative_hook
        )
        # d loss / d cos_j = s·g·p_j (· dN/dcos_j with a hook) off the target column.
        grad_cos = torch.exp(logits - lse).mul_(g_scaled)
        if slope is not None:
            grad_cos.mul_(slope)
        grad_cos.masked_fill_(is_target, 0.0)
        grad_x_unit += grad_cos @ w_unit
        if grad_weight is not None:
            grad_weight[start:stop] = normalization_backward(
                grad_cos.T @ x_unit, weight[start:stop], w_inv_norm[start:stop], normalize
            ).to(weight.dtype)
    grad_embeddings = normalization_backward(grad_x_unit, embeddings, x_inv_norm, normalize)
    return grad_embeddings, grad_weight


class _ChunkedMarginCE(torch.autograd.Function):
    """Per-row margin cross-entropy; saves O(B) tensors and recomputes in backward."""

    @staticmethod
    def forward(
        ctx, embeddings, weight, labels_local, target_logit, dtarget, scale, normalize, chunk_elements, negative_hook
    ):
        row_max, row_sumexp = lse_partials(
            embeddings, weight, labels_local, scale, normalize, chunk_elements, negative_hook=negative_hook
        )
        losses, lse = combine_partials(row_max, row_sumexp, target_logit, scale)
        owned = labels_local >= 0
        losses = torch.where(owned, losses, torch.zeros_like(losses))
        ctx.save_for_backward(embeddings, weight, labels_local, dtarget, losses, lse)
        ctx.scale, ctx.normalize, ctx.chunk_elements = scale, normalize, chunk_elements
        ctx.negative_hook = negative_hook
        return losses.to(compute_dtype(embeddings))

    @staticmethod
    def backward(ctx, grad_losses):
        embeddings, weight, labels_local, dtarget, losses, lse = ctx.saved_tensors
        grad_rows = torch.where(labels_local >= 0, grad_losses, torch.zeros_like(grad_losses))
        grad_embeddings, grad_weight = grads_from_lse(
            embeddings, weight, labels_local, lse, grad_rows, ctx.scale, ctx.normalize, ctx.chunk_elements,
            need_weight_grad=ctx.needs_input_grad[1], negative_hook=ctx.negative_hook,
        )
        target_grad = target_gradient(losses, dtarget, grad_rows, ctx.scale)
        grad_embeddings = apply_target_gradients(
            grad_embeddings, grad_weight, embeddings, weight, labels_local, target_grad, ctx.normalize,
            embeddings.dtype,
        )
        return grad_embeddings, grad_weight, None, None, None, None, None, None, None


def row_losses(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target_logit: torch.Tensor,
    dtarget: torch.Tensor,
    scale: float,
    ignore_index: int,
    normalize: bool,
    chunk_elements: Optional[int] = None,
    *,
    negative_hook: Optional[NegativeHook] = None,
) -> torch.Tensor:
    """Per-row losses (B,) float32 (0 on ignored rows), differentiable in both inputs.

    target_logit / dtarget (B,): ψ(cos θ_y) and dψ/dcos θ_y, precomputed by the spec.
    negative_hook: optional modulation of the non-target cosines (``NegativeHook``).
    float64 inputs are computed and returned in float64 (for gradcheck).
    """
    labels_local = owned_labels(labels, ignore_index)
    return _ChunkedMarginCE.apply(
        embeddings, weight, labels_local, target_logit, dtarget, float(scale), normalize, chunk_elements,
        negative_hook,
    )
