"""The partitioned head's memory-budget mode and the dX reduce-scatter behind the dW GEMMs,
on the Triton backend (interpreter) over gloo at W = 2.

* ``memory_budget`` 0 / one chunk / None: loss and both gradients against the float64
  reference and the single-process loss (ArcFace, CosFace; uneven shards 52/51 classes,
  ignored rows, uneven local batches; sizes exchanged and ``max_local_batch`` declared), and
  which chunks the backward took from the store (kernel launches counted);
* the order of a backward: every kernel launch through passes.py's launchers and the
  reduce-scatter, recorded: the reduce-scatter is issued before the deferred dW launches;
* a second and a third backward through the same graph (``retain_graph=True``) recompute and are right;
* Partial FC with the store over the sampled rows equals the same head without a store;
* nothing new on the wire, and still 0 host syncs in a declared step.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("triton")

import marginkit as mk  # noqa: E402
from marginkit.distributed import PartitionedMarginSoftmax  # noqa: E402
from marginkit.distributed import collectives as coll  # noqa: E402
from tests.distributed.cases import (  # noqa: E402
    CASES, SIZES, C, D, full_weight, global_batch, local_rows, make_head, reference,
)
from tests.distributed.harness import run_world, save_results  # noqa: E402
from tests.distributed.test_step_guards import M, WireLog, count_syncs, predicted_wire  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

WORLD = 2
CHUNK = 32  # backward chunk (interpreter granule): rank 0's 52 classes are 2 chunks, 32 + 20
ONE_CHUNK = 32 * CHUNK * 4 + 32 * 4  # stored_bytes(32 rows, 32 classes, fp32): one chunk at N <= 32 rows
BUDGETS = {"zero": 0, "one_chunk": ONE_CHUNK, "unlimited": None}
ORDER_C = 200  # 100 classes per rank: chunks 32, 32, 32, 4
LAUNCHERS = ("STORED", "SCORES", "DX", "DW", "PROJECT")
SPAWN_TIMEOUT_S = 240.0
TOL = 1e-5


# --------------------------------------------------------------------------- worker side
class EventLog:
    """Records, in order, every launch through passes.py's launchers and every reduce-scatter."""

    def __init__(self):
        self.events: list = []
        self._saved: list = []

    def _wrap(self, owner, name, label):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.events.append(label)
            return original(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, wrapped)

    def __enter__(self):
        from marginkit.backends.triton import passes

        for name in LAUNCHERS:
            self._wrap(passes, name, name.lower())
        self._wrap(coll, "_reduce_scatter_single", "reduce_scatter")
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)

    def take(self) -> list:
        events, self.events = self.events, []
        return events


@contextlib.contextmanager
def kernels_off_the_host_count():
    """Interpreted kernels run on the host and read tensors there; on CUDA a launch reads nothing,
    so the sync counters must not see inside one."""
    from torch.utils._python_dispatch import _disable_current_modes
    from triton.runtime import interpreter

    original = interpreter.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = launch
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = original


def _triton_head(case="arcface", num_classes=C, **kwargs):
    if num_classes == C:
        return make_head(case, backend="triton", **kwargs)
    spec = CASES[case]
    head = PartitionedMarginSoftmax(num_classes, D, spec["margin"], spec["scale"], backend="triton", **kwargs)
    head.load_full_state_dict({"weight": torch.randn(num_classes, D, generator=torch.Generator().manual_seed(9))})
    return head


def _step(head, rank, log: EventLog, seed=1, retain=False):
    x, labels = global_batch(seed)
    xl = local_rows(x, WORLD, rank).clone().requires_grad_(True)
    loss = head(xl, local_rows(labels, WORLD, rank))
    log.take()
    loss.backward(retain_graph=retain)
    out = dict(loss=loss.detach(), grad_x=xl.grad.clone(), grad_w=head.weight.grad.clone(), events=log.take())
    if retain:  # a second and a third backward through the same graph
        loss.backward(retain_graph=True)
        out.update(grad_x2=xl.grad.clone(), grad_w2=head.weight.grad.clone(), events2=log.take())
        loss.backward()
        out.update(grad_x3=xl.grad.clone(), grad_w3=head.weight.grad.clone(), events3=log.take())
    return out


def _check_accuracy(rank, log):
    out = {}
    for case in ("arcface", "cosface"):
        for layout, extra in (("exchanged", {}), ("declared", dict(max_local_batch=M))):
            for name, budget in BUDGETS.items():
                out[case, layout, name] = _step(_triton_head(case, memory_budget=budget, **extra), rank, log)
    return out


