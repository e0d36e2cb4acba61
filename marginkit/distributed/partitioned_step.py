"""One step of the class-sharded margin softmax: the autograd Function and its plan.

On every rank r of W (B = global batch rows, D = embedding size, C_r = r's classes):

forward
  1. (module) sizes and errors: an all-gather of a few int64 per rank read on the host, or,
     with a declared ``max_local_batch`` M, nothing: every rank sends M rows.
  2. all-gather of the local rows, embeddings and labels packed as raw bytes.
  3. local: Partial FC sample, the target terms (``_pipeline.target_terms``, non-zero where
     r owns the label) and the backend's non-target partials over r's classes.
  4. all-reduce (sum) of 2·B float64 (+2 with M declared: the configuration digest); the
     shift is ``scale`` when normalize=True and scale <= 300, else an all-reduce (max) first.
  5. ``combine_partials``: per-row loss and log-sum-exp, the same bits on every rank.
backward
  6. local: ``grads_from_lse``: every chunk's share of the embedding gradient first, then
     (``grad_x_ready``) its target column's share added,
  7. reduce-scatter of the B×D embedding gradient (float32, or ``grad_reduce_dtype``),
     started asynchronously from inside ``grads_from_lse``: the Triton backend's deferred dW
     GEMMs (the stored chunks', the last chunk's) and the weight side (its target share, the
     Partial FC gradient layout) run while it is on the wire.

Memory-budget mode (``StepPlan.memory_budget``): the forward's ``lse_partials`` stores the
exp-scaled logits of as many whole chunks of the local (sampled, with Partial FC) weight as
the budget holds, saved for the backward; the first backward consumes them (Triton's in place),
so a second backward through the same graph (``retain_graph=True``) recomputes every chunk.

The Function touches no module state: it returns what it sampled and a device-side record
of what went wrong (bad labels, a rank's rejected input, a configuration digest mismatch).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch
import torch.distributed as dist

from marginkit._pipeline import per_row_margins, target_terms
from marginkit.modulation import interclass_filter
from marginkit.backends.common import (
    apply_target_gradients, combine_partials, compute_dtype, target_gradient, without_autocast,
)
from marginkit.autograd_guards import refuse_double_backward
from marginkit.ops import partial_fc_sample
from marginkit.distributed import collectives as coll
from marginkit.distributed.device_sampling import sample_classes
from marginkit.specs import MarginSpec
from marginkit.validation import out_of_range

__all__ = ["StepPlan", "PartitionedMarginCE", "POISON", "LOWEST_SENT_LABEL", "RECORD_FIELDS"]

# exp(-2·scale) must stay well inside float64's range for the fixed-shift combine.
FIXED_SHIFT_MAX_SCALE = 300.0

#: Label a rank sends in place of its rows when it rejected its own input (+ the error kind 0-2):
#: int64's three lowest values. Real labels are sent clamped at LOWEST_SENT_LABEL, so that even those
#: (a NaN or inf cast to int64 is POISON) are reported as out of range, never as a rejected input.
POISON = -(1 << 63)
LOWEST_SENT_LABEL = POISON + 3

#: The device-side record of a step, read by the host one call later (int64 each).
RECORD_FIELDS = ("bad_label", "bad_value", "poisoned", "poison_rank", "poison_kind", "digest_mismatch")


@dataclass
class StepPlan:
    """What one step needs besides the differentiable inputs (no reference to the module)."""

    engine: ModuleType
    group: Optional[dist.ProcessGroup]
    world: int
    rank: int
    num_classes: int
    class_start: int
    class_stop: int
    margin: MarginSpec
    scale: float
    normalize: bool
    ignore_index: int
    class_margins: Optional[torch.Tensor]
    grad_factor: float
    grad_reduce_dtype: Optional[torch.dtype]
    sparse_grad: bool
    filter_threshold: float  # insightface's inter-class filtering (0: off)
    # layout: host sizes of every rank (sizes known), or a declared block of M rows per rank
    sizes: Optional[list]
    block_rows: Optional[int]
    pad_label: int
    # sampling: None (all classes), "host" (csrc op, data-dependent size) or "device" (fixed size)
    sampling: Optional[str] = None
    num_sample: int = 0
    sample_size: int = 0
    digest: Optional[int] = None  # with block_rows: this rank's configuration digest (20 bits)
    memory_budget: Optional[float] = 0  # bytes of stored logits kept for the backward (None: no limit)


def _gather(local_x: torch.Tensor, local_labels: torch.Tensor, plan: StepPlan):
    """(x (N, D), labels (N,)) of the global batch; N = B (sizes) or W·M (declared block)."""
    dtype, dim = local_x.dtype, local_x.shape[1]
    local_labels = local_labels.clamp_min(LOWEST_SENT_LABEL)  # off the reject marker (pads are added below)
    if plan.block_rows is not None:
        pad = plan.block_rows - local_x.shape[0]
        local_x = torch.cat([local_x.detach(), local_x.new_zeros((pad, dim))])
        local_labels = torch.cat([local_labels, local_labels.new_full((pad,), plan.pad_label)])
    packed = torch.cat([coll.to_byte_rows(local_x), coll.to_byte_rows(local_labels)], dim=1)
    if plan.block_rows is not None:
        packed = coll.all_gather_padded(packed, plan.block_rows, plan.group)
    else:
        packed = coll.all_gather_rows(packed, plan.sizes, plan.group)
    row_bytes = dim * local_x.element_size()
    return (coll.from_byte_rows(packed[:, :row_bytes], dtype, (dim,)),
            coll.from_byte_rows(packed[:, row_bytes:], torch.int64, ()))


def _sample(labels: torch.Tensor, valid: torch.Tensor, seed: torch.Tensor, plan: StepPlan):
    """(index or None, labels_local): this shard's classes for the step and each row's column."""
    start, stop = plan.class_start, plan.class_stop
    if plan.sampling is None:
        owned = valid & (labels >= start) & (labels < stop)
        return None, torch.where(owned, labels - start, torch.full_like(labels, -1))
    candidates = torch.where(valid, labels, torch.full_like(labels, -1))
    if plan.sampling == "device":
        return sample_classes(candidates, start, stop, plan.sample_size, seed)
    return partial_fc_sample(candidates, start, stop, plan.num_sample, int(seed))  # one sync, by design


def _at(values: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """values[position] for a 0-d device index without reading it on the host."""
    return values.gather(0, position.reshape(1)).reshape(())


def _record(labels, bad, poisoned, mismatch, plan: StepPlan) -> torch.Tensor:
    """(len(RECORD_FIELDS),) int64 on the device: what the host raises at the next call."""
    zero = torch.zeros((), dtype=torch.int64, device=labels.device)
    if not labels.numel():
        return torch.stack([zero, zero, zero, zero, zero, mismatch.to(torch.int64)])
    first_bad = bad.to(torch.int8).argmax()
    first_poison = poisoned.to(torch.int8).argmax()
    block = plan.block_rows or 1
    return torch.stack([
        bad.any().to(torch.int64), _at(labels, first_bad), poisoned.any().to(torch.int64),
        first_poison // block, _at(labels, first_poison) - POISON, mismatch.to(torch.int64),
    ])


class PartitionedMarginCE(torch.autograd.Function):
    """(local_x (b, D), weight (C_r, D), local_labels (b,), seed 0-d) ->
    (losses (N,), live rows (N,) bool, sampled local ids (S,), record (6,) int64)."""

    @staticmethod
    def forward(ctx, local_x, weight, local_labels, seed, plan: StepPlan):
        x, labels = _gather(local_x, local_labels, plan)
        poisoned = labels <= POISON + 2
        bad = out_of_range(labels, plan.num_classes, plan.ignore_index) & ~poisoned
        valid = (labels != plan.ignore_index) & ~bad & ~poisoned
        index, labels_local = _sample(labels, valid, seed, plan)
        w = weight if index is None else weight.index_select(0, index)
        owned = labels_local >= 0

        margins = None
        if plan.class_margins is not None and plan.class_margins.numel():
            # local class ids; -1 where not owned (never ignore_index: a local id may equal it)
            cls = torch.where(owned & valid, labels - plan.class_start, torch.full_like(labels, -1))
            margins = per_row_margins(cls, -1, plan.class_margins, None)
        dtype = compute_dtype(x)
        # Filtering applies to every labelled row of the global batch on every rank, as in insightface's
        # Partial FC (it clears the target column only on the rank that owns the class).
        modulation = interclass_filter(valid, plan.filter_threshold, dtype) if plan.filter_threshold > 0 else None
        store: list = []  # the backend's stored logits (memory-budget mode), saved for the backward
        if w.shape[0]:
            psi, dpsi, _, _ = target_terms(x, w, labels_local, plan.margin, margins, plan.normalize)
            row_max, row_sumexp = plan.engine.lse_partials(
                x, w, labels_local, plan.scale, plan.normalize, modulation=modulation,
                memory_budget=plan.memory_budget, store=store,
            )
        else:  # no class here (C < W): empty partials, no owned row
            psi = dpsi = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            row_max = torch.full((x.shape[0],), float("-inf"), dtype=dtype, device=x.device)
            row_sumexp = torch.zeros(x.shape[0], dtype=dtype, device=x.device)

        zero = torch.zeros_like(psi)
        row_max64 = row_max.to(torch.float64)
        if plan.normalize and plan.scale <= FIXED_SHIFT_MAX_SCALE:
            shift = torch.full_like(row_max64, plan.scale)
        else:
            shift = coll.all_reduce_(row_max.clone(), dist.ReduceOp.MAX, plan.group).to(torch.float64)
        rescale = torch.exp(row_max64 - torch.where(torch.isinf(shift), zero, shift))
        sumexp = torch.where(row_sumexp > 0, row_sumexp.to(torch.float64) * rescale, zero)
        payload = torch.stack([sumexp, psi]).reshape(-1)
        if plan.digest is not None:  # Σd and Σd² equal W·d and W·d² on every rank iff all digests agree
            d = float(plan.digest)
            payload = torch.cat([payload, payload.new_tensor([d, d * d])])
        payload = coll.all_reduce_(payload, dist.ReduceOp.SUM, plan.group)
        rows = x.shape[0]
        losses, lse = combine_partials(shift, payload[:rows], payload[rows : 2 * rows], plan.scale)
        mismatch = torch.zeros((), dtype=torch.bool, device=x.device)
        if plan.digest is not None:
            mismatch = (payload[2 * rows] != plan.world * d) | (payload[2 * rows + 1] != plan.world * d * d)
        live = valid & ~poisoned.any() & ~mismatch  # a poisoned or mismatched step changes nothing
        losses = torch.where(live, losses, zero)
        record = _record(labels, bad, poisoned, mismatch, plan)

        sampled = index if index is not None else labels_local.new_empty(0)
        ctx.save_for_backward(x, w, labels_local, live, dpsi, losses, lse, sampled, *store)
        ctx.modulation = modulation
        ctx.store_spent = False
        ctx.plan, ctx.local_dtype, ctx.local_rows, ctx.weight_shape = plan, local_x.dtype, local_x.shape[0], weight.shape
        ctx.mark_non_differentiable(live, sampled, record)
        return losses.to(compute_dtype(local_x)), live, sampled, record

    @staticmethod
    @without_autocast
    def backward(ctx, grad_losses, _live, _sampled, _record):
        refuse_double_backward()
        x, w, labels_local, live, dpsi, losses, lse, index, *store = ctx.saved_tensors
        plan = ctx.plan
        if ctx.store_spent:  # retain_graph: the first backward overwrote the stored logits; recompute
            store = ()
        # spent for every later backward, not just the next, where the backend overwrites it
        ctx.store_spent = ctx.store_spent or (bool(store) and not plan.engine.STORE_SURVIVES_BACKWARD)
        need_w = ctx.needs_input_grad[1]
        dtype = compute_dtype(x)
        grad_rows = torch.where(live, grad_losses, torch.zeros_like(grad_losses))
        grad_w = tgrad = None
        pending = []

        def start_reduce_scatter(grad_x_share: torch.Tensor) -> None:
            grad_x = grad_x_share
            if tgrad is not None:
                grad_x = apply_target_gradients(grad_x, None, x, w, labels_local, tgrad, plan.normalize, dtype)
            if plan.grad_factor != 1.0:
                grad_x = grad_x * plan.grad_factor
            pending.append(_reduce_scatter_rows(grad_x.to(plan.grad_reduce_dtype or dtype), ctx.local_rows, plan))

        if w.shape[0]:
            tgrad = target_gradient(losses, dpsi, grad_rows, plan.scale)
            # 7. launched by the backend once dX is final, ahead of its deferred dW GEMMs
            _, grad_w = plan.engine.grads_from_lse(
                x, w, labels_local, lse, grad_rows, plan.scale, plan.normalize, need_weight_grad=need_w,
                modulation=ctx.modulation, store=store, grad_x_ready=start_reduce_scatter,
            )
            if len(pending) != 1:
                raise RuntimeError(f"backend {plan.engine.__name__} called grad_x_ready {len(pending)} times, not once")
        else:
            start_reduce_scatter(torch.zeros(x.shape, dtype=dtype, device=x.device))
        if need_w:
            grad_w = _weight_gradient(grad_w, x, w, labels_local, tgrad, index, ctx, plan)
        grad_local = pending[0].wait().to(ctx.local_dtype)
        return grad_local, grad_w, None, None, None


def _reduce_scatter_rows(grad_x: torch.Tensor, local_rows: int, plan: StepPlan):
    """Start the async reduce-scatter of the (N, D) embedding gradient; ``.wait()`` gives this rank's rows."""
    if plan.block_rows is not None:
        return coll.reduce_scatter_padded(grad_x, local_rows, plan.rank, plan.group, async_op=True)
    return coll.sum_rows_to_owner(grad_x, plan.sizes, plan.rank, plan.group, async_op=True)


def _weight_gradient(grad_w, x, w, labels_local, tgrad, index, ctx, plan: StepPlan):
    """The shard's weight gradient: the target column's share added, in the layout asked for
    (dense (C_r, D); with Partial FC the sampled rows scattered, or a sparse COO tensor)."""
    if grad_w is None:
        grad_w = torch.zeros_like(w)
    elif tgrad is not None:
        apply_target_gradients(x.new_zeros(()).expand(x.shape), grad_w, x, w, labels_local, tgrad,
                               plan.normalize, compute_dtype(x))
    if plan.sampling is None:
        return grad_w
    if plan.sparse_grad:  # (S, D) values: no C_r × D gradient is ever written
        return torch.sparse_coo_tensor(index[None], grad_w, ctx.weight_shape, is_coalesced=True,
                                       check_invariants=False)
    return grad_w.new_zeros(ctx.weight_shape).index_copy_(0, index, grad_w)
