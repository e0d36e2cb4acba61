"""The pure-PyTorch backend: margin cross-entropy chunked over classes.

The CPU path and the fallback everywhere (and the engine of sub-center heads). Same
algorithm as the Triton kernels: the forward keeps an online log-sum-exp per row, the
backward recomputes each chunk of logits. The largest temporaries are one chunk's
(B, n) logits and (n, D) unit weights, with n·(B·K + D) ≤ ``CHUNK_ELEMENTS`` (``CUDA_CHUNK_ELEMENTS``
on CUDA, where per-chunk host work would otherwise bound the step).
When every class fits one chunk (small B·C), ``row_losses`` takes the dense path instead:
the forward keeps its (B, C) logits and (C, D) unit weights for the backward, which then
skips the recomputation (one GEMM, the weight normalisation, the target mask).
Memory-budget mode (``memory_budget``, as the Triton backend's): the forward keeps the
exponentials of as many leading chunks as the budget holds, and the backward takes those
chunks' probabilities from them instead of recomputing the logits GEMM.

Backend protocol (``marginkit.backends``): ``lse_partials``, ``grads_from_lse``,
``row_losses``. ``sub_centers=K`` reads the weight as (C·K, D), K rows per class, and
takes each class's cosine as the max over its K rows (sub-center ArcFace).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch

from marginkit.autograd_guards import refuse_double_backward
from marginkit.backends.common import (
    apply_target_gradients,
    combine_partials,
    compute_dtype,
    inverse_norms,
    normalization_backward,
    target_classes,
    target_gradient,
    without_autocast,
)
from marginkit.modulation import NegativeModulation

#: the backward only reads the stored chunks: a retained graph's next backward reuses them
STORE_SURVIVES_BACKWARD = True

# Element budget of one chunk's temporaries (logits + unit weights): 2^21 floats = 8 MiB in fp32.
CHUNK_ELEMENTS = 1 << 21
#: On CUDA, 2^24 (64 MiB of fp32 per temporary, a few hundred MiB in flight): each chunk costs ~20
#: small ops of host time, so GPU-sized tiles (B = 1024, D = 512: 10 922 classes, 92 chunks at
#: C = 1M instead of 733) keep the GPU, not the host, the bound (notes/PERF.md, item 4).
CUDA_CHUNK_ELEMENTS = 1 << 24


def chunk_budget(device: torch.device, chunk_elements: Optional[int] = None) -> int:
    """Elements per chunk: the caller's, else ``CUDA_CHUNK_ELEMENTS`` on CUDA, ``CHUNK_ELEMENTS`` elsewhere."""
    if chunk_elements:
        return chunk_elements
    return CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge a (B, n) chunk of logits (−inf where excluded) into the running (max, Σexp).

    Returns (max, Σexp, shift (B,), exp(logits − shift) (B, n)); the exponentials are computed
    in place of ``logits`` (the memory-budget mode keeps them: p = exp(logit − shift)·exp(shift − lse)).
    """
    new_max = torch.maximum(row_max, logits.amax(dim=1))
    shift, scaled_exp = exp_below(logits, new_max)
    row_sumexp = row_sumexp * torch.exp(row_max - shift) + scaled_exp.sum(dim=1)
    return new_max, row_sumexp, shift, scaled_exp


def exp_below(logits: torch.Tensor, row_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift (B,), exp(logits − shift) (B, n) in place of ``logits``): shift is the row's max,
    or 0 where that max is −inf (no class: exp(−inf − −inf) would be NaN)."""
    shift = torch.where(torch.isinf(row_max), 0.0, row_max)
    return shift, logits.sub_(shift[:, None]).exp_()


