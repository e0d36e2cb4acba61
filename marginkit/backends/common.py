"""Per-row pieces every fused backend shares: row norms and the target cosine.

These are O(B·D) or O(C) computations done in plain torch; the (B, C) work lives
in the backends.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

# Rows with a smaller norm are treated as having this norm (as F.normalize's eps).
NORM_EPS = 1e-12


def without_autocast(backward):
    """An autograd backward that runs with autocast off, as its forward did (``_pipeline.no_autocast``):
    a ``loss.backward()`` called inside ``torch.autocast`` would otherwise run the backward's GEMMs
    in the autocast dtype (gradients ~4e-2 off at C = 300K in bf16)."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        if torch.compiler.is_compiling():
            # Unconditionally: dynamo may see autocast off here while AOT autograd then traces the
            # backward under the caller's autocast (compiled inside `with torch.autocast(...)`),
            # which recast its GEMMs to bf16 (2.6e-3 off, or a dtype error in the chunked path).
            with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                return backward(ctx, *grads)
        active = [device for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]
        if not active:
            return backward(ctx, *grads)
        with contextlib.ExitStack() as stack:
            for device in active:
                stack.enter_context(torch.autocast(device, enabled=False))
            return backward(ctx, *grads)

    return run


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (gradcheck), float32 for everything else."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def inverse_norms(rows: torch.Tensor, normalize: bool) -> torch.Tensor:
    """1/‖row‖ in the compute dtype for each row of a (N, D) tensor (ones when normalize=False)."""
    dtype = compute_dtype(rows)
    if not normalize:
        return torch.ones(rows.shape[0], dtype=dtype, device=rows.device)
    # dtype= instead of rows.to(dtype): on CUDA the reduction widens bf16/fp16 as it reads,
    # where a cast would first copy all of W in float32 (2 GB at C = 1M, D = 512).
    return torch.linalg.vector_norm(rows, dim=1, dtype=dtype).clamp_min(NORM_EPS).reciprocal()


def as_float64(t: torch.Tensor) -> torch.Tensor:
    """t in float64; no op at all when it already is (each op is host work on CUDA)."""
    return t if t.dtype == torch.float64 else t.to(torch.float64)


