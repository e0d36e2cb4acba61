"""Per-row pieces every fused backend shares: row norms and the target cosine.

These are O(B·D) or O(C) computations done in plain torch; the (B, C) work lives
in the backends.
"""

from __future__ import annotations

from typing import Optional

import torch

# Rows with a smaller norm are treated as having this norm (as F.normalize's eps).
NORM_EPS = 1e-12


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


def owned_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels with ignored rows mapped to -1 (the single-shard `labels_local`)."""
    return torch.where(labels == ignore_index, torch.full_like(labels, -1), labels)


@torch.no_grad()
def target_cosine(
    embeddings: torch.Tensor, weight: torch.Tensor, labels_local: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """cos θ between each row and its own class weight, (B,) float64.

    Rows whose ``labels_local`` is outside [0, C) (ignored, or owned by another
    shard) get 0. A B×D gather-dot, computed in float64 from the stored values.
    """
    owned = (labels_local >= 0) & (labels_local < weight.shape[0])
    safe = torch.where(owned, labels_local, torch.zeros_like(labels_local))
    x = embeddings.to(torch.float64)
    w = weight.index_select(0, safe).to(torch.float64)
    dot = (x * w).sum(dim=1)
    if normalize:
        dot = dot / (
            torch.linalg.vector_norm(x, dim=1).clamp_min(NORM_EPS)
            * torch.linalg.vector_norm(w, dim=1).clamp_min(NORM_EPS)
        )
    return torch.where(owned, dot, torch.zeros_like(dot))


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

    ``unit``: r̂ (N, D) when the caller already holds it (else recomputed from rows and inv_norm)."""
    if not normalize:
        return grad_unit
    if unit is None:
        unit = rows.to(grad_unit.dtype) * inv_norm[:, None]
    radial = (grad_unit * unit).sum(dim=1, keepdim=True)
    return (grad_unit - unit * radial) * inv_norm[:, None]


def combine_partials(
    row_max: torch.Tensor, row_sumexp: torch.Tensor, target_logit: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse) in float64 from the non-target partials and the target logit ψ.

    loss = log(1 + Σ_{j≠y} exp(l_j − l_y)) = softplus(max + log(sumexp) − s·ψ): exact even
    for well-classified rows, where lse − l_y in fp32 would round a 1e-7 loss to 0.
    """
    target = scale * target_logit.to(torch.float64)
    # log(0) = -inf when there is no other class: softplus(-inf) = 0, the right loss.
    excess = row_max.to(torch.float64) + torch.log(row_sumexp.to(torch.float64)) - target
    # softplus without torch's threshold (20), which drops log1p(e^-x) ~ 2e-9 in float64.
    losses = excess.clamp_min(0.0) + torch.log1p(torch.exp(-excess.abs()))
    return losses, target + losses


def target_gradient(losses: torch.Tensor, dtarget: torch.Tensor, grad_rows: torch.Tensor, scale: float) -> torch.Tensor:
    """d(Σ g·loss)/d cos θ_y per row: g·s·(p_y − 1)·dψ/dcos, with p_y − 1 = expm1(−loss)."""
    return grad_rows.to(torch.float64) * scale * torch.expm1(-losses.to(torch.float64)) * dtarget.to(torch.float64)


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
    owned = (labels_local >= 0) & (labels_local < weight.shape[0])
    classes = torch.where(owned, labels_local, torch.zeros_like(labels_local))
    coef = torch.where(owned, target_grad.to(torch.float64), torch.zeros_like(target_grad, dtype=torch.float64))
    x = embeddings.to(torch.float64)
    w = weight.index_select(0, classes).to(torch.float64)
    if not normalize:
        return coef[:, None] * w, classes, coef[:, None] * x
    x_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(NORM_EPS)
    w_norm = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(NORM_EPS)
    x_unit, w_unit = x / x_norm, w / w_norm
    cos = (x_unit * w_unit).sum(dim=1, keepdim=True)
    grad_embeddings = coef[:, None] * (w_unit - x_unit * cos) / x_norm
    grad_weight_rows = coef[:, None] * (x_unit - w_unit * cos) / w_norm
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
    of (B, D) ones. No host sync: rows are grouped by class with a sort, and every row of a
    group writes the same final value, so duplicate writes agree whatever their order.
    """
    num_rows, dim = embeddings.shape
    step = rows_per_chunk or max(1, TARGET_CHUNK_ELEMENTS // max(dim, 1))
    out = torch.empty((num_rows, dim), dtype=out_dtype, device=embeddings.device)
    if grad_weight is not None and num_rows:
        owned = (labels_local >= 0) & (labels_local < weight.shape[0])
        classes = torch.where(owned, labels_local, torch.zeros_like(labels_local))
        order = torch.argsort(classes, stable=True)
        sorted_classes = classes[order]
        starts = torch.ones_like(sorted_classes, dtype=torch.bool)
        starts[1:] = sorted_classes[1:] != sorted_classes[:-1]
        group = torch.cumsum(starts, dim=0) - 1  # group of each row, in sorted order
        group_of_row = torch.empty_like(group).index_copy_(0, order, group)
        group_sums = torch.zeros((num_rows, dim), dtype=torch.float64, device=embeddings.device)
    for r0 in range(0, num_rows, step):
        r1 = min(r0 + step, num_rows)
        target_dx, _, target_dw = target_backward(
            embeddings[r0:r1], weight, labels_local[r0:r1], target_grad[r0:r1], normalize
        )
        out[r0:r1] = (grad_embeddings[r0:r1].to(torch.float64) + target_dx).to(out_dtype)
        if grad_weight is not None:
            # index_put_(accumulate) is deterministic on CUDA too (index_add_ there uses float atomics)
            group_sums.index_put_((group_of_row[r0:r1],), target_dw, accumulate=True)
    if grad_weight is not None and num_rows:
        current = grad_weight.index_select(0, sorted_classes)  # every read before any write
        for s0 in range(0, num_rows, step):
            s1 = min(s0 + step, num_rows)
            updated = current[s0:s1].to(torch.float64) + group_sums[group[s0:s1]]
            grad_weight.index_put_((sorted_classes[s0:s1],), updated.to(grad_weight.dtype))
    return out
