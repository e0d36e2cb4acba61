"""The loss under CUDA-graph capture (``marginkit/cuda_graphs.py``).

On a GPU: a captured forward + backward replays to the eager numbers on new inputs, a bad label
copied into the static labels is left out, and first-call work (a new margin's constants, an
untuned shape) refuses capture with ``CudaGraphWarmupError``. The CPU twins pretend a capture is
under way (torch.cuda's two capture queries patched) and check what the pipeline does then: no
host check and no deferred flag, bad rows left out on both backends and both target-column
paths, cold constants refused, heads that read the host every step refused.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import marginkit as mk  # noqa: E402
from marginkit import _pipeline  # noqa: E402
from marginkit.cuda_graphs import CudaGraphWarmupError  # noqa: E402
from marginkit.distributed import PartitionedMarginSoftmax  # noqa: E402

IGNORE = -100
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def pretend_capture(monkeypatch):
    """Make ``marginkit.cuda_graphs.capturing()`` true on a CPU, with the CUDA label-check path."""
    monkeypatch.setattr(_pipeline, "DEFERRED_LABEL_CHECK_DEVICES", ("cpu",))
    _pipeline._pending.clear()
    state = {"on": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["on"])
    yield state
    _pipeline._pending.clear()


def cpu_inputs(seed=0, B=8, C=13, D=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randn(C, D, generator=g), torch.randint(0, C, (B,), generator=g)


def loss_and_grads(x, w, y, spec, **kw):
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(xl, wl, y, spec, 16.0, **kw)
    loss.backward()
    return loss.detach(), xl.grad, wl.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spec", [mk.ArcFace(0.5), mk.CombinedMargin(1.2, 0.2, 0.1)], ids=["fused-target", "torch-target"])
def test_a_capture_skips_the_host_checks_and_leaves_bad_rows_out(pretend_capture, backend, spec):
    x, w, y = cpu_inputs()
    y[3] = 4
    margins = torch.full((13,), 0.3)
    ignored = y.clone()
    ignored[[2, 5, 3]] = IGNORE
    want = loss_and_grads(x, w, ignored, spec, backend=backend, class_margins=margins)  # eager: also the warm-up
    mk.functional.check_pending_labels(wait=True)  # the eager call's flags, read
    bad = y.clone()
    bad[2], bad[5] = 13, -7  # out of range on both sides
    bad_margins = margins.clone()
    bad_margins[4] = float("nan")  # row 3's class
    pretend_capture["on"] = True
    got = loss_and_grads(x, w, bad, spec, backend=backend, class_margins=bad_margins)
    assert not _pipeline._pending  # nothing for the host to read: a replay would never read it
    pretend_capture["on"] = False
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    mk.functional.check_pending_labels(wait=True)  # and no error surfaces later


def test_a_capture_refuses_a_margin_whose_constants_were_never_made(pretend_capture):
    x, w, y = cpu_inputs(seed=1)
    spec = mk.ArcFace(0.4321)  # no other test uses this m
    pretend_capture["on"] = True
    with pytest.raises(CudaGraphWarmupError, match="run the step eagerly once"):
        mk.margin_cross_entropy(x, w, y, spec, 16.0, backend="triton")
    pretend_capture["on"] = False
    want = mk.margin_cross_entropy(x, w, y, spec, 16.0, backend="triton")  # the warm-up ...
    pretend_capture["on"] = True
    got = mk.margin_cross_entropy(x, w, y, spec, 16.0, backend="triton")  # ... then capture is fine
    assert torch.equal(got, want)


def test_a_capture_refuses_heads_that_read_the_host_each_step_and_leaves_their_state(pretend_capture):
    x, _, y = cpu_inputs(seed=2)
    head = mk.nn.CurricularFace(13, 16)
    t_before = head.t.clone()
    partitioned = PartitionedMarginSoftmax(13, 16, mk.ArcFace(0.5), 16.0)  # one process: no group
    pretend_capture["on"] = True
    with pytest.raises(RuntimeError, match="CurricularFace keeps running state.*CUDA-graph replay"):
        head(x, y)
    assert torch.equal(head.t, t_before)
    with pytest.raises(RuntimeError, match="PartitionedMarginSoftmax checks every rank's input.*CUDA-graph"):
        partitioned(x, y)
    stateless = mk.nn.MarginSoftmax(13, 16, mk.ArcFace(0.5), 16.0, backend="torch")
    assert torch.isfinite(stateless(x, y))  # a stateless head captures like the function


# ----------------------------------------------------------------------------------------
# On a GPU: real capture and replay
# ----------------------------------------------------------------------------------------
def cuda_inputs(seed, B, C, D, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, D, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
    w = torch.randn(C, D, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
    y = torch.randint(0, C, (B,), device="cuda", generator=g)
    return x, w, y


def capture_step(x, w, y, spec, warmup=2, **kw):
    """Warm up on a side stream (torch.cuda.graph's recipe), then capture forward + backward."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            x.grad = w.grad = None
            mk.margin_cross_entropy(x, w, y, spec, 64.0, **kw).backward()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = mk.margin_cross_entropy(x, w, y, spec, 64.0, **kw)
        loss.backward()
    return graph, loss


def eager_step(x, w, y, spec, **kw):
    xe, we = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(xe, we, y, spec, 64.0, **kw)
    loss.backward()
    return loss.detach(), xe.grad, we.grad


@gpu
@needs_cuda
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "autotuned"])
def test_gpu_a_captured_step_replays_to_the_eager_numbers_on_new_inputs(deterministic):
    # C = 70 000 at B = 256 bf16: two backward chunks, the second partial
    x, w, y = cuda_inputs(0, 256, 70000, 128)
    graph, loss = capture_step(x, w, y, mk.ArcFace(0.5), deterministic=deterministic)
    for seed in (1, 2):
        nx, nw, ny = cuda_inputs(seed, 256, 70000, 128)
        with torch.no_grad():
            x.copy_(nx)
            w.copy_(nw)
        y.copy_(ny)
        graph.replay()
        want = eager_step(x, w, y, mk.ArcFace(0.5), deterministic=deterministic)
        if deterministic:  # pinned tiles: the replay is the eager step, bit for bit
            assert torch.equal(loss, want[0]) and torch.equal(x.grad, want[1]) and torch.equal(w.grad, want[2])
        else:  # atomics in the column sums: equal up to summation order
            torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=0)
            torch.testing.assert_close(x.grad, want[1], rtol=2e-2, atol=1e-6)
            torch.testing.assert_close(w.grad, want[2], rtol=2e-2, atol=1e-6)


