"""The memory-budget mode's backward kernels: stored exp-scaled logits → the dS workspace, and
the weight-side projection of stored chunks' raw weight gradient.

The forward (``lse_partials_kernel`` with STORE) leaves, for the stored classes,
    S_ij = σ·exp2(z_ij − m_it)·dN/dcos_ij     (0 at the target column; σ a power of two)
with z = logit·log2(e), and the tile maxima m_it of z (one per STORE_GROUP classes). Given the global lse this kernel
writes the same workspace the recompute path's ``scores_kernel`` writes,
    E_ij = κ·dS_ij·x_inv_i·w_inv_j,   dS_ij = g_i·scale·exp2(m_it − lse_i·log2(e))·S_ij/σ,
with one read and one write per element and no GEMM (m_it ≤ lse_i·log2(e): the factor never overflows).
"""

import triton
import triton.language as tl


@triton.jit
def stored_to_workspace_kernel(
    stored_ptr,
    tile_max_ptr,
    lse_ptr,
    grad_scaled_ptr,
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
    inv_store_scale,
    STORE_GROUP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """ws[i, j − chunk_start] = E_ij for the chunk's classes (fp32 maths, stored in ws's dtype).

    Rows with grad_scaled = g_i·scale = 0 (ignored, not owned) write 0 whatever they stored.
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
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad_scaled = tl.load(grad_scaled_ptr + rows, mask=row_mask, other=0.0)
    x_inv = tl.load(x_inv_ptr + rows, mask=row_mask, other=0.0)
    w_inv = tl.load(w_inv_ptr + cols, mask=col_mask, other=0.0)
    kappa = tl.load(kappa_ptr)

    row_factor = grad_scaled * x_inv * (kappa * inv_store_scale)
    # m is in log2 units (the forward's z = logit·log2(e))
    e = s * tl.exp2(m - lse[:, None] * 1.4426950408889634) * row_factor[:, None] * w_inv[None, :]
    e = tl.where((grad_scaled != 0.0)[:, None], e, 0.0)
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
