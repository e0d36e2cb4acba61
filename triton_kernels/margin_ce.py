"""Triton kernels of the fused margin cross-entropy (forward and backward).

Notation (all per call, one shard of classes):
    X (B, D) embeddings, W (C, D) class weights: fp32, fp16 or bf16, the same dtype, or W fp32
    with X fp16/bf16 (fp32 master weights: W tiles are cast to X's dtype in registers);
    x_inv_i = 1/‖x_i‖, w_inv_j = 1/‖w_j‖ (ones when the inputs are taken as normalised);
    cos_ij = (x_i · w_j) · x_inv_i · w_inv_j;  logit_ij = scale · cos_ij.
The kernels are margin-agnostic: the target column j = y_i (labels_local, when it lies in
this shard) is skipped in the forward and the backward; its share (ψ, dψ/dcos) is added
per row in float64 by the caller (notes/CONTRACTS.md). The non-target cosines may pass
through one modulation N (marginkit.modulation.NegativeModulation, MODULATE): above the
row's threshold, N(cos) = quadratic·cos² + linear·cos with slope 2·quadratic·cos + linear.

Forward (two kernels):
    lse_partials_kernel   grid (row blocks, class splits). A program owns BLOCK_B rows and one
                          contiguous range of classes; it walks that range in BLOCK_C tiles,
                          one tensor-core dot per tile (fp32 accumulate, raw rows, the norms
                          applied to the accumulator as scales), leaves the target column out
                          and keeps an online fp32 (max, Σ exp) per row, in log2 units (exp2). The (class-tile,
                          k-step) loop is flattened into one loop so that the software pipeline does not drain
                          between tiles. With STORE (memory-budget mode) it also keeps the exp-scaled logits of
                          the first n_stored classes (stored_logits.py), so the backward skips their recompute.
    lse_merge_kernel      merges the per-split partials in a fixed order (row_max back in natural units),
                          or (COMBINE) turns them into the float64 loss and lse with the target logit.

Backward, per bounded chunk of classes [chunk_start, chunk_start + n_chunk) (three kernels):
    scores_kernel         recomputes the logits tile, p = exp(logit − lse) (as exp2 in log2 units), and writes
                              E_ij = κ · dS_ij · x_inv_i · w_inv_j      (workspace, input dtype)
                          where dS_ij = g_i·scale·p_ij (0 at the target column) is
                          d loss/d cos_ij, and κ a power-of-two range scale (1 except for fp16).
                          With normalisation it also writes the per-(row block, class) partial
                          column sums Q[rb, j] = Σ_{i in rb} dS_ij · cos_ij (plain stores).
    dx_gemm_kernel        G += E · W_chunk           (M = B, N = D, K = chunk; split-K)
    dw_gemm_kernel        dW_chunk = Eᵀ · X / κ − w_inv_j² (Σ_rb Q[rb, j]) · w_j
                          (M = chunk, N = D, K = B; fp32 accumulate, written once).
    The embedding side of the normalisation chain rule needs no column sums:
    Σ_j dS_ij cos_ij = x_i · G_i, so dx_i = G_i − x̂_i (x̂_i · G_i) once at the end (launcher).

All element offsets are computed in int64 (C·D exceeds 2^31 at C = 10M, D = 512).
Only features of Triton ≥ 3.0 are used (tl.dot with input_precision, masked loads and
stores, tl.atomic_add with sem), so the kernels run on the GPU machine's Triton 3.6 and
under TRITON_INTERPRET=1 on the CPU; the TMA variants of the four GEMM-shaped kernels (operand
tiles through host-side tensor descriptors, ``triton.tools.tensor_descriptor``; ``TMA``) need
Triton ≥ 3.4 and are opt-in (``tuning(tma=True)``).
"""

import triton
import triton.language as tl

from .stored_logits import store_tile
from .target_column import log1p_f64, rounded