@gpu
@needs_cuda
def test_gpu_a_replay_leaves_a_bad_label_out_without_an_error():
    x, w, y = cuda_inputs(3, 128, 5000, 64)
    graph, loss = capture_step(x, w, y, mk.ArcFace(0.5), deterministic=True)
    ignored = y.clone()
    ignored[7] = IGNORE
    want = eager_step(x, w, ignored, mk.ArcFace(0.5), deterministic=True)
    y[7] = 5000  # out of range, copied into the captured labels
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, want[0]) and torch.equal(w.grad, want[2])
    assert not torch.any(x.grad[7])
    mk.functional.check_pending_labels(wait=True)  # a replay reports nothing: validate labels upstream


@gpu
@needs_cuda
def test_gpu_a_capture_without_warm_up_raises_the_warm_up_error():
    x, w, y = cuda_inputs(4, 96, 3000, 32)  # a shape and margin no other test runs
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(CudaGraphWarmupError):
        with torch.cuda.graph(graph):
            mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.4567), 64.0).backward()


@gpu
@needs_cuda
def test_gpu_torch_compile_reduce_overhead_matches_eager():
    """torch.compile's CUDA-graph mode: the first calls warm up and record, the later ones replay."""

    def loss_fn(x, w, y):
        return mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 64.0, deterministic=True)

    compiled = torch.compile(loss_fn, mode="reduce-overhead")
    for seed in (5, 6, 7, 8):
        x, w, y = cuda_inputs(seed, 128, 20000, 64)
        loss = compiled(x, w, y)
        loss.backward()
        want = eager_step(x, w, y, mk.ArcFace(0.5), deterministic=True)
        torch.testing.assert_close(loss.detach().clone(), want[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(x.grad, want[1], rtol=2e-2, atol=1e-6)
        torch.testing.assert_close(w.grad, want[2], rtol=2e-2, atol=1e-6)
