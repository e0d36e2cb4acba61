"""The pure-PyTorch backend: margin cross-entropy chunked over classes.

The CPU path and the fallback everywhere (and the engine of sub-center heads). Same
algorithm as the Triton kernels: the forward keeps an online log-sum-exp per row, the
backward recomputes each chunk of logits. The largest temporaries are one chunk's
(B, n) logits and (n, D) unit weights, with n·(B·K + D) ≤ ``CHUNK_ELEMENTS``.

Backend protocol (``marginkit.backends``): ``lse_partials``, ``grads_from_lse``,
``row_losses``. ``sub_centers=K`` reads the weight as (C·K, D), K rows per class, and
takes each class's cosine as the max over its K rows (sub-center ArcFace).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from marginkit.backends.common import (
    apply_target_gradients,
    combine_partials,
    compute_dtype,
    inverse_norms,
    normalization_backward,
    target_gradient,
)
from marginkit.modulation import NegativeModulation

# Element budget of one chunk's temporaries (logits + unit weights): 2^21 floats = 8 MiB in fp32.
CHUNK_ELEMENTS = 1 << 21


def class_chunks(
    num_rows: int, num_classes: int, dim: int = 0, budget: Optional[int] = None, sub_centers: int = 1
) -> Iterator[tuple[int, int]]:
    """[start, stop) class ranges whose (B, n·K) logits and (n·K, D) weights fit ``budget`` elements."""
    per_class = (num_rows + dim) * sub_centers
    chunk = max(1, (budget or CHUNK_ELEMENTS) // max(per_class, 1))
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


def _scaled_cos_chunk(x_unit, weight, w_inv_norm, start, stop, labels_local, scale, modulation, sub_centers):
    """s·N(cos) of classes [start, stop).

    Returns (logits (B, n), w_unit (n·K, D), target mask (B, n), dN/dcos (B, n) or None,
    winning sub-center (B, n) or None).
    """
    rows = slice(start * sub_centers, stop * sub_centers)
    w_unit = weight[rows].to(x_unit.dtype) * w_inv_norm[rows, None]
    cos = x_unit @ w_unit.T
    winner = None
    if sub_centers > 1:
        cos, winner = cos.view(cos.shape[0], stop - start, sub_centers).max(dim=2)
    slope = None
    if modulation is not None:
        cos, slope = modulation.apply(cos)
    cols = torch.arange(start, stop, device=labels_local.device)
    return cos.mul_(scale), w_unit, labels_local[:, None] == cols[None, :], slope, winner


@torch.no_grad()
def lse_partials(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    scale: float,
    normalize: bool,
    *,
    modulation: Optional[NegativeModulation] = None,
    deterministic: bool = False,
    sub_centers: int = 1,
    chunk_elements: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (max, Σ exp(logit − max)) over this weight's non-target classes.

    embeddings (B, D), weight (C·K, D); labels_local (B,) int64: the class of the row's
    target in this weight (-1 when it is not here). Both outputs (B,), float32 (float64
    for float64 inputs). A row with no non-target class gets (-inf, 0). The CPU path is
    deterministic whatever ``deterministic`` says.
    """
    num_rows, dim = embeddings.shape
    dtype = compute_dtype(embeddings)
    x_unit = embeddings.to(dtype) * inverse_norms(embeddings, normalize)[:, None]
    w_inv_norm = inverse_norms(weight, normalize)
    row_max = torch.full((num_rows,), float("-inf"), dtype=dtype, device=embeddings.device)
    row_sumexp = torch.zeros(num_rows, dtype=dtype, device=embeddings.device)
    num_classes = weight.shape[0] // sub_centers
    for start, stop in class_chunks(num_rows, num_classes, dim, chunk_elements, sub_centers):
        logits, _, is_target, _, _ = _scaled_cos_chunk(
            x_unit, weight, w_inv_norm, start, stop, labels_local, scale, modulation, sub_centers
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
    *,
    need_weight_grad: bool = True,
    modulation: Optional[NegativeModulation] = None,
    deterministic: bool = False,
    sub_centers: int = 1,
    chunk_elements: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Non-target share of the gradients of Σ_i grad_rows_i · loss_i, given the global
    log-sum-exp ``lse`` (B,). The target column is left out (``common.apply_target_gradients``).

    Returns (grad_embeddings (B, D) float32 (float64 for float64 inputs), grad_weight
    (C·K, D) in weight.dtype, or None with ``need_weight_grad=False``, which skips a third
    of the work). The embedding gradient is this weight's share: sum it over shards.
    """
    num_rows, dim = embeddings.shape
    x_inv_norm = inverse_norms(embeddings, normalize)
    x_unit = embeddings.to(x_inv_norm.dtype) * x_inv_norm[:, None]
    w_inv_norm = inverse_norms(weight, normalize)
    g_scaled = (grad_rows.to(x_unit.dtype) * scale)[:, None]
    lse = lse.to(x_unit.dtype)[:, None]
    grad_x_unit = torch.zeros_like(x_unit)
    grad_weight = torch.empty_like(weight) if need_weight_grad else None
    num_classes = weight.shape[0] // sub_centers
    for start, stop in class_chunks(num_rows, num_classes, dim, chunk_elements, sub_centers):
        logits, w_unit, is_target, slope, winner = _scaled_cos_chunk(
            x_unit, weight, w_inv_norm, start, stop, labels_local, scale, modulation, sub_centers
        )
        # d loss / d cos_j = s·g·p_j (· dN/dcos_j when modulated) off the target column.
        grad_cos = torch.exp(logits - lse).mul_(g_scaled)
        if slope is not None:
            grad_cos.mul_(slope)
        grad_cos.masked_fill_(is_target, 0.0)
        if winner is not None:  # each (row, class) gradient goes to its winning sub-center
            routed = torch.zeros(num_rows, stop - start, sub_centers, dtype=grad_cos.dtype, device=grad_cos.device)
            grad_cos = routed.scatter_(2, winner[:, :, None], grad_cos[:, :, None]).view(num_rows, (stop - start) * sub_centers)
        grad_x_unit += grad_cos @ w_unit
        if grad_weight is not None:
            rows = slice(start * sub_centers, stop * sub_centers)
            grad_weight[rows] = normalization_backward(
                grad_cos.T @ x_unit, weight[rows], w_inv_norm[rows], normalize
            ).to(weight.dtype)
    grad_embeddings = normalization_backward(grad_x_unit, embeddings, x_inv_norm, normalize)
    return grad_embeddings, grad_weight


class _ChunkedMarginCE(torch.autograd.Function):
    """Per-row margin cross-entropy; saves O(B) tensors and recomputes in backward."""

    @staticmethod
    def forward(ctx, embeddings, weight, labels_local, target_rows, target_logit, dtarget, scale, normalize, options):
        row_max, row_sumexp = lse_partials(embeddings, weight, labels_local, scale, normalize, **options)
        losses, lse = combine_partials(row_max, row_sumexp, target_logit, scale)
        losses = torch.where(labels_local >= 0, losses, torch.zeros_like(losses))
        # target_rows None: the target is the label's own row (passing labels_local twice would
        # be a duplicate input, which torch.compile cannot trace)
        ctx.save_for_backward(embeddings, weight, labels_local, target_rows, dtarget, losses, lse)
        ctx.scale, ctx.normalize, ctx.options = scale, normalize, options
        return losses.to(compute_dtype(embeddings))

    @staticmethod
    def backward(ctx, grad_losses):
        embeddings, weight, labels_local, target_rows, dtarget, losses, lse = ctx.saved_tensors
        target_rows = labels_local if target_rows is None else target_rows
        grad_rows = torch.where(labels_local >= 0, grad_losses, torch.zeros_like(grad_losses))
        grad_embeddings, grad_weight = grads_from_lse(
            embeddings, weight, labels_local, lse, grad_rows, ctx.scale, ctx.normalize,
            need_weight_grad=ctx.needs_input_grad[1], **ctx.options,
        )
        target_grad = target_gradient(losses, dtarget, grad_rows, ctx.scale)
        grad_embeddings = apply_target_gradients(
            grad_embeddings, grad_weight, embeddings, weight, target_rows, target_grad, ctx.normalize,
            embeddings.dtype,
        )
        return grad_embeddings, grad_weight, None, None, None, None, None, None, None


def row_losses(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    target_logit: torch.Tensor,
    dtarget: torch.Tensor,
    scale: float,
    normalize: bool,
    *,
    modulation: Optional[NegativeModulation] = None,
    deterministic: bool = False,
    sub_centers: int = 1,
    target_rows: Optional[torch.Tensor] = None,
    chunk_elements: Optional[int] = None,
) -> torch.Tensor:
    """Per-row losses (B,) (0 where labels_local < 0), differentiable in both inputs.

    target_logit / dtarget (B,): ψ(cos θ_y) and dψ/dcos θ_y, precomputed by the spec.
    target_rows (B,): the weight row of each target (default labels_local; the winning
    sub-center's row with ``sub_centers > 1``). float32 out (float64 for float64 inputs).
    """
    options = dict(modulation=modulation, sub_centers=sub_centers, chunk_elements=chunk_elements)
    return _ChunkedMarginCE.apply(
        embeddings, weight, labels_local, target_rows, target_logit, dtarget, float(scale), normalize, options
    )