#: log2(e) and ln(2): the kernels keep logits in log2 units (exp2 is the hardware's MUFU.EX2).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b with fp32 accumulation.

    UPCAST (set by the launcher only under TRITON_INTERPRET=1 for bf16 operands) widens
    the operands to fp32 first: the CPU interpreter of Triton 3.6–3.9 multiplies bf16
    tiles as their raw uint16 bit patterns. bf16·bf16 products are exact in fp32, so this
    is the same arithmetic as the tensor cores' fp32 accumulation. On a GPU it is False
    and compiles away.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _dot_step(
    x_ptr, w_ptr, rows, row_mask, cols, col_mask, ks, D,
    stride_xb, stride_xd, stride_wc, stride_wd, acc,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One k step of the X·Wᵀ tile loop: acc + X[rows, ks]·W[cols, ks]ᵀ (fp32 accumulate).

    The W tile is cast to X's dtype in registers (a no-op unless W holds fp32 master
    weights for fp16/bf16 embeddings: no (C, D) copy in the compute dtype is ever made).
    """
    k_mask = ks < D
    xt = tl.load(
        x_ptr + rows[:, None] * stride_xb + ks[None, :] * stride_xd,
        mask=row_mask[:, None] & k_mask[None, :],
        other=0.0,
    )
    wt = tl.load(
        w_ptr + cols[:, None] * stride_wc + ks[None, :] * stride_wd,
        mask=col_mask[:, None] & k_mask[None, :],
        other=0.0,
    ).to(xt.dtype)
    return _mma(xt, tl.trans(wt), acc, DOT_PRECISION, UPCAST)


@triton.jit
def _modulated(cos, threshold, quadratic, linear):
    """N(cos): quadratic·cos² + linear·cos above the row's threshold (B, 1), cos elsewhere."""
    return tl.where(cos > threshold[:, None], cos * (quadratic * cos + linear), cos)


@triton.jit
def _modulation_slope(cos, threshold, quadratic, linear):
    """dN/dcos: 2·quadratic·cos + linear above the row's threshold, 1 elsewhere."""
    return tl.where(cos > threshold[:, None], 2.0 * quadratic * cos + linear, 1.0)


