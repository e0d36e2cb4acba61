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
from tests.helpers import SyncCounter, loss_and_grads, rel_err  # noqa: E402

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


def bad_rows_batch():
    """(x, w, labels with rows 2 and 5 out of range and row 3 on a class whose margin is NaN, the class
    margins, the same labels with those rows ignored, valid margins)."""
    x, w, y = cpu_inputs()
    y[3] = 4  # the only row of class 4
    margins = torch.full((13,), 0.3)
    ignored = y.clone()
    ignored[[2, 5, 3]] = IGNORE
    bad = y.clone()
    bad[2], bad[5] = 13, -7  # out of range on both sides
    bad_margins = margins.clone()
    bad_margins[4] = float("nan")
    return x, w, bad, bad_margins, ignored, margins


SPECS_BY_PATH = [mk.ArcFace(0.5), mk.CombinedMargin(1.2, 0.2, 0.1)]  # the Triton backend's fused / torch target column
SPEC_IDS = ["arcface", "combined-m1"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spec", SPECS_BY_PATH, ids=SPEC_IDS)
def test_a_capture_skips_the_host_checks_and_leaves_bad_rows_out(pretend_capture, backend, spec):
    x, w, bad, bad_margins, ignored, margins = bad_rows_batch()
    # eager: also the warm-up
    want = loss_and_grads(mk.margin_cross_entropy, x, w, ignored, spec, 16.0, backend=backend, class_margins=margins)
    mk.functional.check_pending_labels(wait=True)  # the eager call's flags, read
    pretend_capture["on"] = True
    with SyncCounter() as reads:
        got = loss_and_grads(
            mk.margin_cross_entropy, x, w, bad, spec, 16.0, backend=backend, class_margins=bad_margins
        )
        mk.functional.check_pending_labels()  # not read while capturing (an event query would fail there)
    assert reads.syncs == []  # each would be a device-to-host sync on CUDA: not allowed in a capture
    pretend_capture["on"] = False
    assert not _pipeline._pending  # nothing for the host to read: a replay would never read it
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spec", SPECS_BY_PATH, ids=SPEC_IDS)
def test_torch_compile_leaves_bad_rows_out_on_the_cpu_too(backend, spec):
    """fullgraph (aot_eager) on CPU tensors: the eager checks cannot run, the rows are still left out."""
    x, w, bad, bad_margins, ignored, margins = bad_rows_batch()
    want = loss_and_grads(mk.margin_cross_entropy, x, w, ignored, spec, 16.0, backend=backend, class_margins=margins)

    def step(xl, wl):
        return mk.margin_cross_entropy(xl, wl, bad, spec, 16.0, backend=backend, class_margins=bad_margins)

    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(xl, wl)
    loss.backward()
    for a, b in zip((loss.detach(), xl.grad, wl.grad), want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


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


def test_a_capture_refuses_modules_that_read_the_host_each_step_and_leaves_their_state(pretend_capture):
    x, w, y = cpu_inputs(seed=2)
    curricular = mk.nn.CurricularFace(13, 16)
    t_before = curricular.t.clone()
    eval_adacos = mk.nn.AdaCos(13, 16).eval()
    modules = {
        "CurricularFace reads its running t": curricular,
        "AdaCos reads its running scale": eval_adacos,  # in eval mode too: s is a kernel argument
        "LDAMSoftmax checks each batch on the host": mk.nn.LDAMSoftmax(13, 16),  # online counts
        "IRSoftmax checks each training batch": mk.nn.IRSoftmax(13, 16),
        "FairLoss checks each training batch": mk.nn.FairLoss(13, 16),
        "RangeLoss reads each batch on the host": mk.nn.RangeLoss(),
        "PartitionedMarginSoftmax checks every rank's input": PartitionedMarginSoftmax(13, 16, mk.ArcFace(0.5), 16.0),
    }
    pretend_capture["on"] = True
    for message, module in modules.items():
        with pytest.raises(RuntimeError, match=message + ".*CUDA-graph replay cannot do"):
            module(x, y)
    assert torch.equal(curricular.t, t_before)


def test_stateless_heads_capture_without_a_host_read(pretend_capture):
    """MarginSoftmax, SubCenterArcFace and offline LDAM read nothing on the host during a capture (an
    aten op that reads a value would sync on CUDA and fail there) and give the eager numbers."""
    x, w, y = cpu_inputs(seed=3)
    heads = [
        mk.nn.MarginSoftmax(13, 16, mk.ArcFace(0.5), 16.0, backend="triton"),
        mk.nn.SubCenterArcFace(13, 16, k=3),
        mk.nn.LDAMSoftmax(13, 16, class_counts=list(range(1, 14))),
    ]
    want = [head(x, y) for head in heads]
    mk.functional.check_pending_labels(wait=True)
    pretend_capture["on"] = True
    with SyncCounter() as reads:
        got = [head(x, y) for head in heads]
    assert reads.syncs == []
    for g, e in zip(got, want):
        assert torch.equal(g, e)


def test_tma_operands_capture_without_a_host_read(pretend_capture):
    """tuning(tma=True): the descriptors are made from tensor metadata on the host (no value read), so
    a capture of the step with TMA operands reads nothing either, and gives the eager numbers."""
    from marginkit.backends.triton import tuning

    x, w, y = cpu_inputs(seed=4)
    x, w = x.bfloat16(), w.bfloat16()  # 16-bit rows of 32 bytes: the copy engine can read them
    with tuning(tma=True):
        want = loss_and_grads(mk.margin_cross_entropy, x, w, y, mk.ArcFace(0.5), 16.0, backend="triton")
        mk.functional.check_pending_labels(wait=True)
        pretend_capture["on"] = True
        with SyncCounter() as reads:
            got = loss_and_grads(mk.margin_cross_entropy, x, w, y, mk.ArcFace(0.5), 16.0, backend="triton")
    assert reads.syncs == []
    for g, e in zip(got, want):
        assert torch.equal(g, e)


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


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "deterministic, tma", [(True, False), (False, False), (True, True)], ids=["deterministic", "autotuned", "tma"]
)
def test_gpu_a_captured_step_replays_to_the_eager_numbers_on_new_inputs(deterministic, tma):
    """With TMA operands (CPU twin: test_tma_operands_capture_without_a_host_read) the descriptors are
    encoded into the captured launches by value; the static tensors keep their addresses."""
    from marginkit.backends.triton import tuning

    # C = 70 000 at B = 256 bf16: two backward chunks, the second partial
    x, w, y = cuda_inputs(0, 256, 70000, 128)
    with tuning(tma=tma):
        graph, loss = capture_step(x, w, y, mk.ArcFace(0.5), deterministic=deterministic)
    for seed in (1, 2):
        nx, nw, ny = cuda_inputs(seed, 256, 70000, 128)
        with torch.no_grad():
            x.copy_(nx)
            w.copy_(nw)
        y.copy_(ny)
        graph.replay()
        with tuning(tma=tma):
            want = loss_and_grads(
                mk.margin_cross_entropy, x, w, y, mk.ArcFace(0.5), 64.0, deterministic=deterministic
            )
        if deterministic:  # pinned tiles: the replay is the eager step, bit for bit
            assert torch.equal(loss, want[0]) and torch.equal(x.grad, want[1]) and torch.equal(w.grad, want[2])
        else:  # atomics in the column sums and dX: equal up to summation order
            errors = [rel_err(got, ref) for got, ref in zip((loss, x.grad, w.grad), want)]
            assert errors[0] < 1e-5 and max(errors[1:]) < 1e-2, errors


@gpu
@needs_cuda
def test_gpu_a_replay_leaves_a_bad_label_out_without_an_error():
    x, w, y = cuda_inputs(3, 128, 5000, 64)
    graph, loss = capture_step(x, w, y, mk.ArcFace(0.5), deterministic=True)
    ignored = y.clone()
    ignored[7] = IGNORE
    want = loss_and_grads(mk.margin_cross_entropy, x, w, ignored, mk.ArcFace(0.5), 64.0, deterministic=True)
    y[7] = 5000  # out of range, copied into the captured labels
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, want[0]) and torch.equal(w.grad, want[2])
    assert not torch.any(x.grad[7])


