"""CUDA csrc ops against their CPU twins (skipped without a GPU).

Every test here runs the same op on a CUDA copy and a CPU copy of the same inputs. The CPU
versions are checked against plain PyTorch in test_csrc_ops.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

mc = pytest.importorskip("marginkit.ops")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_cuda_kernels_are_built():
    assert mc.cuda_available(), "a GPU is present but marginkit._C was built without CUDA"
    assert mc.build_info()["cuda"] is True


# ----------------------------------------------------------------------------- 1. centers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("C,D,B,pool", [(1_000_000, 128, 8192, 3000), (1000, 96, 512, 1), (64, 1030, 300, 40)])
def test_class_center_update_cuda_matches_cpu(dtype, C, D, B, pool):
    g = _gen(C + D + B)
    centers = F.normalize(torch.randn(C, D, generator=g), dim=1)
    x = torch.randn(B, D, generator=g).to(dtype)
    classes = torch.randint(0, C, (pool,), generator=g)
    y = classes[torch.randint(0, pool, (B,), generator=g)]  # many duplicates
    y[::7] = -100
    cpu = centers.clone()
    mc.class_center_update_(cpu, x, y, 0.9)
    gpu = centers.to(DEV)
    mc.class_center_update_(gpu, x.to(DEV), y.to(DEV), 0.9)
    torch.cuda.synchronize()
    out = gpu.cpu()
    torch.testing.assert_close(out, cpu, rtol=0, atol=2e-6)
    touched = torch.zeros(C, dtype=torch.bool)
    touched[y[y != -100]] = True
    assert torch.equal(out[~touched], centers[~touched])
    again = centers.to(DEV)
    mc.class_center_update_(again, x.to(DEV), y.to(DEV), 0.9)
    assert torch.equal(again, gpu)  # deterministic


def test_class_center_update_cuda_empty_and_errors():
    centers = torch.randn(10, 4, device=DEV)
    before = centers.clone()
    mc.class_center_update_(centers, torch.randn(0, 4, device=DEV), torch.zeros(0, dtype=torch.int64, device=DEV), 0.5)
    assert torch.equal(centers, before)
    with pytest.raises(ValueError, match="= 10 is outside"):
        mc.class_center_update_(centers, torch.randn(2, 4, device=DEV), torch.tensor([1, 10], device=DEV), 0.5)
    with pytest.raises(TypeError, match="labels"):
        mc.class_center_update_(centers, torch.randn(2, 4, device=DEV), torch.tensor([1, 2]), 0.5)


# ----------------------------------------------------------------------------- 2. statistics


@pytest.mark.parametrize("xdtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float16), (torch.float64, torch.float64)])
def test_class_statistics_update_cuda_matches_cpu(xdtype, wdtype):
    g = _gen(5)
    C, D, B = 1_000_000, 64, 8192
    w = torch.randn(C, D, generator=g).to(wdtype)
    counts = torch.randint(0, 5, (C,), generator=g)
    cos = torch.randn(C, generator=g, dtype=torch.float64)
    sq = torch.rand(C, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g).to(xdtype)
    y = torch.randint(0, 4000, (B,), generator=g) * 250
    y[::9] = -1
    cpu = [counts.clone(), cos.clone(), sq.clone()]
    mc.class_statistics_update_(*cpu, x, w, y, ignore_index=-1)
    gpu = [counts.to(DEV), cos.to(DEV), sq.to(DEV)]
    mc.class_statistics_update_(*gpu, x.to(DEV), w.to(DEV), y.to(DEV), ignore_index=-1)
    assert torch.equal(gpu[0].cpu(), cpu[0])
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- 3. range loss


@pytest.mark.parametrize(
    "B,D,num_classes,k,margin,dtype",
    [
        (8192, 128, 512, 2, 1.0, torch.float32),
        (8192, 64, 700, 3, 1e4, torch.float64),  # active hinge
        (2000, 32, 1, 5, 1.0, torch.float64),  # one big class: 2M pairs over several blocks
        (300, 20, 290, 2, 1e4, torch.float32),  # mostly singletons
        (64, 16, 4, 300, 1.0, torch.float64),  # k above the pairs of some classes, > 64 (one split)
        (512, 8, 16, 2, 10.0, torch.bfloat16),
    ],
)
def test_range_loss_cuda_matches_cpu(B, D, num_classes, k, margin, dtype):
    g = _gen(B + D)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, num_classes, (B,), generator=g) * 7 - 3
    xc = x.clone().requires_grad_()
    xg = x.to(DEV).requires_grad_()
    lc = mc.range_loss(xc, y, k, margin, 0.5, 2.0)
    lg = mc.range_loss(xg, y.to(DEV), k, margin, 0.5, 2.0)
    assert lg.dtype == lc.dtype and lg.device.type == "cuda"
    rtol = 1e-10 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(lg.detach().cpu(), lc.detach(), rtol=rtol, atol=rtol)
    # the saved selection agrees exactly (same tie rules)
    out_c = torch.ops.marginkit.range_loss_forward(x, y, k, margin, 0.5, 2.0)
    out_g = torch.ops.marginkit.range_loss_forward(x.to(DEV), y.to(DEV), k, margin, 0.5, 2.0)
    for i in (1, 2, 4):
        assert torch.equal(out_g[i].cpu(), out_c[i]), i
    (lc * 1.5).backward()
    (lg * 1.5).backward()
    gtol = 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(xg.grad.cpu().double(), xc.grad.double(), rtol=gtol, atol=gtol)


def test_range_loss_cuda_identical_rows_and_empty():
    x = torch.ones(6, 3, device=DEV, dtype=torch.float64, requires_grad=True)
    loss = mc.range_loss(x, torch.tensor([0, 0, 0, 1, 1, 1], device=DEV), margin=0.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(x.grad) == 0
    e = torch.zeros(0, 4, device=DEV, requires_grad=True)
    loss = mc.range_loss(e, torch.zeros(0, dtype=torch.int64, device=DEV))
    loss.backward()
    assert float(loss.detach()) == 0.0


# ----------------------------------------------------------------------------- 4. Partial FC


@pytest.mark.parametrize(
    "start,stop,num_sample,B",
    [(0, 1_000_000, 100_000, 8192), (3_000_000, 4_000_003, 50_000, 8192), (0, 1000, 5000, 64), (10, 900, 0, 128),
     (0, 5000, 4990, 512), (7, 7, 10, 32), (0, 100, 50, 0)],
)
def test_partial_fc_sample_cuda_is_bit_identical_to_cpu(start, stop, num_sample, B):
    g = _gen(start + B)
    labels = torch.randint(max(0, start - 1000), stop + 1000, (B,), generator=g)
    if B:
        labels[::11] = -100
    for seed in (0, 12345, -1):
        ic, lc = mc.partial_fc_sample(labels, start, stop, num_sample, seed)
        ig, lg = mc.partial_fc_sample(labels.to(DEV), start, stop, num_sample, seed)
        assert ig.device.type == "cuda"
        assert torch.equal(ig.cpu(), ic)
        assert torch.equal(lg.cpu(), lc)


# ----------------------------------------------------------------------------- 5. sparse optimizers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sparse_sgd_cuda_matches_cpu(dtype):
    g = _gen(9)
    C, D, R = 1_000_000, 128, 8192
    w = torch.randn(C, D, generator=g).to(dtype)
    buf = torch.zeros(C, D, dtype=dtype)
    flags = torch.zeros(C, dtype=torch.bool)
    wc, bc, fc = w.clone(), buf.clone(), flags.clone()
    wg, bg, fg = w.to(DEV), buf.to(DEV), flags.to(DEV)
    for step in range(3):
        rows = torch.randperm(C, generator=g)[:R]
        grad = torch.randn(R, D, generator=g).to(dtype)
        before = wg.clone()
        mc.sparse_sgd_step_(wc, grad, bc, rows, 0.1, 0.9, 1e-4, 0.1, False, initialized=fc)
        mc.sparse_sgd_step_(wg, grad.to(DEV), bg, rows.to(DEV), 0.1, 0.9, 1e-4, 0.1, False, initialized=fg)
        other = torch.ones(C, dtype=torch.bool, device=DEV)
        other[rows.to(DEV)] = False
        assert torch.equal(wg[other], before[other])
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]  # float64 steps in double
    torch.testing.assert_close(wg.cpu(), wc, rtol=tol, atol=tol)
    torch.testing.assert_close(bg.cpu(), bc, rtol=tol, atol=tol)
    assert torch.equal(fg.cpu(), fc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sparse_adamw_cuda_matches_cpu(dtype):
    g = _gen(10)
    C, D, R = 1_000_000, 128, 8192
    w = torch.randn(C, D, generator=g).to(dtype)
    state_c = [w.clone(), torch.zeros(C, D, dtype=dtype), torch.zeros(C, D, dtype=dtype),
               torch.zeros(C, dtype=torch.int64)]
    state_g = [t.to(DEV) for t in state_c]
    for step in range(3):
        rows = torch.randperm(C, generator=g)[:R] if step != 1 else torch.arange(R)  # some rows repeat steps
        grad = torch.randn(R, D, generator=g).to(dtype)
        mc.sparse_adamw_step_(state_c[0], grad, state_c[1], state_c[2], state_c[3], rows, 1e-3)
        mc.sparse_adamw_step_(state_g[0], grad.to(DEV), state_g[1], state_g[2], state_g[3], rows.to(DEV), 1e-3)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    for a, b in zip(state_g[:3], state_c[:3]):
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)
    assert torch.equal(state_g[3].cpu(), state_c[3])


def test_sparse_steps_cuda_duplicate_rows_raise_before_running():
    w = torch.randn(5, 3, device=DEV)
    before = w.clone()
    with pytest.raises(ValueError, match="duplicates"):
        mc.sparse_sgd_step_(w, torch.randn(2, 3, device=DEV), torch.zeros_like(w), torch.tensor([1, 1], device=DEV), 0.1)
    assert torch.equal(w, before)


# ----------------------------------------------------------------------------- streams, opcheck


def test_ops_run_on_the_current_stream():
    g = _gen(11)
    C, D, B = 5000, 64, 4096
    centers = F.normalize(torch.randn(C, D, generator=g), dim=1)
    x = torch.randn(B, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    cpu = centers.clone()
    mc.class_center_update_(cpu, x, y, 0.7)
    s = torch.cuda.Stream()
    gpu = centers.to(DEV)
    xg, yg = x.to(DEV), y.to(DEV)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mc.class_center_update_(gpu, xg, yg, 0.7)
        out = gpu.clone()  # ordered after the op on stream s
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(out.cpu(), cpu, rtol=0, atol=2e-6)


def test_opcheck_cuda():
    g = _gen(12)
    C, D = 40, 8
    x = torch.randn(12, D, generator=g).to(DEV)
    y = torch.randint(0, C, (12,), generator=g).to(DEV)
    torch.library.opcheck(torch.ops.marginkit.class_center_update_.default,
                          (F.normalize(torch.randn(C, D, device=DEV), dim=1), x, y, 0.9, -100))
    torch.library.opcheck(torch.ops.marginkit.class_statistics_update_.default,
                          (torch.zeros(C, dtype=torch.int64, device=DEV), torch.zeros(C, dtype=torch.float64, device=DEV),
                           torch.zeros(C, dtype=torch.float64, device=DEV), x, torch.randn(C, D, device=DEV), y, -100))
    xr = torch.randn(12, D, device=DEV, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.marginkit.range_loss_forward.default, (xr, y % 3, 2, 30.0, 1.0, 1.0))
    torch.library.opcheck(torch.ops.marginkit.partial_fc_sample.default, (y, 5, 30, 10, 3))
    torch.library.opcheck(torch.ops.marginkit.sparse_sgd_step_.default,
                          (torch.randn(C, D, device=DEV), torch.randn(3, D, device=DEV), torch.zeros(C, D, device=DEV),
                           torch.tensor([4, 0, 9], device=DEV), 0.1, 0.9, 0.0, 0.0, False, None))
    torch.library.opcheck(torch.ops.marginkit.sparse_adamw_step_.default,
                          (torch.randn(C, D, device=DEV), torch.randn(3, D, device=DEV), torch.zeros(C, D, device=DEV),
                           torch.zeros(C, D, device=DEV), torch.zeros(C, dtype=torch.int64, device=DEV),
                           torch.tensor([4, 0, 9], device=DEV), 1e-3, 0.9, 0.999, 1e-8, 0.01))