def shift_factor(shift: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(shift − lse), the factor from exp(logit − shift) to p = exp(logit − lse).

    shift ≤ max logit ≤ lse, except on a row with no class here (all logits −inf), whose shift
    is 0: there exp(−lse) could overflow (lse = s·ψ < −88 in fp32) and 0·inf would be NaN.
    Clamping the exponent at 0 is exact elsewhere and gives such rows their 0 probabilities.
    """
    return torch.exp((shift - lse).clamp_max_(0.0))


def winner_dtype(sub_centers: int) -> torch.dtype:
    """The stored winning sub-center's dtype: the smallest that holds K − 1 (1 byte up to K = 256)."""
    return torch.uint8 if sub_centers <= 256 else torch.int32


def stored_chunk_bytes(num_rows: int, num_classes: int, element_size: int, sub_centers: int) -> int:
    """Bytes the memory-budget mode keeps for one chunk of ``num_classes`` classes: its (B, n)
    exponentials and (B,) shift, plus the (B, n) winning sub-center with ``sub_centers > 1``."""
    winner = num_rows * num_classes * winner_dtype(sub_centers).itemsize if sub_centers > 1 else 0
    return num_rows * (num_classes + 1) * element_size + winner


def _chunk_store_size(sub_centers: int) -> int:
    """Tensors stored per chunk: exponentials, shift (and the winning sub-center)."""
    return 3 if sub_centers > 1 else 2


def _unit_rows(weight, w_inv_norm, start, stop, sub_centers, dtype):
    """The unit weight rows (n·K, D) of classes [start, stop), in ``dtype``."""
    rows = slice(start * sub_centers, stop * sub_centers)
    return weight[rows].to(dtype) * w_inv_norm[rows, None]


def _scaled_cos_chunk(x_unit, weight, w_inv_norm, start, stop, labels_local, scale, modulation, sub_centers):
    """s·N(cos) of classes [start, stop).

    Returns (logits (B, n), w_unit (n·K, D), target (column (B, 1), owned (B, 1)) for
    ``fill_target_``, dN/dcos (B, n) or None, winning sub-center (B, n) or None).
    """
    w_unit = _unit_rows(weight, w_inv_norm, start, stop, sub_centers, x_unit.dtype)
    cos = x_unit @ w_unit.T
    winner = None
    if sub_centers > 1:
        cos, winner = cos.view(cos.shape[0], stop - start, sub_centers).max(dim=2)
    slope = None
    if modulation is not None:
        cos, slope = modulation.apply(cos)
    target = target_classes(labels_local[:, None] - start, stop - start)
    return cos.mul_(scale), w_unit, target, slope, winner


def fill_target_(t: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor], value: float) -> torch.Tensor:
    """``t`` (B, n) with ``value`` on each row's target column where the row owns one (``target``:
    ``common.target_classes`` of the chunk-relative labels): a (B,) scatter, not a (B, n) mask."""
    column, owned = target
    return t.scatter_(1, column, torch.where(owned, value, t.gather(1, column)))


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
    memory_budget: Optional[float] = 0,
    store: Optional[list] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (max, Σ exp(logit − max)) over this weight's non-target classes.
    ``memory_budget`` (bytes, None: no limit) and ``store`` (a list): the protocol's memory-budget
    mode. For as many leading class chunks as the budget holds (``stored_chunk_bytes`` each), the
    chunk's exp(logit − shift)·dN/dcos (B, n), its shift (B,) and, with sub-centers, its winning
    sub-center (B, n) are appended to ``store`` for ``grads_from_lse``, which then skips their
    logits GEMM. Nothing is kept with the default budget 0 or without a ``store``.

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
    budget = chunk_budget(embeddings.device, chunk_elements)
    # bytes left for stored chunks: None (unlimited) → inf; no store → nothing is kept
    room = 0.0 if store is None else (float("inf") if memory_budget is None else float(memory_budget))
    for start, stop in class_chunks(num_rows, num_classes, dim, budget, sub_centers):
        logits, _, target, slope, winner = _scaled_cos_chunk(
            x_unit, weight, w_inv_norm, start, stop, labels_local, scale, modulation, sub_centers
        )
        row_max, row_sumexp, shift, scaled_exp = online_lse_step(
            row_max, row_sumexp, fill_target_(logits, target, float("-inf"))
        )
        cost = stored_chunk_bytes(num_rows, stop - start, scaled_exp.element_size(), sub_centers)
        if cost <= room:  # whole chunks from the first on, as the backward's loop meets them
            room -= cost
            store.extend((scaled_exp.mul_(slope) if slope is not None else scaled_exp, shift))
            if sub_centers > 1:
                store.append(winner.to(winner_dtype(sub_centers)))
        else:
            room = 0.0
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
    store: Sequence[torch.Tensor] = (),
    grad_x_ready: Optional[Callable[[torch.Tensor], None]] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Non-target share of the gradients of Σ_i grad_rows_i · loss_i, given the global
    log-sum-exp ``lse`` (B,). The target column is left out (``common.apply_target_gradients``).
    ``store``: what ``lse_partials`` kept (its leading chunks need no logits GEMM; read, never
    changed, so a second backward can reuse it); ``grad_x_ready`` is called with the embedding
    gradient just before returning (nothing of the weight gradient is deferred here).

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
    budget = chunk_budget(embeddings.device, chunk_elements)
    per_chunk = _chunk_store_size(sub_centers)
    for index, (start, stop) in enumerate(class_chunks(num_rows, num_classes, dim, budget, sub_centers)):
        stored = store[index * per_chunk:(index + 1) * per_chunk]
        if stored:
            w_unit = _unit_rows(weight, w_inv_norm, start, stop, sub_centers, x_unit.dtype)
            scaled_exp, shift, *winners = stored
            winner = winners[0].long() if winners else None  # scatter_ takes int64 indices
            # p = exp(logit − shift)·exp(shift − lse); the forward folded dN/dcos in and zeroed the target
            grad_cos = scaled_exp * (shift_factor(shift[:, None], lse) * g_scaled)
        else:
            logits, w_unit, target, slope, winner = _scaled_cos_chunk(
                x_unit, weight, w_inv_norm, start, stop, labels_local, scale, modulation, sub_centers
            )
            # d loss / d cos_j = s·g·p_j (· dN/dcos_j when modulated) off the target column.
            grad_cos = logits.sub_(lse).exp_().mul_(g_scaled)
            if slope is not None:
                grad_cos.mul_(slope)
            fill_target_(grad_cos, target, 0.0)
        if winner is not None:  # each (row, class) gradient goes to its winning sub-center
            routed = torch.zeros(num_rows, stop - start, sub_centers, dtype=grad_cos.dtype, device=grad_cos.device)
            grad_cos = routed.scatter_(2, winner[:, :, None], grad_cos[:, :, None]).view(num_rows, (stop - start) * sub_centers)
        grad_x_unit.addmm_(grad_cos, w_unit)
        if grad_weight is not None:
            rows = slice(start * sub_centers, stop * sub_centers)
            if grad_weight.dtype == x_unit.dtype:  # the GEMM and the chain rule write the rows in place
                grad_unit = torch.mm(grad_cos.T, x_unit, out=grad_weight[rows])
            else:  # half-precision weights: computed in the compute dtype, then rounded
                grad_unit = grad_cos.T @ x_unit
            grad_unit = normalization_backward(grad_unit, weight[rows], w_inv_norm[rows], normalize, unit=w_unit)
            if grad_unit.dtype != grad_weight.dtype:
                grad_weight[rows] = grad_unit
    grad_embeddings = normalization_backward(grad_x_unit, embeddings, x_inv_norm, normalize)
    if grad_x_ready is not None:
        grad_x_ready(grad_embeddings)
    return grad_embeddings, grad_weight


