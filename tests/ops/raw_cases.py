"""Bad-input cases for the raw ``marginkit._C.cpu`` entry points (issue 18), stdlib only.

Run as ``python raw_cases.py <path of _C .so>``: loads the extension without torch, calls every
case in order and prints one JSON line per case (name, exception type or "returned"). A case
that crashes the process leaves its name as the last "start" line, so the parent test can name
it; under ASan/UBSan a report ends the process the same way.
"""

import array
import importlib.util
import json
import sys

INT64_MAX = 2**63 - 1


def buf(typecode, values):
    """A stdlib array and its address (kept alive by the caller's reference)."""
    a = array.array(typecode, values)
    return a, a.buffer_info()[0]


def cases(cpu):
    """(name, thunk) pairs; each thunk must raise (ValueError or TypeError), except the controls."""
    f32 = lambda n: buf("f", [1.0] * n)  # noqa: E731
    i64 = lambda v: buf("q", v)  # noqa: E731
    out = []

    def add(name, fn):
        out.append((name, fn))

    # class_center_update(centers, C, D, emb, emb_dtype, B, sorted_labels, order, momentum, ignore_index)
    ctr, ctr_p = f32(2 * 4)
    emb, emb_p = f32(2 * 4)
    lab_ok, lab_ok_p = i64([0, 1])
    order, order_p = i64([0, 1])
    ccu = lambda C=2, D=4, dt=0, B=2, lab=lab_ok_p, ordp=order_p, e=emb_p: cpu.class_center_update(  # noqa: E731
        ctr_p, C, D, e, dt, B, lab, ordp, 0.5, -100)
    lab_big, lab_big_p = i64([0, 2])
    lab_huge, lab_huge_p = i64([0, 2**62])
    lab_neg, lab_neg_p = i64([-5, 0])
    bad_order, bad_order_p = i64([0, 7])
    add("control:class_center_update", lambda: ccu())
    add("class_center_update:label>=C", lambda: ccu(lab=lab_big_p))
    add("class_center_update:label=2^62", lambda: ccu(lab=lab_huge_p))
    add("class_center_update:label<0", lambda: ccu(lab=lab_neg_p))
    add("class_center_update:C=-1", lambda: ccu(C=-1))
    add("class_center_update:B=-1", lambda: ccu(B=-1))
    add("class_center_update:D=-1", lambda: ccu(D=-1))
    add("class_center_update:dtype=7", lambda: ccu(dt=7))
    add("class_center_update:order_out_of_range", lambda: ccu(ordp=bad_order_p))
    add("class_center_update:C*D_overflow", lambda: ccu(C=2**62, D=4))
    add("class_center_update:null_emb", lambda: ccu(e=0))
    add("class_center_update:B=2^64", lambda: ccu(B=2**64))

    # class_statistics_update(counts, cos_sum, sq_sum, C, emb, emb_dtype, weight, w_dtype, B, D, sl, order, ignore)
    counts, counts_p = i64([0, 0])
    counts_max, counts_max_p = i64([INT64_MAX, 0])
    cs, cs_p = buf("d", [0.0, 0.0])
    sq, sq_p = buf("d", [0.0, 0.0])
    w, w_p = f32(2 * 4)
    csu = lambda C=2, dt=0, wdt=0, B=2, lab=lab_ok_p, cnt=counts_p: cpu.class_statistics_update(  # noqa: E731
        cnt, cs_p, sq_p, C, emb_p, dt, w_p, wdt, B, 4, lab, order_p, -100)
    add("control:class_statistics_update", lambda: csu())
    add("class_statistics_update:label>=C", lambda: csu(lab=lab_big_p))
    add("class_statistics_update:label=2^62", lambda: csu(lab=lab_huge_p))
    add("class_statistics_update:counts_at_int64_max", lambda: csu(cnt=counts_max_p))
    add("class_statistics_update:emb_dtype=9", lambda: csu(dt=9))
    add("class_statistics_update:w_dtype=-1", lambda: csu(wdt=-1))
    add("class_statistics_update:B=-1", lambda: csu(B=-1))
    add("class_statistics_update:C=-1", lambda: csu(C=-1))

    # range_loss_forward(emb, dtype, B, D, sl, order, k2, margin, alpha, beta, loss, row_seg, sel, coef, closest, iv)
    B, D, k2 = 2, 4, 1
    loss, loss_p = f32(1)
    row_seg, row_seg_p = i64([0, 0])
    sel, sel_p = i64([-1] * (B * k2 * 2))
    coef, coef_p = buf("d", [0.0] * (B * k2))
    closest, closest_p = i64([-1, -1, 0, 0])
    iv, iv_p = buf("d", [0.0] * D)
    lab_same, lab_same_p = i64([3, 3])
    rlf = lambda dt=0, B=B, k=k2, ordp=order_p: cpu.range_loss_forward(  # noqa: E731
        emb_p, dt, B, D, lab_same_p, ordp, k, 1.0, 1.0, 1.0, loss_p, row_seg_p, sel_p, coef_p, closest_p, iv_p)
    add("control:range_loss_forward", lambda: rlf())
    add("range_loss_forward:B=-1", lambda: rlf(B=-1))
    add("range_loss_forward:k2=0", lambda: rlf(k=0))
    add("range_loss_forward:dtype=5", lambda: rlf(dt=5))
    add("range_loss_forward:order_out_of_range", lambda: rlf(ordp=bad_order_p))
    add("range_loss_forward:B*k2_overflow", lambda: rlf(k=2**62))

    # range_loss_backward(grad_loss, emb, dtype, B, D, k2, row_seg, sel, coef, closest, iv, grad_emb)
    gl, gl_p = f32(1)
    gx, gx_p = f32(B * D)
    seg_big, seg_big_p = i64([0, 10**6])
    sel_bad, sel_bad_p = i64([0, 9])
    cl_bad, cl_bad_p = i64([5, -1, 1, 0])
    cl_zero, cl_zero_p = i64([0, -1, 0, 0])
    rlb = lambda g=gl_p, dt=0, B=B, k=k2, rs=row_seg_p, sp=sel_p, cl=closest_p: cpu.range_loss_backward(  # noqa: E731
        g, emb_p, dt, B, D, k, rs, sp, coef_p, cl, iv_p, gx_p)
    add("control:range_loss_backward", lambda: rlb())
    add("range_loss_backward:dtype=4_before_reading_grad_loss", lambda: rlb(g=0, dt=4))
    add("range_loss_backward:row_seg=10^6", lambda: rlb(rs=seg_big_p))
    add("range_loss_backward:sel_pairs_out_of_range", lambda: rlb(sp=sel_bad_p))
    add("range_loss_backward:closest_out_of_range", lambda: rlb(cl=cl_bad_p))
    add("range_loss_backward:closest_size_0", lambda: rlb(cl=cl_zero_p))
    add("range_loss_backward:k2=0", lambda: rlb(k=0))
    add("range_loss_backward:B=-1", lambda: rlb(B=-1))
    add("range_loss_backward:null_grad_loss", lambda: rlb(g=0))

    # partial_fc_mark(labels, B, start, stop, flags); partial_fc_select(flags, start, stop, seed, m, labels, B,
    # index, num_index, local_labels)
    flags, flags_p = buf("i", [0] * 8)
    plab, plab_p = i64([2, 5, -1])
    index, index_p = i64([0] * 8)
    local, local_p = i64([0] * 3)
    add("control:partial_fc_mark", lambda: cpu.partial_fc_mark(plab_p, 3, 0, 8, flags_p))
    add("partial_fc_mark:stop<start", lambda: cpu.partial_fc_mark(plab_p, 3, 8, 0, flags_p))
    add("partial_fc_mark:start<0", lambda: cpu.partial_fc_mark(plab_p, 3, -1, 8, flags_p))
    add("partial_fc_mark:B=-1", lambda: cpu.partial_fc_mark(plab_p, -1, 0, 8, flags_p))
    add("partial_fc_mark:n>=2^31", lambda: cpu.partial_fc_mark(plab_p, 3, 0, 2**31, flags_p))
    add("partial_fc_mark:int64_min_start", lambda: cpu.partial_fc_mark(plab_p, 3, -2**63, 2**63 - 1, flags_p))
    add("partial_fc_select:m=-1", lambda: cpu.partial_fc_select(flags_p, 0, 8, 1, -1, plab_p, 3, index_p, 2, local_p))
    add("partial_fc_select:num_index_too_large",
        lambda: cpu.partial_fc_select(flags_p, 0, 8, 1, 2, plab_p, 3, index_p, 7, local_p))
    add("partial_fc_select:m>n-P", lambda: cpu.partial_fc_select(flags_p, 0, 8, 1, 7, plab_p, 3, index_p, 9, local_p))
    add("partial_fc_select:stop<start",
        lambda: cpu.partial_fc_select(flags_p, 8, 0, 1, 0, plab_p, 3, index_p, 2, local_p))
    add("partial_fc_select:seed=-1", lambda: cpu.partial_fc_select(flags_p, 0, 8, -1, 2, plab_p, 3, index_p, 4, local_p))
    add("control:partial_fc_select", lambda: cpu.partial_fc_select(flags_p, 0, 8, 1, 2, plab_p, 3, index_p, 4, local_p))

    # sparse_sgd_step(weight, grad, buf, initialized, rows, R, C, D, dtype, lr, momentum, wd, dampening, nesterov)
    sw, sw_p = f32(2 * 4)
    sg, sg_p = f32(1 * 4)
    sb, sb_p = f32(2 * 4)
    rows_ok, rows_ok_p = i64([1])
    rows_big, rows_big_p = i64([2])
    rows_neg, rows_neg_p = i64([-1])
    sgd = lambda rows=rows_ok_p, R=1, C=2, D=4, dt=0: cpu.sparse_sgd_step(  # noqa: E731
        sw_p, sg_p, sb_p, 0, rows, R, C, D, dt, 0.1, 0.9, 0.0, 0.0, False)
    add("control:sparse_sgd_step", lambda: sgd())
    add("sparse_sgd_step:row>=C", lambda: sgd(rows=rows_big_p))
    add("sparse_sgd_step:row<0", lambda: sgd(rows=rows_neg_p))
    add("sparse_sgd_step:R=-1", lambda: sgd(R=-1))
    add("sparse_sgd_step:dtype=8", lambda: sgd(dt=8))
    add("sparse_sgd_step:C*D_overflow", lambda: sgd(C=2**62, D=4))

    # sparse_adamw_step(weight, grad, m1, m2, step, rows, R, C, D, dtype, lr, b1, b2, eps, wd)
    m1, m1_p = f32(2 * 4)
    m2, m2_p = f32(2 * 4)
    st_ok, st_ok_p = i64([0, 0])
    st_neg, st_neg_p = i64([0, -1])
    st_max, st_max_p = i64([0, INT64_MAX])
    adamw = lambda rows=rows_ok_p, st=st_ok_p, dt=0: cpu.sparse_adamw_step(  # noqa: E731
        sw_p, sg_p, m1_p, m2_p, st, rows, 1, 2, 4, dt, 0.1, 0.9, 0.999, 1e-8, 0.01)
    add("control:sparse_adamw_step", lambda: adamw())
    add("sparse_adamw_step:step=-1", lambda: adamw(st=st_neg_p))
    add("sparse_adamw_step:step=int64_max", lambda: adamw(st=st_max_p))
    add("sparse_adamw_step:row>=C", lambda: adamw(rows=rows_big_p))
    add("sparse_adamw_step:dtype=8", lambda: adamw(dt=8))
    keep = [ctr, emb, lab_ok, order, lab_big, lab_huge, lab_neg, bad_order, counts, counts_max, cs, sq, w, loss,
            row_seg, sel, coef, closest, iv, lab_same, gl, gx, seg_big, sel_bad, cl_bad, cl_zero, flags, plab,
            index, local, sw, sg, sb, rows_ok, rows_big, rows_neg, m1, m2, st_ok, st_neg, st_max]
    return out, keep


def main(so_path: str) -> None:
    spec = importlib.util.spec_from_file_location("marginkit._C", so_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run, _keep = cases(module.cpu)
    for name, thunk in run:
        print(json.dumps({"start": name}), flush=True)
        try:
            thunk()
            result = {"case": name, "raised": None}
        except Exception as err:  # noqa: BLE001  (the parent asserts the type)
            result = {"case": name, "raised": type(err).__name__, "message": str(err)[:300]}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
