"""The memory-budget mode's kernels: the forward's store epilogue (``store_tile``, called by
``lse_partials_kernel`` with STORE), stored exp-scaled logits → the dS workspace, and the
weight-side projection of stored chunks' raw weight gradient.

The forward (``lse_partials_kernel`` with STORE) leaves, for the stored classes,
    S_ij = σ·exp2(z_ij − m_it)·dN/dcos_ij     (0 at the target column; σ a power of two)
with z = logit·log2(e), and the tile maxima m_it of z (one per STORE_GROUP classes). Given the
global lse, ``stored_to_workspace_kernel`` writes the workspace ``scores_kernel`` would write,
    E_ij = κ·dS_ij·x_inv_i·w_inv_j,   dS_ij = g_i·scale·exp2(m_it − lse_i·log2(e))·S_ij/σ,
with one read and one write per element and no GEMM. m_it ≤ lse_i·log2(e), except for a tile
with no class of the row (m_it = 0, S = 0), where exp2(−lse·log2(e)) could overflow (lse < −88:
0·inf = NaN); the exponent is clamped at 0, exact everywhere else.
"""

import triton
import triton.language as tl


@triton.jit
def store_tile(
    z, slope, m_i, s_i, rows, row_mask, cols,
    stored_ptr, tile_max_ptr, store_end, stride_stored, stride_tile_max, store_scale, tile_start,
    STORE_GROUP: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Forward epilogue of ``lse_partials_kernel`` with STORE (slope: dN/dcos, or 1.0): one exp2 per logit (z in log2 units), shifted
    by the tile's own row max m_t, serves both the online (max, Σexp2) and the stored values.

    Stores only classes below store_end = min(n_stored, end of this program's split).
    Returns the updated (m_i, s_i). Shifting by the tile max (not a fixed bound) keeps every
    stored value in (0, 1]·slope with the tile's largest = 1, so nothing that matters underflows.
    """
    m_tile = tl.max(z, axis=1)
    empty = m_tile == float("-inf")
    tile_shift = tl.where(empty, 0.0, m_tile)
    e = tl.exp2(z - tile_shift[:, None])
    m_new = tl.maximum(m_i, m_tile)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    # A tile without a non-target class adds exactly 0 (no 0·exp2(large) = NaN).
    tile_sum = tl.where(empty, 0.0, tl.sum(e, axis=1) * tl.exp2(tile_shift - shift))
    s_i = s_i * tl.exp2(m_i - shift) + tile_sum
    in_store = cols < store_end
    tl.store(
        stored_ptr + rows[:, None] * stride_stored + cols[None, :],
        (e * slope * store_scale).to(stored_ptr.dtype.element_ty),
        mask=row_mask[:, None] & in_store[None, :],
    )
    groups = tile_start // STORE_GROUP + tl.arange(0, BLOCK_C // STORE_GROUP).to(tl.int64)
    tl.store(
        tile_max_ptr + rows[:, None] * stride_tile_max + groups[None, :],
        tl.broadcast_to(tile_shift[:, None], (tile_shift.shape[0], BLOCK_C // STORE_GROUP)),
        mask=row_mask[:, None] & (groups * STORE_GROUP < store_end)[None, :],
    )
    return m_new, s_i


@triton.jit
def stored_to_workspace_kernel(
    stored_ptr,
    tile_max_ptr,
    lse_ptr,
    grad_ptr,
    x_inv_ptr,
    w_inv_ptr,
    kappa_ptr,
    ws_ptr,
    B,
    chunk_start,
    n_chunk,
    stride_stored,
    stride_tile_max,
    stride_ws,
    scale_over_sigma,
    STORE_GROUP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """ws[i, j − chunk_start] = E_ij for the chunk's classes (fp32 maths, stored in ws's dtype).

    g_i from grad_ptr (fp32 or fp64); scale_over_sigma = scale / σ (the store's power-of-two scale).
    Rows with g_i = 0 (ignored, not owned) write 0 whatever they stored.
    """
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    lcols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = lcols < n_chunk
    cols = chunk_start + lcols
    mask = row_mask[:, None] & col_mask[None, :]

    s = tl.load(stored_ptr + rows[:, None] * stride_stored + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    m = tl.load(tile_max_ptr + rows[:, None] * stride_tile_max + (cols // STORE_GROUP)[None, :], mask=mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)  # float32 or float64 lse
    grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    x_inv = tl.load(x_inv_ptr + rows, mask=row_mask, other=0.0)
    w_inv = tl.load(w_inv_ptr + cols, mask=col_mask, other=0.0)
    kappa = tl.load(kappa_ptr)

    row_factor = grad * x_inv * (kappa * scale_over_sigma)
    # m is in log2 units (the forward's z = logit·log2(e))
    e = s * tl.exp2(tl.minimum(m - lse[:, None] * 1.4426950408889634, 0.0)) * row_factor[:, None] * w_inv[None, :]
    e = tl.where((grad != 0.0)[:, None], e, 0.0)
    tl.store(ws_ptr + rows[:, None] * stride_ws + lcols[None, :], e.to(ws_ptr.dtype.element_ty), mask=mask)


@triton.jit
def project_weight_rows_kernel(
    r_ptr,
    w_ptr,
    w_inv_ptr,
    out_ptr,
    n_rows,
    D,
    stride_r,
    stride_wc,
    stride_wd,
    stride_out,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out_j = R_j − w_inv_j²·(w_j·R_j)·w_j for rows j < n_rows (fp32 maths, out's dtype).

    The weight side of the normalisation chain rule for chunks whose column sums were never
    formed (stored chunks): w_j·R_j = Σ_i dS_ij·cos_ij when R = Eᵀ·X/κ. R fp32 (n_rows, D); out
    may be R itself. Whole rows per program (BLOCK_D ≥ D): R and W are read once each.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    ds = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (ds < D)[None, :]
    r = tl.load(r_ptr + rows[:, None] * stride_r + ds[None, :], mask=mask, other=0.0)
    w = tl.load(w_ptr + rows[:, None] * stride_wc + ds[None, :] * stride_wd, mask=mask, other=0.0).to(tl.float32)
    w_inv = tl.load(w_inv_ptr + rows, mask=row_mask, other=0.0)
    coef = w_inv * w_inv * tl.sum(r * w, axis=1)
    out = r - coef[:, None] * w
    tl.store(out_ptr + rows[:, None] * stride_out + ds[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