@triton.jit
def row_inv_norm_kernel(
    x_ptr,
    out_ptr,
    N,
    D,
    stride_n,
    stride_d,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[n] = 1 / max(‖x[n, :]‖, eps) in fp32 (the convention of F.normalize)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(
            x_ptr + rows[:, None] * stride_n + ds[None, :] * stride_d,
            mask=row_mask[:, None] & (ds[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        sq += tl.sum(v * v, axis=1)
    norm = tl.maximum(tl.sqrt_rn(sq), eps)
    tl.store(out_ptr + rows, tl.div_rn(tl.full([BLOCK_N], 1.0, tl.float32), norm), mask=row_mask)


@triton.jit
def lse_partials_kernel(
    x_ptr,
    w_ptr,
    x_inv_ptr,
    w_inv_ptr,
    labels_ptr,
    part_max_ptr,
    part_sum_ptr,
    threshold_ptr,
    stored_ptr,
    tile_max_ptr,
    B,
    C,
    D,
    classes_per_split,
    n_stored,
    stride_xb,
    stride_xd,
    stride_wc,
    stride_wd,
    stride_stored,
    stride_tile_max,
    scale,
    quadratic,
    linear,
    store_scale,
    B_BUCKET,
    x_desc,
    w_desc,
    MODULATE: tl.constexpr,
    STORE: tl.constexpr,
    STORE_GROUP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA: tl.constexpr = False,
):
    """Per (row, class split) online log-sum-exp partials: part_max[s, i], part_sum[s, i].

    In log2 units: part_max = max z, part_sum = Σ exp2(z − part_max) over the split's
    non-target classes, z = logit·log2(e); a split with none writes (−inf, 0). B_BUCKET only feeds the autotuning key. MODULATE: the non-target
    cosines enter as N(cos) (threshold_ptr (B,), quadratic, linear; unused otherwise).
    STORE (memory-budget mode): for the classes j < n_stored also writes
    stored[i, j] = store_scale·exp2(z_ij − m_it)·dN/dcos_ij (0 at the target column) in
    stored's dtype and tile_max[i, j // STORE_GROUP] = m_it, the row's max of z over the class
    tile t (0 for a tile without a non-target class), so that the backward needs no recompute.
    TMA: X and W tiles through tensor descriptors (x_desc over X with (BLOCK_B, BLOCK_K) blocks,
    w_desc over all of W with (BLOCK_C, BLOCK_K)), zero-filled past B, C and D; the columns a tile
    reads past its split (the next split's W rows) are left out by the same −inf bias as ever.
    """
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    # Logits in log2 units, z = logit·log2(e): the row factor x_inv·scale·log2(e) is formed once
    # per row, so each element takes two multiplies and a bare exp2 (the backward recompute uses
    # the same expression: bitwise equal when their BLOCK_K match).
    x_inv = tl.load(x_inv_ptr + rows, mask=row_mask, other=0.0)
    row_factor = x_inv * (scale * LOG2E)
    label = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    if MODULATE:
        threshold = tl.load(threshold_ptr + rows, mask=row_mask, other=0.0)

    # Class indices fit in int32 (C < 2^31); they are widened before any pointer product.
    c_begin = pid_s * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, C)
    n_ctiles = tl.cdiv(c_end - c_begin, BLOCK_C)
    k_tiles = tl.cdiv(D, BLOCK_K)
    # int32 column tests relative to the split: the target's column (−1 − c_begin when it is not
    # in this split or the row is ignored: never in [0, BLOCK_C) of a tile) and the split's width.
    label_in_split = tl.where(label >= 0, label - c_begin, -1).to(tl.int32)
    split_width = c_end - c_begin

    m_i = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    # One flat loop over (class tile, k step): the epilogue runs on the last k step.
    for it in range(0, n_ctiles * k_tiles):
        ct = it // k_tiles
        kt = it - ct * k_tiles
        cols = (c_begin + ct * BLOCK_C + offs_c).to(tl.int64)
        col_mask = cols < c_end
        if TMA:
            acc = _mma(x_desc.load([pid_b * BLOCK_B, kt * BLOCK_K]),
                       tl.trans(w_desc.load([c_begin + ct * BLOCK_C, kt * BLOCK_K])), acc, DOT_PRECISION, UPCAST)
        else:
            acc = _dot_step(
                x_ptr, w_ptr, rows, row_mask, cols, col_mask, kt * BLOCK_K + offs_k, D,
                stride_xb, stride_xd, stride_wc, stride_wd, acc, DOT_PRECISION, UPCAST,
            )
        if kt == k_tiles - 1:
            w_inv = tl.load(w_inv_ptr + cols, mask=col_mask, other=0.0)
            tile_col = ct * BLOCK_C
            # columns past the split: −inf through an additive per-column bias (folds into an FMA)
            col_bias = tl.where(offs_c < split_width - tile_col, 0.0, float("-inf"))
            if MODULATE:
                cos = acc * x_inv[:, None] * w_inv[None, :]
                z = _modulated(cos, threshold, quadratic, linear) * (scale * LOG2E) + col_bias[None, :]
            else:
                z = acc * row_factor[:, None] * w_inv[None, :] + col_bias[None, :]
            z = tl.where(offs_c[None, :] == (label_in_split - tile_col)[:, None], float("-inf"), z)
            if STORE:
                if MODULATE:
                    slope = _modulation_slope(cos, threshold, quadratic, linear)
                else:
                    slope = 1.0
                m_i, s_i = store_tile(
                    z, slope, m_i, s_i, rows, row_mask, cols, stored_ptr, tile_max_ptr,
                    tl.minimum(n_stored, c_end), stride_stored, stride_tile_max, store_scale,
                    c_begin + ct * BLOCK_C, STORE_GROUP, BLOCK_C,
                )
            else:
                m_new = tl.maximum(m_i, tl.max(z, axis=1))
                # A row with no class yet (m_new = −inf) shifts by 0: exp2(−inf − 0) = 0, no NaN.
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                s_i = s_i * tl.exp2(m_i - shift) + tl.sum(tl.exp2(z - shift[:, None]), axis=1)
                m_i = m_new
            acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    out = pid_s.to(tl.int64) * B + rows
    tl.store(part_max_ptr + out, m_i, mask=row_mask)  # log2 units: lse_merge_kernel converts
    tl.store(part_sum_ptr + out, s_i, mask=row_mask)


@triton.jit
def lse_merge_kernel(
    part_max_ptr,
    part_sum_ptr,
    max_out_ptr,
    sum_out_ptr,
    target_ptr,
    labels_ptr,
    loss_ptr,
    loss_out_ptr,
    lse_ptr,
    B,
    n_splits,
    scale,
    BLOCK: tl.constexpr,
    COMBINE: tl.constexpr,
):
    """row_max = ln2·max_s part_max[s]; row_sumexp = Σ_s part_sum[s]·exp2(part_max[s] − max_s part_max[s]).

    The partials are in log2 units (lse_partials_kernel); row_max comes out in natural units.
    Splits are visited in index order (deterministic); empty splits (−inf) add nothing.

    COMBINE (the single-shard loss): instead of (row_max, row_sumexp), the per-row float64
        loss = softplus(row_max + ln row_sumexp − s·ψ)   (exact for a 1e-7 loss; 0 where label < 0)
        lse = s·ψ + softplus(...)
    from target_ptr (ψ (B,) float64) and labels_ptr (labels_local), into loss_ptr (float64),
    loss_out_ptr (the returned dtype) and lse_ptr (float64).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < B
    # Rows past B read 0 (they are never stored).
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        pm = tl.load(part_max_ptr + s * B + rows, mask=mask, other=0.0)
        m = tl.maximum(m, pm)
    # A row whose every split is empty (m = −inf) shifts by 0: its sum stays 0, no NaN.
    shift = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n_splits):
        pm = tl.load(part_max_ptr + s * B + rows, mask=mask, other=0.0)
        ps = tl.load(part_sum_ptr + s * B + rows, mask=mask, other=0.0)
        total += ps * tl.exp2(pm - shift)
    if COMBINE:
        target = scale * tl.load(target_ptr + rows, mask=mask, other=0.0)
        row_sum = total.to(tl.float64)
        # no other class: log 0 = −inf, softplus(−inf) = 0, the right loss (log of 1 keeps it finite here);
        # a NaN row (NaN partials) stays NaN, as torch's cross-entropy
        empty = row_sum == 0.0
        excess = tl.where(empty, float("-inf"), m.to(tl.float64) * LN2 + tl.log(tl.where(empty, 1.0, row_sum)) - target)
        loss = tl.maximum(excess, 0.0) + log1p_f64(tl.exp(-tl.abs(excess)))
        owned = tl.load(labels_ptr + rows, mask=mask, other=-1) >= 0
        tl.store(loss_ptr + rows, tl.where(owned, loss, 0.0), mask=mask)
        tl.store(loss_out_ptr + rows, rounded(tl.where(owned, loss, 0.0), loss_out_ptr.dtype.element_ty), mask=mask)
        tl.store(lse_ptr + rows, target + loss, mask=mask)
    else:
        tl.store(max_out_ptr + rows, m * LN2, mask=mask)  # log2 units in, natural units out
        tl.store(sum_out_ptr + rows, total, mask=mask)


@triton.jit
def scores_kernel(
    x_ptr,
    w_ptr,
    x_inv_ptr,
    w_inv_ptr,
    labels_ptr,
    lse_ptr,
    grad_ptr,
    kappa_ptr,
    ws_ptr,
    q_ptr,
    threshold_ptr,
    B,
    D,
    chunk_start,
    n_chunk,
    stride_xb,
    stride_xd,
    stride_wc,
    stride_wd,
    stride_ws,
    stride_q,
    scale,
    quadratic,
    linear,
    B_BUCKET,
    x_desc,
    w_desc,
    MODULATE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    COLSUM_MMA: tl.constexpr = False,
    TMA: tl.constexpr = False,
):
    """Backward recompute of one (row block, class tile) of the chunk.

    Writes ws[i, j − chunk_start] = κ·dS_ij·x_inv_i·w_inv_j in ws's dtype and, with
    NORMALIZE, q[pid_b, j − chunk_start] = Σ_{i in block} dS_ij·cos_ij (fp32 sums; with COLSUM_MMA,
    for bf16 workspaces, of terms rounded to bf16 as E itself is, summed by one wgmma).
    dS_ij = g_i·scale·exp(logit_ij − lse_i)·dN/dcos_ij (slope 1 without MODULATE), 0 at the
    target column; g_i from grad_ptr (fp32 or fp64; 0 on rows that contribute nothing). Computed as
    exp2 of logits in log2 units, as the forward. No probability filter: every class's
    exp(logit − lse) enters, however small. TMA: X and W tiles through tensor descriptors as in
    the forward (columns past the chunk are never stored).
    """
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    lcols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = lcols < n_chunk
    cols = chunk_start + lcols

    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    if TMA:
        for k0 in range(0, D, BLOCK_K):
            acc = _mma(x_desc.load([pid_b * BLOCK_B, k0]),
                       tl.trans(w_desc.load([chunk_start + pid_c * BLOCK_C, k0])), acc, DOT_PRECISION, UPCAST)
    else:
        for k0 in range(0, D, BLOCK_K):
            acc = _dot_step(
                x_ptr, w_ptr, rows, row_mask, cols, col_mask, k0 + tl.arange(0, BLOCK_K), D,
                stride_xb, stride_xd, stride_wc, stride_wd, acc, DOT_PRECISION, UPCAST,
            )

    x_inv = tl.load(x_inv_ptr + rows, mask=row_mask, other=0.0)
    w_inv = tl.load(w_inv_ptr + cols, mask=col_mask, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)  # float32 or float64 lse
    grad_scaled = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32) * scale  # g_i·scale
    kappa = tl.load(kappa_ptr)

    # Per-row factors first, so each element takes the forward's two multiplies, one exp2 and
    # two more for E. Rows that contribute nothing get lse = +inf: p = 0 there, never 0·inf.
    row_factor = x_inv * (scale * LOG2E)
    lse2 = tl.where(grad_scaled != 0.0, lse * LOG2E, float("inf"))
    e_row = grad_scaled * x_inv * kappa
    # int32 column test relative to the tile for the target. Columns past the chunk are never
    # stored; the bias keeps them finite at no cost (it folds into an FMA; measured: without it
    # ptxas spills 8 B in the modulated C128K128 variant).
    tile_start = chunk_start + pid_c.to(tl.int64) * BLOCK_C
    label_in_tile = tl.where(label >= 0, label - tile_start, -1).to(tl.int32)
    offs_c = tl.arange(0, BLOCK_C)
    col_bias = tl.where(offs_c < n_chunk - pid_c * BLOCK_C, 0.0, float("-inf"))
    hit = offs_c[None, :] == label_in_tile[:, None]
    if MODULATE:
        # dS·cos for the column sums from cos itself: acc is dead after cos (fewer live tiles)
        threshold = tl.load(threshold_ptr + rows, mask=row_mask, other=0.0)
        cos = acc * x_inv[:, None] * w_inv[None, :]
        p = tl.exp2(_modulated(cos, threshold, quadratic, linear) * (scale * LOG2E) - lse2[:, None])
        keep = (col_bias == 0.0)[None, :] & (hit == 0)
        ds = tl.where(keep, p * _modulation_slope(cos, threshold, quadratic, linear) * grad_scaled[:, None], 0.0)
        e = ds * (x_inv * kappa)[:, None] * w_inv[None, :]
    else:
        z = acc * row_factor[:, None] * w_inv[None, :] + col_bias[None, :]  # the forward's expression
        p = tl.exp2(tl.where(hit, float("-inf"), z) - lse2[:, None])
        e = p * e_row[:, None] * w_inv[None, :]
    tl.store(
        ws_ptr + rows[:, None] * stride_ws + lcols[None, :],
        e.to(ws_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )
    if NORMALIZE:
        if MODULATE:
            terms = ds * cos
        else:  # Σ_i dS_ij·cos_ij = Σ_i E_ij·acc_ij / κ (E carries κ·x_inv·w_inv, acc = x_i·w_j)
            terms = e * acc
        if COLSUM_MMA:  # the row sum as termsᵀ·(one-hot column) on the tensor cores: ~5 SASS/element fewer
            pick = tl.broadcast_to(tl.where(tl.arange(0, 16) == 0, 1.0, 0.0)[None, :], [BLOCK_B, 16])
            sums = _mma(tl.trans(terms.to(tl.bfloat16)), pick.to(tl.bfloat16), tl.zeros([BLOCK_C, 16], tl.float32),
                        "ieee", UPCAST)
            qcol = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, sums, 0.0), axis=1)  # column 0 (an inf stays inf)
        else:
            qcol = tl.sum(terms, axis=0)
        if not MODULATE:
            qcol = qcol * (1.0 / kappa)
        tl.store(q_ptr + pid_b.to(tl.int64) * stride_q + lcols, qcol, mask=col_mask)


@triton.jit
def dx_gemm_kernel(
    ws_ptr,
    w_ptr,
    out_ptr,
    B,
    D,
    chunk_start,
    n_chunk,
    k_per_split,
    stride_ws,
    stride_wc,
    stride_wd,
    stride_ob,
    stride_od,
    stride_os,
    B_BUCKET,
    a_desc,
    b_desc,
    USE_ATOMICS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA: tl.constexpr = False,
):
    """out += E[:, split] · W[chunk_start + split, :] for split pid_s of the chunk (fp32 accumulate).

    USE_ATOMICS: every split adds into the same (B, D) fp32 buffer with relaxed atomics
    (order of the adds varies run to run). Otherwise split s owns out[s] (stride_os) and
    does a plain load-add-store; launches are stream-ordered, so the sum is deterministic.
    TMA: the operand tiles come through tensor descriptors (the copy engine, no per-thread
    addresses): a_desc over E[:, :n_chunk] with blocks (BLOCK_M, BLOCK_K), b_desc over all of W
    (C, D) with blocks (BLOCK_K, BLOCK_N). They zero-fill outside their shape, so no tile needs a
    mask: a tile past the chunk's last class reads zeros of E (whatever W rows it meets, the
    product is 0), and k_per_split is a multiple of BLOCK_K (the launcher's granule), so no tile
    crosses into the next split. Otherwise (None, None).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    dcols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_mask = dcols < D
    k_begin = pid_s.to(tl.int64) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, n_chunk)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if TMA:
        for k0 in range(k_begin.to(tl.int32), k_end.to(tl.int32), BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            b = b_desc.load([chunk_start + k0, pid_n * BLOCK_N])
            acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
    else:
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < k_end
            a = tl.load(
                ws_ptr + rows[:, None] * stride_ws + ks[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + (chunk_start + ks)[:, None] * stride_wc + dcols[None, :] * stride_wd,
                mask=k_mask[:, None] & d_mask[None, :],
                other=0.0,
            ).to(a.dtype)  # fp32 master weights: cast in registers to the workspace dtype
            acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)

    out_mask = row_mask[:, None] & d_mask[None, :]
    if USE_ATOMICS:
        ptrs = out_ptr + rows[:, None] * stride_ob + dcols[None, :] * stride_od
        tl.atomic_add(ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + rows[:, None] * stride_ob + dcols[None, :] * stride_od
        prev = tl.load(ptrs, mask=out_mask, other=0.0)
        tl.store(ptrs, prev + acc, mask=out_mask)


@triton.jit
def _dw_projection_operands(w_ptr, w_inv_ptr, q_ptr, cls, lcls, c_mask, dcols, out_mask, n_q, stride_q, stride_wc,
                            stride_wd, BLOCK_M: tl.constexpr):
    """(the W tile in W's dtype, w_inv²·Σ_r q[r, j] per class) of the dW epilogue's projection."""
    u = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r in range(0, n_q):
        u += tl.load(q_ptr + r * stride_q + lcls, mask=c_mask, other=0.0)
    w_inv = tl.load(w_inv_ptr + cls, mask=c_mask, other=0.0)
    w = tl.load(w_ptr + cls[:, None] * stride_wc + dcols[None, :] * stride_wd, mask=out_mask, other=0.0)
    return w, w_inv * w_inv * u


@triton.jit
def dw_gemm_kernel(
    ws_ptr,
    x_ptr,
    w_ptr,
    w_inv_ptr,
    q_ptr,
    kappa_ptr,
    dw_ptr,
    B,
    D,
    chunk_start,
    n_chunk,
    n_q,
    stride_ws,
    stride_xb,
    stride_xd,
    stride_wc,
    stride_wd,
    stride_q,
    stride_dwc,
    stride_dwd,
    B_BUCKET,
    a_desc,
    b_desc,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    PREFETCH: tl.constexpr = False,
    TMA: tl.constexpr = False,
):
    """dW[chunk] = Eᵀ·X/κ (− w_inv²·(Σ_r q[r, j])·w_j with NORMALIZE), stored once in dW's dtype
    (W's: float32 for fp32 master weights).

    TMA: the operand tiles come through tensor descriptors (zero-filled outside their shape):
    a_desc over E[:, :n_chunk] with blocks (BLOCK_K, BLOCK_M), transposed in shared memory, and
    b_desc over X (B, D) with blocks (BLOCK_K, BLOCK_N). Otherwise (None, None).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    lcls = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    c_mask = lcls < n_chunk
    cls = chunk_start + lcls
    dcols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_mask = dcols < D

    out_mask = c_mask[:, None] & d_mask[None, :]
    if NORMALIZE and PREFETCH:  # the projection's operands in flight during the K loop
        w_pre, coef_pre = _dw_projection_operands(w_ptr, w_inv_ptr, q_ptr, cls, lcls, c_mask, dcols, out_mask,
                                                  n_q, stride_q, stride_wc, stride_wd, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if TMA:
        for k0 in range(0, B, BLOCK_K):
            a = tl.trans(a_desc.load([k0, pid_m * BLOCK_M]))
            b = b_desc.load([k0, pid_n * BLOCK_N])
            acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
    else:
        for k0 in range(0, B, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_mask = ks < B
            a = tl.load(
                ws_ptr + ks[None, :] * stride_ws + lcls[:, None],
                mask=c_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                x_ptr + ks[:, None] * stride_xb + dcols[None, :] * stride_xd,
                mask=k_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)

    kappa = tl.load(kappa_ptr)
    dw = acc * (1.0 / kappa)  # κ is a power of two: exact
    if NORMALIZE:
        if PREFETCH:
            w, coef = w_pre, coef_pre
        else:
            w, coef = _dw_projection_operands(w_ptr, w_inv_ptr, q_ptr, cls, lcls, c_mask, dcols, out_mask,
                                              n_q, stride_q, stride_wc, stride_wd, BLOCK_M)
        dw = dw - coef[:, None] * w.to(tl.float32)
    tl.store(
        dw_ptr + cls[:, None] * stride_dwc + dcols[None, :] * stride_dwd,
        dw.to(dw_ptr.dtype.element_ty),
        mask=out_mask,
    )