def dense_fits(num_rows: int, num_classes: int, dim: int, sub_centers: int, budget: Optional[int] = None) -> bool:
    """Whether one chunk holds every class: then ``row_losses`` keeps (B, C) + (C, D) elements for the backward."""
    return sub_centers == 1 and num_rows > 0 and 0 < num_classes * (num_rows + dim) <= (budget or CHUNK_ELEMENTS)


@torch.no_grad()
def dense_forward(embeddings, weight, labels_local, scale, normalize, modulation):
    """(row_max, row_sumexp, saved) over every class at once; the same values as ``lse_partials``.

    saved = (x_inv, w_inv, x_unit, w_unit, shift (B,), exp(logit − shift) (B, C) with 0 on each
    row's target, slope or None): what ``dense_backward`` needs.
    """
    x_inv = inverse_norms(embeddings, normalize)
    x_unit = embeddings.to(x_inv.dtype) * x_inv[:, None]
    w_inv = inverse_norms(weight, normalize)
    w_unit = weight.to(x_unit.dtype) * w_inv[:, None]
    cos = x_unit @ w_unit.T
    slope = None
    if modulation is not None:
        cos, slope = modulation.apply(cos)
    logits = cos.mul_(scale)
    fill_target_(logits, target_classes(labels_local[:, None], weight.shape[0]), float("-inf"))
    row_max = logits.amax(dim=1)
    shift, scaled_exp = exp_below(logits, row_max)
    return row_max, scaled_exp.sum(dim=1), (x_inv, w_inv, x_unit, w_unit, shift, scaled_exp, slope)


