"""``row_losses`` as two ``torch.library`` custom ops (forward, backward) with fakes and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces through the Triton backend
and ``torch.library.opcheck`` passes.

The kernels give the non-target share; the target column's share is combined per row in
float64 (the merge kernel's COMBINE in the forward, ``target_column.apply_target_column`` in
the backward: the kernel twins of ``common.combine_partials`` and ``common.apply_target_gradients``),
so a 1e-7 loss is not rounded away.
A ``NegativeModulation`` crosses the op boundary as (threshold (B,), quadratic, linear).
"""

from __future__ import annotations

from typing import Optional

import torch

from marginkit.autograd_guards import refuse_double_backward
from marginkit.backends.common import as_float64, compute_dtype, without_autocast
from marginkit.backends.triton.budget import STORE_GROUP, store_scale, stored_classes
from marginkit.backends.triton.launch import cdiv
from marginkit.backends.triton.passes import backward, check_inputs, compute_operands, forward, inverse_norms
from marginkit.backends.triton.target_column import apply_target_column
from marginkit.modulation import NegativeModulation, slope_bound

__all__ = ["row_losses"]


def _modulation(threshold: Optional[torch.Tensor], quadratic: float, linear: float) -> Optional[NegativeModulation]:
    return None if threshold is None else NegativeModulation(threshold, quadratic, linear)


@torch.library.custom_op("marginkit::triton_margin_ce_rows", mutates_args=())
def _margin_ce_rows(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    target_logit: torch.Tensor,
    dtarget: torch.Tensor,
    scale: float,
    normalize: bool,
    deterministic: bool,
    n_stored: int,
    threshold: Optional[torch.Tensor] = None,
    quadratic: float = 0.0,
    linear: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses (B,) in the compute dtype, the same float64, lse (B,) f64, x_inv (B,) f32, w_inv (C,) f32,
    stored (B, n_stored), tile_max (B, ⌈n_stored/32⌉) f32); losses are 0 on rows not owned. stored/tile_max:
    the memory-budget mode's exp-scaled logits of classes [0, n_stored) (empty for n_stored = 0).
    The merge kernel forms the float64 loss from the partials and ψ (no torch op per row)."""
    check_inputs(embeddings, weight)
    x, w = compute_operands(embeddings, weight)
    x_inv, w_inv = inverse_norms(x, normalize), inverse_norms(w, normalize)
    modulation = _modulation(threshold, quadratic, linear)
    stored, tile_max = _stored_buffers(x, n_stored)
    sigma = store_scale(x.dtype, slope_bound(modulation))
    num_rows = embeddings.shape[0]
    losses_out = embeddings.new_empty((num_rows,), dtype=compute_dtype(embeddings))
    losses = embeddings.new_empty((num_rows,), dtype=torch.float64)
    lse = embeddings.new_empty((num_rows,), dtype=torch.float64)
    forward(
        x, w, x_inv, w_inv, labels_local, scale, deterministic, modulation,
        store=(stored, tile_max, sigma), combine=(as_float64(target_logit), losses, losses_out, lse),
    )
    return losses_out, losses, lse, x_inv, w_inv, stored, tile_max


def _stored_buffers(x: torch.Tensor, n_stored: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (B, n_stored) in the compute dtype and (B, ⌈n_stored/32⌉) fp32 (x: the compute operand)."""
    num_rows = x.shape[0]
    return (
        x.new_empty((num_rows, n_stored)),
        x.new_empty((num_rows, cdiv(n_stored, STORE_GROUP)), dtype=torch.float32),
    )


@_margin_ce_rows.register_fake
def _margin_ce_rows_fake(
    embeddings, weight, labels_local, target_logit, dtarget, scale, normalize, deterministic, n_stored,
    threshold=None, quadratic=0.0, linear=0.0,
):
    num_rows, num_classes = embeddings.shape[0], weight.shape[0]
    compute = embeddings.new_empty((0, 0), dtype=torch.float32 if embeddings.dtype == torch.float64 else None)
    return (
        embeddings.new_empty((num_rows,), dtype=compute_dtype(embeddings)),
        embeddings.new_empty((num_rows,), dtype=torch.float64),
        embeddings.new_empty((num_rows,), dtype=torch.float64),
        embeddings.new_empty((num_rows,), dtype=torch.float32),
        weight.new_empty((num_classes,), dtype=torch.float32),
        compute.new_empty((num_rows, n_stored)),
        compute.new_empty((num_rows, cdiv(n_stored, STORE_GROUP)), dtype=torch.float32),
    )


