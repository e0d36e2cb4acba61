"""Triton kernels of the target column's per-row work, in float64 (notes/CONTRACTS.md).

The (B, C) kernels in margin_ce.py skip each row's target column; its share is computed here,
per row, in float64, in one launch each way instead of ~60 small torch ops:

    target_terms_kernel     forward, one program per BLOCK_B rows: the label range check (bad
                            rows are left out and flagged on the device), cos θ_y as a float64
                            gather-dot, and ψ, dψ/dcos of the additive-angle family
                                ψ = cos(θ_y + m2) − m3 = c·cos m2 − sin θ_y·sin m2 − m3
                            (ArcFace with its fallback past π or easy margin, CosFace, NoMargin,
                            insightface's (1, m2, m3)), written without arccos.
    target_backward_kernel  backward, one program per row (rows sorted by class): its dX finished
                            (1/κ, the chain rule of x̂ = x/‖x‖) plus its target share; the program
                            at the start of each class group sums the group's dW share in float64
                            and adds it once to the class's row. No atomics: deterministic.

The forward's combine (loss = softplus(max + log Σexp − s·ψ)) is margin_ce.lse_merge_kernel's.
"""

import triton
import triton.language as tl

#: Sorted-class value past the end of a group scan (classes are >= -1).
END_OF_GROUPS = tl.constexpr(-2)


@triton.jit
def expm1_f64(v):
    """e^v − 1 in float64 to full relative precision (Kahan's form: (u − 1)·v / ln u, u = e^v)."""
    u = tl.exp(v)
    um1 = u - 1.0
    safe = tl.where((u == 1.0) | (um1 == -1.0), 2.0, u)  # keeps the unused branch finite
    return tl.where(u == 1.0, v, tl.where(um1 == -1.0, -1.0, um1 * v / tl.log(safe)))


@triton.jit
def log1p_f64(t):
    """ln(1 + t) in float64 to full relative precision for t >= 0 (Goldberg's form)."""
    u = 1.0 + t
    safe = tl.where(u == 1.0, 2.0, u)
    return tl.where(u == 1.0, t, tl.log(safe) * t / (safe - 1.0))


@triton.jit
def rounded(v, ty: tl.constexpr):
    """float64 v rounded to ty through float32, as torch rounds float64 to fp16/bf16."""
    if ty == tl.float64:
        out = v
    else:
        out = v.to(tl.float32).to(ty)
    return out