@gpu
@needs_cuda
def test_gpu_a_capture_without_warm_up_raises_the_warm_up_error(monkeypatch):
    from marginkit.backends.triton import launch, launchers

    x, w, y = cuda_inputs(4, 96, 3000, 32)  # a margin no other test runs
    with pytest.raises(CudaGraphWarmupError, match="float64 margin constants"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.4567), 64.0).backward()
    mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.4567), 64.0).backward()  # the margin warm
    for launcher in vars(launchers).values():  # every kernel cold, whatever other tests ran in this process
        if isinstance(launcher, launch.KernelLauncher):
            for cache in ("picked", "pinned_configs", "plans", "handles"):
                monkeypatch.setattr(launcher, cache, {})
    x2, w2, y2 = cuda_inputs(5, 80, 2000, 48)
    for deterministic in (False, True):
        with pytest.raises(CudaGraphWarmupError, match="Autotuning|Compiling or loading"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                mk.margin_cross_entropy(x2, w2, y2, mk.ArcFace(0.4567), 64.0, deterministic=deterministic).backward()


@gpu
@needs_cuda
def test_gpu_torch_compile_reduce_overhead_matches_eager():
    """torch.compile's CUDA-graph mode: the first calls warm up and record, the later ones replay."""
    from torch._dynamo.utils import counters

    def loss_fn(x, w, y):
        return mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 64.0, deterministic=True)

    counters.clear()
    compiled = torch.compile(loss_fn, mode="reduce-overhead")
    for seed in (5, 6, 7, 8):
        x, w, y = cuda_inputs(seed, 128, 20000, 64)
        loss = compiled(x, w, y)
        loss.backward()
        want = loss_and_grads(mk.margin_cross_entropy, x, w, y, mk.ArcFace(0.5), 64.0, deterministic=True)
        errors = [rel_err(got, ref) for got, ref in zip((loss, x.grad, w.grad), want)]
        assert errors[0] < 1e-5 and max(errors[1:]) < 1e-2, errors
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