def _check_order(rank, log):
    return {name: _step(_triton_head(num_classes=ORDER_C, memory_budget=budget), rank, log)["events"]
            for name, budget in (("zero", 0), ("two_chunks", 2 * ONE_CHUNK), ("unlimited", None))}


def _check_retain(rank, log):
    return _step(_triton_head(memory_budget=None), rank, log, retain=True)


def _check_partial_fc(rank, log):
    out = {}
    for name, budget in (("zero", 0), ("unlimited", None)):
        head = _triton_head(sample_rate=0.5, seed=5, memory_budget=budget)
        rec = _step(head, rank, log)
        rec["sampled"] = head.last_sampled.clone()
        out[name] = rec
    return out


def _check_wire_and_syncs(rank, log):
    head = _triton_head(memory_budget=None, max_local_batch=M)
    _step(head, rank, log)  # the first call checks agreement (its syncs are allowed)
    with WireLog() as wire:
        _step(head, rank, log, seed=2)
    x, labels = global_batch(3)

    def step():
        xl = local_rows(x, WORLD, rank).clone().requires_grad_(True)
        head(xl, local_rows(labels, WORLD, rank)).backward()

    with kernels_off_the_host_count():
        syncs = count_syncs(step)
    return dict(wire=wire.calls, syncs=syncs, stored=log.take().count("stored"))


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from marginkit.backends import triton as tb

    def compute():
        with tb.tuning(chunk_classes=CHUNK), EventLog() as log:
            return dict(accuracy=_check_accuracy(rank, log), order=_check_order(rank, log),
                        retain=_check_retain(rank, log), partial_fc=_check_partial_fc(rank, log),
                        wire=_check_wire_and_syncs(rank, log))

    save_results(compute, world, rank, outdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_world(WORLD, str(tmp_path_factory.mktemp("budget")), SPAWN_TIMEOUT_S, _worker)


# --------------------------------------------------------------------------- tests
def _float64_truth(case):
    spec = CASES[case]
    x, labels = global_batch(1)
    x = x.double().requires_grad_(True)
    w = full_weight().double().requires_grad_(True)
    loss = mk.reference.margin_cross_entropy(x, w, labels, spec["margin"], spec["scale"])
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _gathered(recs, suffix=""):
    return (recs[0]["loss"], torch.cat([r["grad_x" + suffix] for r in recs]),
            torch.cat([r["grad_w" + suffix] for r in recs]))


def _assert_close(got, want, what):
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) < TOL, f"{what}: relative errors (loss, dX, dW) = {errs}"


@pytest.mark.parametrize("case", ["arcface", "cosface"])
@pytest.mark.parametrize("layout", ["exchanged", "declared"])
@pytest.mark.parametrize("budget", list(BUDGETS))
def test_every_budget_matches_the_float64_reference_and_one_process(runs, case, layout, budget):
    recs = [r["accuracy"][case, layout, budget] for r in runs]
    x, labels = global_batch(1)
    assert labels.eq(-100).any()  # ignored rows take part
    _assert_close(_gathered(recs), _float64_truth(case), f"{case} {layout} budget={budget} vs float64")
    _assert_close(_gathered(recs), reference(case, x, labels), f"{case} {layout} budget={budget} vs one process")
    for r in recs:  # every rank sees the same loss
        assert torch.equal(r["loss"], recs[0]["loss"])
    stored = {"zero": 0, "one_chunk": 1, "unlimited": 2}[budget]  # of each rank's 2 chunks (52 / 51 classes)
    for r in recs:  # the backward took exactly the chunks the budget holds from the store
        assert r["events"].count("stored") == stored
        assert r["events"].count("scores") == 2 - stored


def test_the_reduce_scatter_is_issued_before_the_deferred_dw_launches(runs):
    expected = {
        # chunk 3 (4 classes) then 0-1 recomputed, their dW in the loop (one workspace); chunk 2's deferred
        "zero": ["scores", "dx", "dw"] * 3 + ["scores", "dx", "reduce_scatter", "dw"],
        # leftover chunk 3 first (its dW in the loop), chunks 0-1 stored (dS in place, dW + projection
        # deferred), then chunk 2, a full one, left live and deferred
        "two_chunks": ["scores", "dx", "dw"] + ["stored", "dx"] * 2 + ["scores", "dx", "reduce_scatter"]
        + ["dw", "project"] * 2 + ["dw"],
        "unlimited": ["stored", "dx"] * 4 + ["reduce_scatter"] + ["dw", "project"] * 4,
    }
    for r in runs:
        assert r["order"] == expected