def target_classes(labels_local: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(class of each row clamped into [0, C) (B,) int64, owned (B,) bool): owned is labels_local in
    [0, C) (a clamped label equals itself only there), so rows not here index a real row harmlessly."""
    classes = labels_local.clamp(0, num_classes - 1)
    return classes, classes == labels_local


@torch.no_grad()
def target_cosine(
    embeddings: torch.Tensor, weight: torch.Tensor, labels_local: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """cos θ between each row and its own class weight, (B,) float64.

    Rows whose ``labels_local`` is outside [0, C) (ignored, or owned by another
    shard) get 0. A B×D gather-dot, computed in float64 from the stored values.
    """
    if weight.shape[0] == 0:
        return torch.zeros(labels_local.shape, dtype=torch.float64, device=labels_local.device)
    classes, owned = target_classes(labels_local, weight.shape[0])
    x = as_float64(embeddings)
    w = weight.index_select(0, classes).to(torch.float64)
    dot = (x * w).sum(dim=1)
    if normalize:  # both norms in one reduction: ‖x‖·‖w‖ = the product over the stacked pair
        dot = dot / torch.linalg.vector_norm(torch.stack((x, w)), dim=2).clamp_min(NORM_EPS).prod(dim=0)
    return torch.where(owned, dot, 0.0)


@torch.no_grad()
def sub_center_target(
    embeddings: torch.Tensor, weight: torch.Tensor, labels_local: torch.Tensor, k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos θ_y (B,) float64, winning weight row y·K + k* (B,) int64) for a (C·K, D) weight of
    K sub-centers per class: the closest sub-center is the target. 0 / -1 on rows not owned."""
    owned = labels_local >= 0
    safe = torch.where(owned, labels_local, torch.zeros_like(labels_local))
    rows = safe[:, None] * k + torch.arange(k, device=labels_local.device)[None, :]
    x = embeddings.to(torch.float64)
    w = weight.index_select(0, rows.reshape(-1)).to(torch.float64).view(x.shape[0], k, weight.shape[1])
    dots = torch.einsum("bd,bkd->bk", x, w)
    if normalize:
        dots = dots / (
            torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(NORM_EPS)
            * torch.linalg.vector_norm(w, dim=2).clamp_min(NORM_EPS)
        )
    cos, best = dots.max(dim=1)
    cos = torch.where(owned, cos, torch.zeros_like(cos))
    winner = torch.where(owned, safe * k + best, torch.full_like(safe, -1))
    return cos, winner


def normalization_backward(
    grad_unit: torch.Tensor, rows: torch.Tensor, inv_norm: torch.Tensor, normalize: bool,
    unit: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Chain rule of r̂ = r/‖r‖: dr = (dr̂ − r̂·(dr̂·r̂))/‖r‖, row-wise, in grad_unit's dtype.

    Overwrites and returns ``grad_unit`` (N, D), which callers pass as a fresh product: one (N, D)
    temporary instead of three (at C = 1M, D = 512 each is 2 GB in fp32).
    ``unit``: r̂ (N, D) when the caller already holds it (else recomputed from rows and inv_norm)."""
    if not normalize:
        return grad_unit
    if unit is None:
        unit = rows.to(grad_unit.dtype) * inv_norm[:, None]
    radial = (grad_unit * unit).sum(dim=1, keepdim=True)
    return grad_unit.addcmul_(unit, radial, value=-1.0).mul_(inv_norm[:, None])


def combine_partials(
    row_max: torch.Tensor, row_sumexp: torch.Tensor, target_logit: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse) in float64 from the non-target partials and the target logit ψ.

    loss = log(1 + Σ_{j≠y} exp(l_j − l_y)) = softplus(max + log(sumexp) − s·ψ): exact even
    for well-classified rows, where lse − l_y in fp32 would round a 1e-7 loss to 0.
    """
    target = scale * as_float64(target_logit)
    # log(0) = -inf when there is no other class: softplus(-inf) = 0, the right loss.
    excess = row_max.to(torch.float64) + torch.log(row_sumexp.to(torch.float64)) - target
    # softplus as logaddexp(x, 0) = max(x, 0) + log1p(e^−|x|), without torch softplus's
    # threshold (20), which drops log1p(e^-x) ~ 2e-9 in float64.
    losses = torch.logaddexp(excess, torch.zeros_like(excess))
    return losses, target + losses


def target_gradient(losses: torch.Tensor, dtarget: torch.Tensor, grad_rows: torch.Tensor, scale: float) -> torch.Tensor:
    """d(Σ g·loss)/d cos θ_y per row: g·s·(p_y − 1)·dψ/dcos, with p_y − 1 = expm1(−loss)."""
    return (as_float64(grad_rows) * scale) * torch.expm1(-as_float64(losses)) * as_float64(dtarget)


def _target_share(
    embeddings: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor, coef: torch.Tensor, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/dx, d/dw of the row's target weight) (B, D) float64 each, for d/d cos θ_y = coef (B,)."""
    c = coef[:, None]
    if not normalize:
        return c * weight.index_select(0, classes).to(torch.float64), c * as_float64(embeddings)
    # (2, B, D): both rows through each op at once; in place where it can, so the float64
    # temporaries peak at three pairs (24 MiB at B = 1024, D = 512)
    pair = torch.stack((as_float64(embeddings), weight.index_select(0, classes).to(torch.float64)))
    norms = torch.linalg.vector_norm(pair, dim=2, keepdim=True).clamp_min(NORM_EPS)
    unit = pair.div_(norms)
    cos = unit.prod(dim=0).sum(dim=1, keepdim=True)
    # [ŵ − x̂·cos, x̂ − ŵ·cos] / [‖x‖, ‖w‖]: each tangent direction over its own norm
    grads = unit.flip(0).sub_(unit * cos).mul_(c / norms)
    return grads[0], grads[1]


@torch.no_grad()
def target_backward(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    target_grad: torch.Tensor,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target column's share of the gradients, in float64.

    target_grad (B,) is d/d cos θ_y per row. Returns (grad_embeddings (B, D), classes (B,),
    grad_weight_rows (B, D)): row i's contribution to the weight gradient of class
    ``classes[i]`` (zero where the row's target is not in this weight);
    nothing of size C × D is allocated. Done apart from the (B, C) tiles because
    dψ/dcos reaches ~1e3 near cos = ±1 (ArcFace, SphereFace), where the tangent direction
    ŵ − x̂·cos is a small difference of near-equal vectors: float64 keeps it exact.
    """
    classes, owned = target_classes(labels_local, weight.shape[0])
    coef = torch.where(owned, as_float64(target_grad), 0.0)
    grad_embeddings, grad_weight_rows = _target_share(embeddings, weight, classes, coef, normalize)
    return grad_embeddings, classes, grad_weight_rows


#: Float64 elements per temporary of the target path (8 MiB): rows go in chunks of this / D.
TARGET_CHUNK_ELEMENTS = 1 << 20


@torch.no_grad()
def apply_target_gradients(
    grad_embeddings: torch.Tensor,
    grad_weight: Optional[torch.Tensor],
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    target_grad: torch.Tensor,
    normalize: bool,
    out_dtype: torch.dtype,
    rows_per_chunk: Optional[int] = None,
) -> torch.Tensor:
    """Add the target column's share (``target_backward``) to both gradients.

    Returns grad_embeddings + its target share (B, D), summed in float64 and rounded once
    to ``out_dtype``. Into ``grad_weight`` (C, D), in place, goes the target share of each
    class, its rows summed in float64 first and rounded once (no sum of roundings when a
    class has several rows); None skips it.

    Rows go in chunks (``TARGET_CHUNK_ELEMENTS`` / D rows), so the float64 work holds one
    (B, D) float64 buffer (the per-class sums) and chunk-sized temporaries, not a handful
    of (B, D) ones; one chunk (B·D ≤ 2^20, e.g. B = 1024, D = 512) slices nothing. No host
    sync: a row's group is where its class first appears in the sorted classes, and every
    row of a group writes the same final value, so duplicate writes agree whatever their order.
    """
    num_rows, dim = embeddings.shape
    if num_rows == 0 or weight.shape[0] == 0:  # no target here: a fresh copy, as on every other path
        return grad_embeddings.to(out_dtype, copy=True)
    step = rows_per_chunk or max(1, TARGET_CHUNK_ELEMENTS // max(dim, 1))
    # Under torch.compile one piece whatever B: a range over the (symbolic, with dynamic=True) row
    # count would pin it, a recompile per batch size (dynamo cannot tell a SymInt here). Inductor fuses
    # the float64 temporaries (+55 MiB at B = 32768, D = 512; eager's pieces +141; aot_eager +530).
    whole = torch.compiler.is_compiling() or step >= num_rows
    starts = [0] if whole else range(0, num_rows, step)
    classes, owned = target_classes(labels_local, weight.shape[0])
    coef = torch.where(owned, as_float64(target_grad), 0.0)
    if grad_weight is not None:
        group = torch.searchsorted(torch.sort(classes).values, classes)  # (B,) in [0, B)
        group_sums = torch.zeros((num_rows, dim), dtype=torch.float64, device=embeddings.device)
        current = grad_weight.index_select(0, classes)  # every read before any write
    pieces = []
    for r0 in starts:
        part = (lambda t: t) if whole else (lambda t, rows=slice(r0, r0 + step): t[rows])
        target_dx, target_dw = _target_share(part(embeddings), weight, part(classes), part(coef), normalize)
        pieces.append((as_float64(part(grad_embeddings)) + target_dx).to(out_dtype))
        if grad_weight is not None:
            # index_put_(accumulate) is deterministic on CUDA too (index_add_ there uses float atomics)
            group_sums.index_put_((part(group),), target_dw, accumulate=True)
    if grad_weight is not None:
        for r0 in starts:
            part = (lambda t: t) if whole else (lambda t, rows=slice(r0, r0 + step): t[rows])
            updated = as_float64(part(current)) + group_sums.index_select(0, part(group))
            grad_weight.index_put_((part(classes),), updated.to(grad_weight.dtype))
    return pieces[0] if whole else torch.cat(pieces)
