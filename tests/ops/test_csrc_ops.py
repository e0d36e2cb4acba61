"""CPU tests of the csrc ops (marginkit._C via marginkit.ops) against plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

mc = pytest.importorskip("marginkit.ops")
if not mc.available():  # pragma: no cover
    pytest.skip("marginkit._C is not built", allow_module_level=True)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


# ----------------------------------------------------------------------------- references


def ref_center_update(centers, x, y, momentum, ignore_index):
    out = centers.double().clone()
    xn = F.normalize(x.double(), dim=1)
    keep = y != ignore_index
    for c in torch.unique(y[keep]).tolist():
        mean = xn[y == c].mean(0)
        out[c] = F.normalize(momentum * out[c] + (1 - momentum) * mean, dim=0)
    return out


def ref_statistics(C, x, w, y, ignore_index):
    counts = torch.zeros(C, dtype=torch.int64)
    cos = torch.zeros(C, dtype=torch.float64)
    sq = torch.zeros(C, dtype=torch.float64)
    keep = y != ignore_index
    xn = F.normalize(x.double(), dim=1)[keep]
    wn = F.normalize(w.double(), dim=1)
    yk = y[keep]
    counts.index_add_(0, yk, torch.ones_like(yk))
    cos.index_add_(0, yk, (xn * wn[yk]).sum(1))
    sq.index_add_(0, yk, ((xn - wn[yk]) ** 2).sum(1))
    return counts, cos, sq


def ref_range_loss(x, y, k, margin, alpha, beta):
    """Float64 textbook Range loss (API.md), differentiable by torch autograd."""
    intra = x.new_zeros(())
    classes = torch.unique(y).tolist()
    means = []
    for c in classes:
        xc = x[y == c]
        means.append(xc.mean(0))
        n = xc.shape[0]
        if n < 2:
            continue
        i, j = torch.triu_indices(n, n, 1)
        d = ((xc[i] - xc[j]) ** 2).sum(1)
        kk = min(k, d.numel())
        top = d.topk(kk).values
        intra = intra + kk / (1.0 / top).sum()
    inter = x.new_zeros(())
    if len(classes) >= 2:
        m = torch.stack(means)
        i, j = torch.triu_indices(len(classes), len(classes), 1)
        dm = ((m[i] - m[j]) ** 2).sum(1)
        inter = torch.clamp(margin - dm.min(), min=0)
    return alpha * intra + beta * inter


# ----------------------------------------------------------------------------- 1. centers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["random", "single_class", "ignored", "empty", "all_ignored"])
def test_class_center_update_matches_reference(dtype, case):
    g = _gen(1)
    C, D, B = 37, 19, 64
    centers = F.normalize(torch.randn(C, D, generator=g), dim=1)
    x = torch.randn(B, D, generator=g).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    ignore = -100
    if case == "single_class":
        y[:] = 5
    elif case == "ignored":
        y[::5] = ignore
    elif case == "empty":
        x, y = x[:0], y[:0]
    elif case == "all_ignored":
        y[:] = ignore
    want = ref_center_update(centers, x, y, 0.9, ignore)
    got = centers.clone()
    mc.class_center_update_(got, x, y, 0.9, ignore)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    untouched = torch.ones(C, dtype=torch.bool)
    untouched[y[y != ignore]] = False
    assert torch.equal(got[untouched], centers[untouched])  # bit-identical


def test_class_center_update_ignore_index_inside_range_and_momentum_edges():
    g = _gen(2)
    C, D, B = 6, 5, 30
    centers = F.normalize(torch.randn(C, D, generator=g), dim=1)
    x = torch.randn(B, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    for momentum in (0.0, 0.5, 1.0):
        got = centers.clone()
        mc.class_center_update_(got, x, y, momentum, ignore_index=3)
        torch.testing.assert_close(got.double(), ref_center_update(centers, x, y, momentum, 3), rtol=0, atol=2e-6)
        assert torch.equal(got[3], centers[3])


def test_class_center_update_is_deterministic_and_zero_rows_safe():
    g = _gen(3)
    C, D, B = 4, 16, 200
    centers = F.normalize(torch.randn(C, D, generator=g), dim=1)
    x = torch.randn(B, D, generator=g)
    x[:7] = 0.0  # zero rows normalise to 0 (F.normalize semantics), no NaN
    y = torch.randint(0, C, (B,), generator=g)
    a, b = centers.clone(), centers.clone()
    mc.class_center_update_(a, x, y, 0.3)
    mc.class_center_update_(b, x, y, 0.3)
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.double(), ref_center_update(centers, x, y, 0.3, -100), rtol=0, atol=2e-6)


def test_class_center_update_validation():
    centers = torch.zeros(5, 4)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"labels\[1\] = 5"):
        mc.class_center_update_(centers, x, torch.tensor([0, 5, 1]), 0.9)
    with pytest.raises(ValueError, match=r"-1"):
        mc.class_center_update_(centers, x, torch.tensor([0, -1, 1]), 0.9)
    assert torch.equal(centers, torch.zeros(5, 4))  # nothing ran
    with pytest.raises(TypeError, match="labels"):
        mc.class_center_update_(centers, x, torch.tensor([0, 1, 1], dtype=torch.int32), 0.9)
    with pytest.raises(TypeError, match="centers"):
        mc.class_center_update_(centers.double(), x, torch.tensor([0, 1, 1]), 0.9)
    with pytest.raises(ValueError, match="D = "):
        mc.class_center_update_(centers, torch.randn(3, 5), torch.tensor([0, 1, 1]), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        mc.class_center_update_(centers, x, torch.tensor([0, 1, 1]), 1.5)
    with pytest.raises(ValueError, match="contiguous"):
        mc.class_center_update_(torch.zeros(4, 5).t(), x, torch.tensor([0, 1, 1]), 0.9)


# ----------------------------------------------------------------------------- 2. statistics


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["random", "single_class", "ignored", "empty"])
def test_class_statistics_update_accumulates(dtype, case):
    g = _gen(4)
    C, D, B = 23, 13, 50
    w = torch.randn(C, D, generator=g).to(dtype)
    counts = torch.zeros(C, dtype=torch.int64)
    cos = torch.zeros(C, dtype=torch.float64)
    sq = torch.zeros(C, dtype=torch.float64)
    want = [torch.zeros_like(counts), torch.zeros_like(cos), torch.zeros_like(sq)]
    for step in range(3):
        x = torch.randn(B, D, generator=g).to(dtype)
        y = torch.randint(0, C, (B,), generator=g)
        if case == "single_class":
            y[:] = 7
        elif case == "ignored":
            y[::3] = -1
        elif case == "empty":
            x, y = x[:0], y[:0]
        ign = -1 if case == "ignored" else -100
        mc.class_statistics_update_(counts, cos, sq, x, w, y, ignore_index=ign)
        r = ref_statistics(C, x, w, y, ign)
        for a, b in zip(want, r):
            a += b
    assert torch.equal(counts, want[0])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(cos, want[1], rtol=0, atol=tol * 50)
    torch.testing.assert_close(sq, want[2], rtol=0, atol=tol * 50)


def test_class_statistics_mixed_dtypes_and_validation():
    g = _gen(5)
    C, D, B = 9, 8, 40
    w = torch.randn(C, D, generator=g)
    x = torch.randn(B, D, generator=g).bfloat16()
    y = torch.randint(0, C, (B,), generator=g)
    counts = torch.zeros(C, dtype=torch.int64)
    cos = torch.zeros(C, dtype=torch.float64)
    sq = torch.zeros(C, dtype=torch.float64)
    mc.class_statistics_update_(counts, cos, sq, x, w, y)
    r = ref_statistics(C, x, w, y, -100)
    assert torch.equal(counts, r[0])
    torch.testing.assert_close(cos, r[1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"= 9 is outside"):
        mc.class_statistics_update_(counts, cos, sq, x, w, torch.full((B,), 9))
    with pytest.raises(TypeError, match="target_cos_sum"):
        mc.class_statistics_update_(counts, cos.float(), sq, x, w, y)
    with pytest.raises(ValueError, match="counts"):
        mc.class_statistics_update_(counts[:3], cos, sq, x, w, y)
    assert torch.equal(counts, r[0])


# ----------------------------------------------------------------------------- 3. range loss


def _range_inputs(seed, B, D, num_classes, dtype=torch.float64):
    g = _gen(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, num_classes, (B,), generator=g) * 3 - 5  # labels are arbitrary group ids
    return x, y


@pytest.mark.parametrize(
    "B,D,num_classes,k,margin,alpha,beta",
    [
        (24, 7, 4, 2, 1.0, 1.0, 1.0),
        (30, 5, 6, 3, 50.0, 0.5, 2.0),  # active hinge
        (16, 9, 1, 2, 1.0, 1.0, 1.0),  # single class: no inter term
        (12, 4, 12, 2, 100.0, 1.0, 1.0),  # (mostly) singletons
        (20, 6, 3, 1000, 0.0, 1.0, 1.0),  # k larger than the number of pairs
        (1, 3, 1, 2, 1.0, 1.0, 1.0),
    ],
)
def test_range_loss_matches_reference_float64(B, D, num_classes, k, margin, alpha, beta):
    x, y = _range_inputs(B * 31 + D, B, D, num_classes)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    got = mc.range_loss(x1, y, k, margin, alpha, beta)
    want = ref_range_loss(x2, y, k, margin, alpha, beta)
    assert got.dtype == torch.float64 and got.shape == ()
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    got.backward()
    if want.requires_grad:
        want.backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    else:
        assert torch.count_nonzero(x1.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_range_loss_low_precision_inputs(dtype):
    x, y = _range_inputs(7, 40, 16, 5, dtype=dtype)
    x1 = x.clone().requires_grad_()
    got = mc.range_loss(x1, y, 2, 30.0)
    assert got.dtype == torch.float32
    xr = x.double().requires_grad_()
    want = ref_range_loss(xr, y, 2, 30.0, 1.0, 1.0)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    got.backward()
    want.backward()
    assert x1.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x1.grad.double(), xr.grad, rtol=tol, atol=tol)


def test_range_loss_gradcheck():
    x, y = _range_inputs(11, 14, 5, 3)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: mc.range_loss(t, y, 2, 40.0, 0.7, 1.3), (x,))


def test_range_loss_identical_rows_are_finite():
    g = _gen(12)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    x[1] = x[0]  # class 0 = {0, 1}: its only distance is 0
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    xx = x.clone().requires_grad_()
    loss = mc.range_loss(xx, y, k=2, margin=0.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xx.grad).all()
    # class 0's harmonic term is its limit 0; the others as in the reference
    want = ref_range_loss(x, y, 2, 0.0, 1.0, 1.0)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(xx.grad[:2]) == 0
    # all rows identical: loss 0, gradient 0
    z = torch.ones(6, 3, dtype=torch.float64, requires_grad=True)
    loss = mc.range_loss(z, torch.tensor([0, 0, 0, 1, 1, 1]), margin=0.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(z.grad) == 0


def test_range_loss_empty_and_validation():
    x = torch.zeros(0, 5, requires_grad=True)
    loss = mc.range_loss(x, torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert float(loss.detach()) == 0.0 and x.grad.shape == (0, 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        mc.range_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), k=0)
    with pytest.raises(TypeError, match="labels"):
        mc.range_loss(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="labels has 3"):
        mc.range_loss(torch.randn(4, 3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"embeddings has shape \(4, 0\): rows need D >= 1"):  # not a null pointer
        mc.range_loss(torch.randn(4, 0), torch.zeros(4, dtype=torch.int64))


# ----------------------------------------------------------------------------- 4. Partial FC sampling

_MASK = (1 << 64) - 1


def _mix64(z):
    z &= _MASK
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _MASK
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return z


def ref_partial_fc(labels, start, stop, num_sample, seed):
    n = stop - start
    pos = sorted({int(v) - start for v in labels.tolist() if start <= v < stop})
    S = max(len(pos), min(num_sample, n))
    salt = _mix64((seed % (1 << 64)) + 0x9E3779B97F4A7C15)
    neg = [c for c in range(n) if c not in set(pos)]
    neg.sort(key=lambda c: _mix64((start + c) ^ salt))
    index = sorted(pos + neg[: S - len(pos)])
    where = {c: i for i, c in enumerate(index)}
    local = [where[int(v) - start] if start <= v < stop else -1 for v in labels.tolist()]
    return torch.tensor(index, dtype=torch.int64), torch.tensor(local, dtype=torch.int64)


@pytest.mark.parametrize(
    "start,stop,num_sample,B",
    [(0, 100, 30, 20), (40, 97, 10, 25), (10, 20, 100, 8), (0, 50, 0, 12), (5, 5, 3, 4), (0, 1000, 999, 0)],
)
def test_partial_fc_sample_matches_definition(start, stop, num_sample, B):
    g = _gen(start + stop)
    labels = torch.randint(-3, 130, (B,), generator=g)
    labels[: B // 4] = -100
    for seed in (0, 1, 2**40 + 5, -7):
        index, local = mc.partial_fc_sample(labels, start, stop, num_sample, seed)
        want_index, want_local = ref_partial_fc(labels, start, stop, num_sample, seed)
        assert torch.equal(index, want_index)
        assert torch.equal(local, want_local)
        # invariants, independently of the reference
        assert index.dtype == torch.int64 and local.dtype == torch.int64
        assert torch.all(index[1:] > index[:-1])
        inside = (labels >= start) & (labels < stop)
        assert torch.equal(index[local[inside]] + start, labels[inside])
        assert torch.all(local[~inside] == -1)


def test_partial_fc_sample_reproducible_and_uniform():
    labels = torch.tensor([3, 3, 7, -1])
    a = mc.partial_fc_sample(labels, 0, 40, 10, 123)
    b = mc.partial_fc_sample(labels, 0, 40, 10, 123)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], mc.partial_fc_sample(labels, 0, 40, 10, 124)[0])
    # each of the 38 negatives should be drawn with probability 8/38
    hits = torch.zeros(40)
    trials = 600
    for seed in range(trials):
        idx, _ = mc.partial_fc_sample(labels, 0, 40, 10, seed)
        assert idx.numel() == 10 and 3 in idx.tolist() and 7 in idx.tolist()
        hits[idx] += 1
    p = 8 / 38
    neg = torch.tensor([c for c in range(40) if c not in (3, 7)])
    z = (hits[neg] / trials - p) / math.sqrt(p * (1 - p) / trials)
    assert z.abs().max() < 4.5, z
    assert hits[3] == trials and hits[7] == trials


def test_partial_fc_sample_validation():
    labels = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="class_stop"):
        mc.partial_fc_sample(labels, 10, 5, 3, 0)
    with pytest.raises(ValueError, match="num_sample"):
        mc.partial_fc_sample(labels, 0, 5, -1, 0)
    with pytest.raises(TypeError, match="labels"):
        mc.partial_fc_sample(labels.int(), 0, 5, 3, 0)


# ----------------------------------------------------------------------------- 5. sparse optimizers


def _row_params(w):
    return [torch.nn.Parameter(w[c].clone()) for c in range(w.shape[0])]


# float32 steps agree with torch.optim to about an ulp; float64 ones are stepped in double as
# torch.optim steps them (float32 arithmetic on a float64 weight is ~6e-8 off)
STEP_TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-14, atol=1e-16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "momentum,weight_decay,dampening,nesterov,use_flags",
    [
        (0.0, 0.0, 0.0, False, False),
        (0.9, 0.0, 0.0, False, False),
        (0.9, 1e-2, 0.0, True, False),
        (0.8, 5e-3, 0.3, False, True),
        (0.9, 0.0, 0.0, True, True),
    ],
)
def test_sparse_sgd_matches_torch_sgd_per_row(momentum, weight_decay, dampening, nesterov, use_flags, dtype):
    g = _gen(21)
    C, D, steps = 30, 11, 6
    w = torch.randn(C, D, generator=g, dtype=dtype)
    params = _row_params(w)
    opt = torch.optim.SGD(params, lr=0.05, momentum=momentum, weight_decay=weight_decay, dampening=dampening,
                          nesterov=nesterov, foreach=False)
    buf = torch.zeros_like(w)
    flags = torch.zeros(C, dtype=torch.bool) if use_flags else None
    for _ in range(steps):
        rows = torch.randperm(C, generator=g)[: 1 + int(torch.randint(0, C // 2, (1,), generator=g))]
        grad = torch.randn(rows.numel(), D, generator=g, dtype=dtype)
        w_before, buf_before = w.clone(), buf.clone()
        mc.sparse_sgd_step_(w, grad, buf, rows, 0.05, momentum, weight_decay, dampening, nesterov,
                            initialized=flags)
        for p in params:
            p.grad = None
        for j, r in enumerate(rows.tolist()):
            params[r].grad = grad[j].clone()
        opt.step()
        other = torch.ones(C, dtype=torch.bool)
        other[rows] = False
        assert torch.equal(w[other], w_before[other])
        assert torch.equal(buf[other], buf_before[other])
        want = torch.stack([p.detach() for p in params])
        torch.testing.assert_close(w, want, **STEP_TOLERANCE[dtype])
        if momentum:
            for r in rows.tolist():
                torch.testing.assert_close(buf[r], opt.state[params[r]]["momentum_buffer"], **STEP_TOLERANCE[dtype])
        else:
            assert torch.count_nonzero(buf) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay,betas", [(0.01, (0.9, 0.999)), (0.0, (0.8, 0.99)), (0.1, (0.5, 0.9))])
def test_sparse_adamw_matches_torch_adamw_per_row(weight_decay, betas, dtype):
    g = _gen(22)
    C, D, steps = 25, 9, 7
    w = torch.randn(C, D, generator=g, dtype=dtype)
    params = _row_params(w)
    opt = torch.optim.AdamW(params, lr=1e-2, betas=betas, eps=1e-8, weight_decay=weight_decay, foreach=False)
    m1, m2 = torch.zeros_like(w), torch.zeros_like(w)
    step = torch.zeros(C, dtype=torch.int64)
    for _ in range(steps):
        rows = torch.randperm(C, generator=g)[: 1 + int(torch.randint(0, C, (1,), generator=g))]
        grad = torch.randn(rows.numel(), D, generator=g, dtype=dtype)
        before = [t.clone() for t in (w, m1, m2, step)]
        mc.sparse_adamw_step_(w, grad, m1, m2, step, rows, 1e-2, betas[0], betas[1], 1e-8, weight_decay)
        for p in params:
            p.grad = None
        for j, r in enumerate(rows.tolist()):
            params[r].grad = grad[j].clone()
        opt.step()
        other = torch.ones(C, dtype=torch.bool)
        other[rows] = False
        for t, b in zip((w, m1, m2, step), before):
            assert torch.equal(t[other], b[other])
        want = torch.stack([p.detach() for p in params])
        tol = STEP_TOLERANCE[dtype]
        torch.testing.assert_close(w, want, **tol)
        for r in rows.tolist():
            st = opt.state[params[r]]
            assert int(step[r]) == int(st["step"])
            torch.testing.assert_close(m1[r], st["exp_avg"], **tol)
            torch.testing.assert_close(m2[r], st["exp_avg_sq"], rtol=tol["rtol"], atol=tol["atol"] / 100)


def test_sparse_steps_bf16_close_to_float32():
    g = _gen(23)
    C, D = 10, 8
    w = torch.randn(C, D, generator=g)
    rows = torch.tensor([1, 4, 7])
    grad = torch.randn(3, D, generator=g)
    wb, bb = w.bfloat16(), torch.zeros(C, D, dtype=torch.bfloat16)
    wf, bf = w.clone(), torch.zeros(C, D)
    mc.sparse_sgd_step_(wb, grad.bfloat16(), bb, rows, 0.1, 0.9)
    mc.sparse_sgd_step_(wf, grad.bfloat16().float(), bf, rows, 0.1, 0.9)
    torch.testing.assert_close(wb.float(), wf, rtol=1e-2, atol=1e-2)


def test_sparse_steps_validation():
    w = torch.randn(6, 3)
    buf = torch.zeros_like(w)
    grad = torch.randn(2, 3)
    with pytest.raises(ValueError, match="duplicates"):
        mc.sparse_sgd_step_(w, grad, buf, torch.tensor([2, 2]), 0.1, 0.9)
    with pytest.raises(ValueError, match=r"rows contains 6"):
        mc.sparse_sgd_step_(w, grad, buf, torch.tensor([1, 6]), 0.1)
    with pytest.raises(ValueError, match=r"rows contains -1"):
        mc.sparse_sgd_step_(w, grad, buf, torch.tensor([-1, 0]), 0.1)
    with pytest.raises(ValueError, match="grad must have shape"):
        mc.sparse_sgd_step_(w, torch.randn(3, 3), buf, torch.tensor([1, 2]), 0.1)
    with pytest.raises(TypeError, match="grad"):
        mc.sparse_sgd_step_(w, grad.double(), buf, torch.tensor([1, 2]), 0.1)
    m1, m2, st = torch.zeros_like(w), torch.zeros_like(w), torch.zeros(6, dtype=torch.int64)
    with pytest.raises(ValueError, match="duplicates"):
        mc.sparse_adamw_step_(w, grad, m1, m2, st, torch.tensor([3, 3]), 0.1)
    with pytest.raises(ValueError, match="beta1"):
        mc.sparse_adamw_step_(w, grad, m1, m2, st, torch.tensor([3, 4]), 0.1, beta1=1.0)
    with pytest.raises(TypeError, match="step"):
        mc.sparse_adamw_step_(w, grad, m1, m2, st.int(), torch.tensor([3, 4]), 0.1)
    assert torch.count_nonzero(st) == 0 and torch.count_nonzero(buf) == 0
    # empty rows: a no-op
    w0 = w.clone()
    mc.sparse_adamw_step_(w, grad[:0], m1, m2, st, torch.zeros(0, dtype=torch.int64), 0.1)
    assert torch.equal(w, w0)


# ----------------------------------------------------------------------------- opcheck


def _opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs or {})


def test_opcheck_class_center_update():
    g = _gen(30)
    centers = F.normalize(torch.randn(8, 5, generator=g), dim=1)
    _opcheck(torch.ops.marginkit.class_center_update_.default,
             (centers, torch.randn(6, 5, generator=g), torch.tensor([0, 1, 1, -100, 7, 0]), 0.9, -100))


def test_opcheck_class_statistics_update():
    g = _gen(31)
    C = 8
    _opcheck(torch.ops.marginkit.class_statistics_update_.default,
             (torch.zeros(C, dtype=torch.int64), torch.zeros(C, dtype=torch.float64),
              torch.zeros(C, dtype=torch.float64), torch.randn(6, 5, generator=g), torch.randn(C, 5, generator=g),
              torch.tensor([0, 1, 1, -100, 7, 0]), -100))


def test_opcheck_range_loss():
    g = _gen(32)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    _opcheck(torch.ops.marginkit.range_loss_forward.default, (x, y, 2, 30.0, 1.0, 1.0))
    row_seg, sel, coef, closest, inter = torch.ops.marginkit.range_loss_forward(x.detach(), y, 2, 30.0, 1.0, 1.0)[1:]
    _opcheck(torch.ops.marginkit.range_loss_backward.default,
             (torch.tensor(1.0, dtype=torch.float64), x.detach(), row_seg, sel, coef, closest, inter))


def test_opcheck_partial_fc_sample():
    _opcheck(torch.ops.marginkit.partial_fc_sample.default, (torch.tensor([3, 9, 3, -1, 40]), 2, 30, 10, 5))


def test_opcheck_sparse_steps():
    g = _gen(33)
    w = torch.randn(7, 4, generator=g)
    _opcheck(torch.ops.marginkit.sparse_sgd_step_.default,
             (w.clone(), torch.randn(3, 4, generator=g), torch.zeros(7, 4), torch.tensor([5, 0, 2]), 0.1, 0.9, 0.01,
              0.1, False, torch.zeros(7, dtype=torch.bool)))
    _opcheck(torch.ops.marginkit.sparse_adamw_step_.default,
             (w.clone(), torch.randn(3, 4, generator=g), torch.zeros(7, 4), torch.zeros(7, 4),
              torch.zeros(7, dtype=torch.int64), torch.tensor([5, 0, 2]), 1e-3, 0.9, 0.999, 1e-8, 0.01))


# ----------------------------------------------------------------------------- 16-bit conversions


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_conversions_match_torch(dtype):
    """The CPU kernels' own float16/bfloat16 <-> float32 conversions (csrc/common.h) are exact
    and round to nearest even like torch: checked on every bit pattern through an SGD step."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    w = bits.view(dtype).reshape(-1, 1).clone()
    finite = torch.isfinite(w.float()).squeeze(1)
    w = w[finite].contiguous()
    rows = torch.arange(w.shape[0])
    # lr = 0: a pure round trip
    w0 = w.clone()
    mc.sparse_sgd_step_(w0, torch.zeros_like(w), torch.zeros_like(w), rows, 0.0)
    assert torch.equal(w0.view(torch.int16), w.view(torch.int16))
    # w - lr * g in float32, then rounded: compare with torch's rounding of the same float32 value
    g = torch.randn(w.shape, generator=_gen(40)).to(dtype)
    for lr in (1e-3, 0.37, 3e4):
        got = w.clone()
        mc.sparse_sgd_step_(got, g, torch.zeros_like(w), rows, lr)
        want = (w.float() + (-lr) * g.float()).to(dtype)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_partial_fc_sample_accepts_any_python_int_seed():
    labels = torch.tensor([1, 5, 9])
    for big, small in ((2**70 + 3, 3), (2**64 - 1, -1), (2**63, -(2**63))):
        a = mc.partial_fc_sample(labels, 0, 100, 10, big)
        b = mc.partial_fc_sample(labels, 0, 100, 10, small)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sparse_sgd_schema_has_no_defaults():
    """The dispatcher drops trailing arguments equal to their schema defaults; torch 2.11's
    version bump for mutated inputs then indexed `initialized` (argument 9) past the end and
    raised IndexError on CUDA (seen on an H200). Without defaults nothing is dropped."""
    schema = torch.ops.marginkit.sparse_sgd_step_.default._schema
    assert [a.name for a in schema.arguments][-1] == "initialized"
    assert not any(a.has_default_value() for a in schema.arguments)