def test_a_second_and_third_backward_through_the_graph_recompute_and_are_right(runs):
    recs = [r["retain"] for r in runs]
    truth = _float64_truth("arcface")
    _assert_close(_gathered(recs), truth, "first backward")
    for k in (2, 3):  # gradients accumulate
        _assert_close(_gathered(recs, str(k)), (truth[0], k * truth[1], k * truth[2]), f"backward {k}")
    for r in recs:
        assert r["events"].count("stored") == 2 and r["events"].count("scores") == 0
        # the store was consumed in place by the first: every later backward recomputes every chunk
        for later in ("events2", "events3"):
            assert r[later].count("stored") == 0 and r[later].count("scores") == 2


def test_partial_fc_stores_over_the_sampled_rows(runs):
    for r in runs:
        zero, stored = r["partial_fc"]["zero"], r["partial_fc"]["unlimited"]
        assert torch.equal(zero["sampled"], stored["sampled"])
        assert stored["events"].count("stored") == math.ceil(stored["sampled"].numel() / CHUNK)
        assert zero["events"].count("stored") == 0
        _assert_close(_gathered([stored]), _gathered([zero]), "Partial FC, store vs none")
        assert torch.count_nonzero(stored["grad_w"].abs().sum(1)) <= stored["sampled"].numel()


def test_nothing_new_on_the_wire_and_no_host_sync(runs):
    for r in runs:
        assert r["wire"]["wire"] == predicted_wire(WORLD, SIZES[WORLD], D, 4, 4, declared=True)
        assert r["wire"]["syncs"] == []
        assert r["wire"]["stored"] == 2  # the counted step took both chunks from the store


def test_memory_budget_is_checked_like_the_single_gpu_heads():
    assert PartitionedMarginSoftmax(C, D).memory_budget == 0
    assert PartitionedMarginSoftmax(C, D, memory_budget=None).memory_budget is None
    for bad in (-1, float("nan"), "64MiB", True):
        with pytest.raises((ValueError, TypeError), match="memory_budget") as err:
            PartitionedMarginSoftmax(C, D, memory_budget=bad)
        assert repr(bad) in str(err.value) or str(bad) in str(err.value)


def _protocol_inputs():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(12, D, generator=g), torch.randn(70, D, generator=g)
    labels = torch.randint(0, 70, (12,), generator=g)
    labels[5] = -1
    return x, w, labels, torch.rand(12, generator=g)


@pytest.mark.parametrize("engine_name", ["torch", "triton"])
def test_the_protocol_keywords_on_both_backends(engine_name):
    """The store round trip and grad_x_ready through the protocol: both backends store (torch: one
    chunk's exponentials and shift; Triton: S and its tile maxima), equal their own no-store
    result, and call the hook once (torch: just before returning)."""
    from marginkit import backends
    from marginkit.backends import triton as tb

    engine = backends.resolve(engine_name, torch.device("cpu"))
    x, w, labels, grad_rows = _protocol_inputs()
    with tb.tuning(chunk_classes=CHUNK):
        row_max, row_sumexp = engine.lse_partials(x, w, labels, 30.0, True)
        lse = (row_max + row_sumexp.log()).double() + 0.25  # + the target share's weight
        plain = engine.grads_from_lse(x, w, labels, lse, grad_rows, 30.0, True)
        store, seen = [], []
        partials = engine.lse_partials(x, w, labels, 30.0, True, memory_budget=None, store=store)
        got = engine.grads_from_lse(x, w, labels, lse, grad_rows, 30.0, True, store=store,
                                    grad_x_ready=lambda grad_x: seen.append(grad_x.clone()))
    assert len(store) == 2 and store[0].shape == (12, 70)
    assert store[1].shape == ((12, 3) if engine_name == "triton" else (12,))
    assert torch.equal(partials[0], row_max) and rel_err(partials[1], row_sumexp) < 1e-6
    assert len(seen) == 1 and torch.equal(seen[0], got[0])
    assert rel_err(got[0], plain[0]) < 1e-6 and rel_err(got[1], plain[1]) < 1e-6


def test_a_store_that_does_not_fit_the_inputs_is_refused():
    from marginkit.backends import triton as tb

    x, w, labels, grad_rows = _protocol_inputs()
    store = []
    tb.lse_partials(x, w, labels, 30.0, True, memory_budget=None, store=store)
    lse = torch.zeros(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"store holds \(12, 70\)"):
        tb.grads_from_lse(x[:6], w, labels[:6], lse, grad_rows[:6], 30.0, True, store=store)