@triton.jit
def target_terms_kernel(
    x_ptr,
    w_ptr,
    labels_ptr,
    margins_ptr,
    labels_out_ptr,
    psi_ptr,
    dpsi_ptr,
    cos_ptr,
    flag_ptr,
    B,
    C,
    D,
    ignore_index,
    stride_xb,
    stride_xd,
    stride_wc,
    stride_wd,
    consts_ptr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ANGLE: tl.constexpr,
    FALLBACK: tl.constexpr,
    ROW_MARGIN: tl.constexpr,
    STRAIGHT_THROUGH: tl.constexpr,
    CHECK_LABELS: tl.constexpr,
):
    """Per row i: labels_out = y_i if y_i in [0, C) else −1 (ignored or bad); cos θ_y, ψ, dψ/dcos
    (float64, 0 where labels_out is −1).

    ANGLE: m2 applies (cos clamped into [−1 + cos_clamp, 1 − cos_clamp] first); else ψ = cos − m3,
    dψ = 1. FALLBACK: 0 none, 1 ArcFace's cos − m·sin m where θ + m > π (⇔ c < −cos m), 2 its easy
    margin (ψ = cos where cos <= 0); c is the clamped cos, the fallbacks take cos itself. ROW_MARGIN: 0, or 2 / 3 when margins_ptr (B,) replaces m2 / m3.
    CHECK_LABELS: the (min, max) over ignore_index and every out-of-range label go to flag_ptr
    (2,) int64 by atomic min / max, so both equal ignore_index exactly when no label is bad.
    consts_ptr (6,) float64: m2, cos m2, sin m2, m3, 1 − the cos clamp, the norm eps (a float
    argument would reach the kernel as fp32: 1 − 1e-7 is not an fp32 number).
    """
    m2 = tl.load(consts_ptr)
    m3 = tl.load(consts_ptr + 3)
    cos_bound = tl.load(consts_ptr + 4)
    eps = tl.load(consts_ptr + 5)
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = rows < B
    labels = tl.load(labels_ptr + rows, mask=in_batch, other=ignore_index).to(tl.int64)
    taken = labels != ignore_index
    in_range = (labels >= 0) & (labels < C)
    keep = taken & in_range & in_batch
    if CHECK_LABELS:
        bad = taken & (~in_range) & in_batch
        tl.atomic_min(flag_ptr, tl.min(tl.where(bad, labels, ignore_index), axis=0))
        tl.atomic_max(flag_ptr + 1, tl.max(tl.where(bad, labels, ignore_index), axis=0))
    classes = tl.where(keep, labels, 0)

    dot = tl.zeros([BLOCK_B], dtype=tl.float64)
    xx = tl.zeros([BLOCK_B], dtype=tl.float64)
    ww = tl.zeros([BLOCK_B], dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_in = ds < D
        xv = tl.load(
            x_ptr + rows[:, None] * stride_xb + ds[None, :] * stride_xd, mask=keep[:, None] & d_in[None, :], other=0.0
        ).to(tl.float64)
        wv = tl.load(
            w_ptr + classes[:, None] * stride_wc + ds[None, :] * stride_wd, mask=keep[:, None] & d_in[None, :], other=0.0
        ).to(tl.float64)
        dot += tl.sum(xv * wv, axis=1)
        xx += tl.sum(xv * xv, axis=1)
        ww += tl.sum(wv * wv, axis=1)
    cos = dot
    if NORMALIZE:  # each norm clamped at eps, as F.normalize
        cos = dot / (tl.maximum(tl.sqrt(xx), eps) * tl.maximum(tl.sqrt(ww), eps))
    cos = tl.where(keep, cos, 0.0)

    m2v = tl.zeros([BLOCK_B], dtype=tl.float64) + m2
    m3v = tl.zeros([BLOCK_B], dtype=tl.float64) + m3
    cos_m = tl.zeros([BLOCK_B], dtype=tl.float64) + tl.load(consts_ptr + 1)  # the host's cos/sin of the spec's m2
    sin_m = tl.zeros([BLOCK_B], dtype=tl.float64) + tl.load(consts_ptr + 2)
    if ROW_MARGIN == 2:  # per-row m2: float64 cos/sin here (libdevice's, with its argument reduction)
        m2v = tl.load(margins_ptr + rows, mask=keep, other=0.0).to(tl.float64)
        cos_m = tl.cos(m2v)
        sin_m = tl.sin(m2v)
    if ROW_MARGIN == 3:
        m3v = tl.load(margins_ptr + rows, mask=keep, other=0.0).to(tl.float64)
    if ANGLE:
        # a NaN row stays NaN through the clamp (as torch.clamp)
        c = tl.maximum(cos, -cos_bound, propagate_nan=tl.PropagateNan.ALL)
        c = tl.minimum(c, cos_bound, propagate_nan=tl.PropagateNan.ALL)
        sin_t = tl.sqrt(1.0 - c * c)  # >= ~4.5e-4 after the clamp
        psi = c * cos_m - sin_t * sin_m - m3v  # cos(θ + m2) − m3
        dpsi = (sin_t * cos_m + c * sin_m) / sin_t  # sin(θ + m2) / sin θ
        if FALLBACK == 1:  # θ + m > π  ⇔  c < cos(π − m) = −cos m
            use_arc = c >= -cos_m
            psi = tl.where(use_arc, psi, cos - m2v * sin_m)  # cos itself: the clamp is only for θ
            dpsi = tl.where(use_arc, dpsi, 1.0)
        if FALLBACK == 2:
            use_arc = c > 0.0
            psi = tl.where(use_arc, psi, cos)
            dpsi = tl.where(use_arc, dpsi, 1.0)
    else:
        psi = cos - m3v
        dpsi = tl.full([BLOCK_B], 1.0, tl.float64)
    if STRAIGHT_THROUGH:
        dpsi = tl.full([BLOCK_B], 1.0, tl.float64)
    tl.store(labels_out_ptr + rows, tl.where(keep, labels, -1), mask=in_batch)
    tl.store(cos_ptr + rows, cos, mask=in_batch)
    tl.store(psi_ptr + rows, tl.where(keep, psi, 0.0), mask=in_batch)
    tl.store(dpsi_ptr + rows, tl.where(keep, dpsi, 0.0), mask=in_batch)


@triton.jit
def _target_coef(grad_rows_ptr, losses_ptr, dpsi_ptr, row, scale):
    """d(output)/d cos θ_y of one row: g·s·expm1(−loss)·dψ (p_y − 1 = expm1(−loss)), float64."""
    coef = tl.load(grad_rows_ptr + row).to(tl.float64) * scale
    return coef * expm1_f64(-tl.load(losses_ptr + row)) * tl.load(dpsi_ptr + row)


@triton.jit
def target_backward_kernel(
    x_ptr,
    w_ptr,
    g_ptr,
    kappa_ptr,
    sorted_ptr,
    order_ptr,
    losses_ptr,
    dpsi_ptr,
    grad_rows_ptr,
    dx_ptr,
    dw_ptr,
    B,
    C,
    D,
    scale,
    eps,
    stride_xb,
    stride_xd,
    stride_wc,
    stride_wd,
    stride_gb,
    stride_dxb,
    stride_dwc,
    BLOCK_D: tl.constexpr,
    NORMALIZE: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
):
    """Program p owns row i = order[p] (``sorted_ptr``: labels_local sorted, −1 first; ``order_ptr``:
    their row indices), whole rows of D (BLOCK_D >= D):
        G_i = g_i / κ, then G_i − x̂_i (x̂_i · G_i) with NORMALIZE (g: the kernels' raw (B, D) fp32 dX);
        coef_i = grad_rows_i · scale · expm1(−loss_i) · dψ_i      (d/d cos θ_y)
        dx_i = G_i + coef_i (ŵ − x̂_i cos_i) / ‖x_i‖, rounded once to dx's dtype.
    The program at the start of a class group also sums, in sorted order and float64, the group's
    coef_i (x̂_i − ŵ cos_i) / ‖w_y‖ and adds it to the class's dW row once (WEIGHT_GRAD). Without
    NORMALIZE the shares are coef·w_y and coef·x_i. Rows of class −1 (or >= C) get G_i only. Rows
    are independent (an ignored half of a batch is not a serial loop); only a class's own rows
    are walked in sequence, for its dW sum: deterministic, no atomics.
    """
    p = tl.program_id(0).to(tl.int64)
    cls = tl.load(sorted_ptr + p)
    owned = (cls >= 0) & (cls < C)
    ds = tl.arange(0, BLOCK_D)
    d_in = ds < D
    wv = tl.load(w_ptr + tl.maximum(cls, 0) * stride_wc + ds * stride_wd, mask=ds < tl.where(owned, D, 0), other=0.0)
    wv = wv.to(tl.float64)
    w_norm = tl.maximum(tl.sqrt(tl.sum(wv * wv, axis=0)), eps)
    w_unit = wv / w_norm

    row = tl.load(order_ptr + p)
    xv = tl.load(x_ptr + row * stride_xb + ds * stride_xd, mask=d_in, other=0.0).to(tl.float64)
    grad = tl.load(g_ptr + row * stride_gb + ds, mask=d_in, other=0.0).to(tl.float64) / tl.load(kappa_ptr).to(tl.float64)
    x_norm = tl.maximum(tl.sqrt(tl.sum(xv * xv, axis=0)), eps)
    x_unit = xv / x_norm
    if NORMALIZE:
        grad -= x_unit * tl.sum(x_unit * grad, axis=0)
    if owned:
        coef = _target_coef(grad_rows_ptr, losses_ptr, dpsi_ptr, row, scale)
        if NORMALIZE:
            grad += coef * (w_unit - x_unit * tl.sum(x_unit * w_unit, axis=0)) / x_norm
        else:
            grad += coef * wv
    tl.store(dx_ptr + row * stride_dxb + ds, rounded(grad, dx_ptr.dtype.element_ty), mask=d_in)

    prev = tl.load(sorted_ptr + p - 1, mask=p > 0, other=END_OF_GROUPS)
    if WEIGHT_GRAD and owned and cls != prev:
        dw_sum = tl.zeros([BLOCK_D], dtype=tl.float64)
        q = p
        current = cls
        while current == cls:
            member = tl.load(order_ptr + q)
            mv = tl.load(x_ptr + member * stride_xb + ds * stride_xd, mask=d_in, other=0.0).to(tl.float64)
            coef = _target_coef(grad_rows_ptr, losses_ptr, dpsi_ptr, member, scale)
            if NORMALIZE:
                m_unit = mv / tl.maximum(tl.sqrt(tl.sum(mv * mv, axis=0)), eps)
                dw_sum += coef * (m_unit - w_unit * tl.sum(m_unit * w_unit, axis=0)) / w_norm
            else:
                dw_sum += coef * mv
            q += 1
            current = tl.load(sorted_ptr + q, mask=q < B, other=END_OF_GROUPS)
        dw_row = dw_ptr + cls * stride_dwc + ds
        updated = tl.load(dw_row, mask=d_in, other=0.0).to(tl.float64) + dw_sum
        tl.store(dw_row, rounded(updated, dw_ptr.dtype.element_ty), mask=d_in)