@torch.library.custom_op("marginkit::triton_margin_ce_rows_backward", mutates_args=())
def _margin_ce_rows_backward(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    dtarget: torch.Tensor,
    losses: torch.Tensor,
    lse: torch.Tensor,
    x_inv: torch.Tensor,
    w_inv: torch.Tensor,
    stored: torch.Tensor,
    tile_max: torch.Tensor,
    grad_rows: torch.Tensor,
    scale: float,
    normalize: bool,
    deterministic: bool,
    need_weight_grad: bool,
    threshold: Optional[torch.Tensor] = None,
    quadratic: float = 0.0,
    linear: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_embeddings in embeddings.dtype, grad_weight in weight.dtype) of Σ grad_rows·losses;
    grad_weight is (0, D) without ``need_weight_grad`` (frozen weights, IR-Softmax's centers: no dW GEMM).

    Kernels: the non-target share (the chunks in ``stored`` without recompute). Then one kernel
    finishes dX and adds the target column's share per row in float64 (g·s·(p_y − 1)·dψ,
    p_y − 1 = expm1(−loss)) to both gradients (``target_column.apply_target_column``).
    """
    x, w = compute_operands(embeddings, weight)
    modulation = _modulation(threshold, quadratic, linear)
    sigma = store_scale(x.dtype, slope_bound(modulation))
    grad_raw, grad_w, kappa = backward(
        x, w, x_inv, w_inv, labels_local, lse, grad_rows, scale, normalize, deterministic,
        modulation, need_weight_grad=need_weight_grad, store=(stored, tile_max, sigma), finish_grad_x=False,
    )
    if grad_w is not None and grad_w.dtype != weight.dtype:  # float64 inputs ran in float32 kernels
        grad_w = grad_w.to(weight.dtype)
    grad_x = apply_target_column(
        grad_raw, kappa, grad_w, embeddings, weight, labels_local, losses, dtarget, grad_rows, scale, normalize,
        embeddings.dtype,
    )
    return grad_x, (grad_w if need_weight_grad else weight.new_empty((0, weight.shape[1])))


@_margin_ce_rows_backward.register_fake
def _margin_ce_rows_backward_fake(
    embeddings, weight, labels_local, dtarget, losses, lse, x_inv, w_inv, stored, tile_max, grad_rows, scale,
    normalize, deterministic, need_weight_grad,
    threshold=None, quadratic=0.0, linear=0.0,
):
    grad_w = torch.empty_like(weight) if need_weight_grad else weight.new_empty((0, weight.shape[1]))
    return torch.empty_like(embeddings), grad_w


def _setup_context(ctx, inputs, output):
    embeddings, weight, labels_local, target_logit, dtarget, scale, normalize, deterministic, _, *modulation = inputs
    _, losses, lse, x_inv, w_inv, stored, tile_max = output
    ctx.save_for_backward(embeddings, weight, labels_local, dtarget, losses, lse, x_inv, w_inv, stored, tile_max)
    # no zero (B, C) gradient is ever made for the store (autograd would materialise one)
    ctx.mark_non_differentiable(losses, lse, x_inv, w_inv, stored, tile_max)
    ctx.set_materialize_grads(False)
    ctx.scale, ctx.normalize, ctx.deterministic = scale, normalize, deterministic
    ctx.modulation = modulation  # [threshold, quadratic, linear] when given


@without_autocast
def _autograd_backward(ctx, grad_losses, *_auxiliaries):
    refuse_double_backward()
    # the float64 losses, lse, the norms and the stored logits are saved auxiliaries, not differentiated through.
    embeddings, weight, labels_local, dtarget, losses, lse, x_inv, w_inv, stored, tile_max = ctx.saved_tensors
    if grad_losses is None:
        grad_losses = torch.zeros_like(losses, dtype=torch.float32)
    grad_rows = torch.where(labels_local >= 0, grad_losses, 0.0)  # labels_local is −1 or in [0, C)
    need_weight_grad = ctx.needs_input_grad[1]
    grad_x, grad_w = _margin_ce_rows_backward(
        embeddings, weight, labels_local, dtarget, losses, lse, x_inv, w_inv, stored, tile_max, grad_rows,
        ctx.scale, ctx.normalize, ctx.deterministic, need_weight_grad, *ctx.modulation,
    )
    return (grad_x, grad_w if need_weight_grad else None) + (None,) * (7 + len(ctx.modulation))


_margin_ce_rows.register_autograd(_autograd_backward, setup_context=_setup_context)


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
    memory_budget: Optional[float] = 0,
) -> torch.Tensor:
    """Per-row margin cross-entropy (B,), 0 where ``labels_local`` < 0; differentiable in
    ``embeddings`` and ``weight``.

    embeddings (B, D), weight (C, D): same dtype, or float32 master weights with fp16/bf16
    embeddings (weight.grad then float32). labels_local (B,) int64: the row's class, -1 for
    rows that take no part. target_logit / dtarget (B,): ψ(cos θ_y) and dψ/dcos θ_y from
    the margin spec (not differentiated; the target column's gradient g·s·(p_y − 1)·dψ is
    applied in the backward, in float64). ``modulation``: the non-target cosines' hook.
    Returns float32 losses (float64 for float64 inputs, which the kernels compute in float32).
    ``deterministic=True``: bitwise-reproducible results run to run, without touching torch's
    process-wide deterministic flag. ``memory_budget``: bytes the forward may keep for the
    backward to skip recomputing logits (0: none, the bounded workspace; None: unlimited,
    B·C·(element size + 1/8) bytes); see ``budget.py``.
    """
    extra = ()
    if modulation is not None:
        extra = (modulation.threshold.detach(), float(modulation.quadratic), float(modulation.linear))
    compute_size = 4 if embeddings.dtype == torch.float64 else embeddings.element_size()
    n_stored = stored_classes(embeddings.shape[0], weight.shape[0], compute_size, memory_budget)
    losses, *_ = torch.ops.marginkit.triton_margin_ce_rows(
        embeddings, weight, labels_local, _constant(target_logit), _constant(dtarget),
        float(scale), bool(normalize), bool(deterministic), n_stored, *extra,
    )
    return losses


def _constant(t: torch.Tensor) -> torch.Tensor:
    """t without autograd history (detach only when it has some: each op is host work on CUDA)."""
    return t.detach() if t.requires_grad else t