def test_the_store_row_stride_is_a_multiple_of_16_for_an_odd_class_count():
    """The deferred GEMMs read the store as their dS operand: its row stride is padded (70 classes
    -> 80), the view is still (B, 70), and the padding counts against a budget."""
    from marginkit.backends import triton as tb
    from marginkit.backends.triton.budget import stored_bytes

    x, w, labels, grad_rows = _protocol_inputs()
    with tb.tuning(chunk_classes=CHUNK):
        row_max, row_sumexp = tb.lse_partials(x, w, labels, 30.0, True)
        lse = (row_max + row_sumexp.log()).double() + 0.25
        plain = tb.grads_from_lse(x, w, labels, lse, grad_rows, 30.0, True)
        for budget, width, stride in ((None, 70, 80), (stored_bytes(12, 70, 4), 64, 64)):
            store = []
            tb.lse_partials(x, w, labels, 30.0, True, memory_budget=budget, store=store)
            assert store[0].shape == (12, width) and store[0].stride() == (stride, 1)
            assert budget is None or stored_bytes(12, stride, 4) <= budget  # all 70 fit, 80 padded do not
            got = tb.grads_from_lse(x, w, labels, lse, grad_rows, 30.0, True, store=store, grad_x_ready=lambda g: None)
            assert rel_err(got[0], plain[0]) < 1e-6 and rel_err(got[1], plain[1]) < 1e-6


@pytest.mark.parametrize("max_local_batch", [None, 32])
def test_memory_budget_set_after_construction_is_checked_in_forward(max_local_batch):
    x, labels = global_batch(1)
    head = make_head("cosface", max_local_batch=max_local_batch)
    head(x, labels)  # a good first call (with max_local_batch the later errors take the poison path)
    for bad, error in ((-1, ValueError), (float("nan"), ValueError), ("64MiB", TypeError), (True, TypeError)):
        head.memory_budget = bad
        with pytest.raises(error, match="memory_budget") as err:
            head(x, labels)
        assert repr(bad) in str(err.value) or str(bad) in str(err.value)
        head.memory_budget, head._pending = 0, type(head._pending)()  # forget the poisoned step's record


class LsePartialsSpy:
    """Wraps the Triton backend's lse_partials: how many tensors each forward stored."""

    def __init__(self, original):
        self.original, self.stored = original, []

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        self.stored.append(len(kwargs.get("store") or []))
        return out


def test_nothing_is_stored_when_no_backward_will_run(monkeypatch):
    from marginkit.backends import triton as tb

    spy = LsePartialsSpy(tb.lse_partials)
    monkeypatch.setattr(tb, "lse_partials", spy)
    x, labels = global_batch(1)
    head = _triton_head(memory_budget=None)
    trained = head(x.clone().requires_grad_(True), labels)
    with torch.no_grad():
        no_grad = head(x, labels)
    with torch.inference_mode():
        inference = head(x, labels)
    head.eval().requires_grad_(False)
    frozen = head(x, labels)  # grad enabled, but neither the input nor the weight needs a gradient
    assert spy.stored == [2, 0, 0, 0]  # the training step stored (S, tile maxima); the others nothing
    for loss in (no_grad, inference, frozen):
        assert rel_err(loss, trained.detach()) < 1e-6


def test_the_chunk_left_for_deferral_is_a_full_one_and_the_plain_order_is_unchanged(monkeypatch):
    """70 classes in chunks of 32: with grad_x_ready the leftover [64, 70) goes first and the full
    [32, 64) is deferred past the hook; without it the order stays 0, 32, 64."""
    from marginkit.backends import triton as tb
    from marginkit.backends.triton import passes

    x, w, labels, grad_rows = _protocol_inputs()
    events = []
    original_dw = passes.DW

    def dw(grid, ws, x_, w_, w_inv, colsum, kappa, grad_w, num_rows, dim, start, n_chunk, *args, **kwargs):
        events.append((start, n_chunk))
        return original_dw(grid, ws, x_, w_, w_inv, colsum, kappa, grad_w, num_rows, dim, start, n_chunk,
                           *args, **kwargs)

    monkeypatch.setattr(passes, "DW", dw)
    with tb.tuning(chunk_classes=CHUNK):
        row_max, row_sumexp = tb.lse_partials(x, w, labels, 30.0, True)
        lse = (row_max + row_sumexp.log()).double() + 0.25
        plain = tb.grads_from_lse(x, w, labels, lse, grad_rows, 30.0, True)
        assert events == [(0, 32), (32, 32), (64, 6)]
        events.clear()
        got = tb.grads_from_lse(x, w, labels, lse, grad_rows, 30.0, True, grad_x_ready=lambda g: events.append("ready"))
    assert events == [(64, 6), (0, 32), "ready", (32, 32)]
    assert rel_err(got[0], plain[0]) < 1e-6 and rel_err(got[1], plain[1]) < 1e-6