@torch.no_grad()
def dense_backward(embeddings, weight, saved, lse, grad_rows, scale, normalize, need_weight_grad):
    """``grads_from_lse`` from the forward's saved exponentials: (grad_embeddings, grad_weight or None)."""
    x_inv, w_inv, x_unit, w_unit, shift, scaled_exp, slope = saved
    # p = exp(logit − lse) = exp(logit − shift)·exp(shift − lse): one (B, C) product, no second exp
    # (0 on the target column, whose exponential the forward already zeroed).
    row_factor = shift_factor(shift, lse.to(shift.dtype)) * (grad_rows.to(shift.dtype) * scale)
    grad_cos = scaled_exp * row_factor[:, None]
    if slope is not None:
        grad_cos.mul_(slope)
    grad_x_unit = grad_cos @ w_unit
    grad_w_unit = grad_cos.T @ x_unit if need_weight_grad else None
    del grad_cos  # (B, C): gone before the (C, D) chain rule needs its temporary
    grad_weight = None
    if grad_w_unit is not None:
        grad_weight = normalization_backward(grad_w_unit, weight, w_inv, normalize, unit=w_unit).to(weight.dtype)
    grad_embeddings = normalization_backward(grad_x_unit, embeddings, x_inv, normalize, unit=x_unit)
    return grad_embeddings, grad_weight


class _ChunkedMarginCE(torch.autograd.Function):
    """Per-row margin cross-entropy; saves O(B) tensors (plus what the dense path or the memory
    budget keeps) and recomputes the rest in backward."""

    @staticmethod
    def forward(
        ctx, embeddings, weight, labels_local, target_rows, target_logit, dtarget, scale, normalize, options,
        memory_budget,
    ):
        ctx.dense = dense_fits(
            embeddings.shape[0], weight.shape[0], embeddings.shape[1], options["sub_centers"],
            chunk_budget(embeddings.device, options["chunk_elements"]),
        )
        kept = []  # the dense path's saved tensors, or the memory-budget store
        if ctx.dense:
            row_max, row_sumexp, kept = dense_forward(
                embeddings, weight, labels_local, scale, normalize, options["modulation"]
            )
        else:
            row_max, row_sumexp = lse_partials(
                embeddings, weight, labels_local, scale, normalize, memory_budget=memory_budget, store=kept, **options
            )
        losses, lse = combine_partials(row_max, row_sumexp, target_logit, scale)
        losses = torch.where(labels_local >= 0, losses, 0.0)
        # target_rows None: the target is the label's own row (passing labels_local twice would
        # be a duplicate input, which torch.compile cannot trace)
        ctx.save_for_backward(embeddings, weight, labels_local, target_rows, dtarget, losses, lse, *kept)
        ctx.scale, ctx.normalize, ctx.options = scale, normalize, options
        return losses.to(compute_dtype(embeddings))

    @staticmethod
    @without_autocast
    def backward(ctx, grad_losses):
        refuse_double_backward()
        embeddings, weight, labels_local, target_rows, dtarget, losses, lse, *kept = ctx.saved_tensors
        target_rows = labels_local if target_rows is None else target_rows
        grad_rows = torch.where(labels_local >= 0, grad_losses, 0.0)
        if ctx.dense:
            grad_embeddings, grad_weight = dense_backward(
                embeddings, weight, kept, lse, grad_rows, ctx.scale, ctx.normalize, ctx.needs_input_grad[1]
            )
        else:
            grad_embeddings, grad_weight = grads_from_lse(
                embeddings, weight, labels_local, lse, grad_rows, ctx.scale, ctx.normalize,
                need_weight_grad=ctx.needs_input_grad[1], store=kept, **ctx.options,
            )
        target_grad = target_gradient(losses, dtarget, grad_rows, ctx.scale)
        grad_embeddings = apply_target_gradients(
            grad_embeddings, grad_weight, embeddings, weight, target_rows, target_grad, ctx.normalize,
            embeddings.dtype,
        )
        return grad_embeddings, grad_weight, None, None, None, None, None, None, None, None


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
    memory_budget: Optional[float] = 0,
) -> torch.Tensor:
    """Per-row losses (B,) (0 where labels_local < 0), differentiable in both inputs.

    target_logit / dtarget (B,): ψ(cos θ_y) and dψ/dcos θ_y, precomputed by the spec.
    target_rows (B,): the weight row of each target (default labels_local; the winning
    sub-center's row with ``sub_centers > 1``). float32 out (float64 for float64 inputs).
    memory_budget: bytes of exponentials the forward may keep for the backward (None: no
    limit; see ``lse_partials``); the dense path keeps its one chunk whatever it says.
    """
    options = dict(modulation=modulation, sub_centers=sub_centers, chunk_elements=chunk_elements)
    return _ChunkedMarginCE.apply(
        embeddings, weight, labels_local, target_rows, target_logit, dtarget, float(scale), normalize, options,
        memory_budget,
    )
