"""The memory-budget mode of the Triton backend (``memory_budget``): the forward stores the
exp-scaled logits of whole backward chunks, the backward skips their recompute.

Every accuracy test runs both settings that matter (None: every chunk stored; a budget that
covers only some chunks) against the float64 reference, and checks which path ran by counting
the recompute kernel's launches. Kernels run under TRITON_INTERPRET=1 on the CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

import marginkit as mk  # noqa: E402
from marginkit.backends import triton as tb  # noqa: E402
from marginkit.backends.common import target_cosine  # noqa: E402
from marginkit.backends.triton import passes  # noqa: E402
from marginkit.backends.triton.budget import STORE_GROUP, store_scale, stored_bytes, stored_classes  # noqa: E402
from marginkit.bench.memory import LiveTensorBytes  # noqa: E402
from marginkit.modulation import NegativeModulation, interclass_filter  # noqa: E402
from tests.backends.test_triton_backend import (  # noqa: E402
    IGNORE,
    hard_negative_inputs,
    make,
    owned_labels,
    reference_rows,
    rel,
    run,
    textbook_rows,
)
from tests.helpers import SPECS, spec_id  # noqa: E402

CHUNK = 64
SMALL = dict(class_splits=3, chunk_classes=CHUNK, dx_splits=2)


def budget_for_chunks(B, n_chunks, element_size=4):
    """The bytes of exactly ``n_chunks`` stored chunks (S and its tile maxima)."""
    return stored_bytes(B, n_chunks * CHUNK, element_size)


class RecomputeCounter:
    """Counts the backward's recompute launches (``scores_kernel``) per chunk."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = passes.SCORES

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(passes, "SCORES", counted)


def budget_rows(x, w, y, spec, scale, margins=None, normalize=True, modulation=None, budget=None, deterministic=False):
    labels_local = owned_labels(y)
    cos = target_cosine(x, w, labels_local, normalize)
    psi, dpsi = spec.target_terms(cos, margins)
    if modulation is not None:
        modulation = NegativeModulation(*modulation)
    return tb.row_losses(
        x, w, labels_local, psi, dpsi, scale, normalize,
        modulation=modulation, deterministic=deterministic, memory_budget=budget,
    )


def assert_budget_matches_reference(x, w, y, spec, budget, scale=64.0, margins=None, normalize=True, tol=1e-5,
                                    modulation=None):
    with tb.tuning(**SMALL):
        out = run(budget_rows, x, w, y, spec, scale, margins, normalize, modulation, budget)
    ref = run(reference_rows, x, w, y, spec, scale, margins, normalize, modulation=modulation)
    errs = [rel(o, r) for o, r in zip(out, ref)]
    assert all(e < tol for e in errs), f"budget={budget}: relative errors (loss, dX, dW) = {errs}"
    return out


# ------------------------------------------------------------------------------------------
# How many classes are stored
# ------------------------------------------------------------------------------------------
def test_stored_classes_follows_the_budget():
    B, C, elt = 16, 300, 2
    with tb.tuning(chunk_classes=CHUNK):
        assert stored_classes(B, C, elt, 0) == 0
        assert stored_classes(B, C, elt, None) == C
        assert stored_classes(B, C, elt, stored_bytes(B, C, elt)) == C  # exactly enough: all of it
        one_chunk = stored_bytes(B, CHUNK, elt)
        assert stored_classes(B, C, elt, one_chunk) == CHUNK
        assert stored_classes(B, C, elt, 3 * one_chunk - 1) == 2 * CHUNK  # whole chunks only
        assert stored_classes(B, C, elt, one_chunk - 1) == 0
        assert stored_classes(0, C, elt, None) == 0
    # S in the compute dtype plus one fp32 tile max per 32 classes
    assert stored_bytes(B, 100, elt) == B * 100 * elt + B * 4 * 4 and STORE_GROUP == 32


def test_fp16_store_scale_keeps_values_normal():
    assert store_scale(torch.bfloat16, 3.0) == 1.0 and store_scale(torch.float32, 3.0) == 1.0
    assert store_scale(torch.float16, 1.0) == 2.0**14
    assert store_scale(torch.float16, 3.0) == 2.0**12  # σ·max|dN/dcos| ≤ 2^14


# ------------------------------------------------------------------------------------------
# fp32 against the float64 reference: both budget settings
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gradient", ["exact", "straight_through"])
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_every_spec_with_every_chunk_stored(spec, gradient, monkeypatch):
    counter = RecomputeCounter(monkeypatch)
    x, w, y = make(B=12, C=150, D=40, seed=3, ignored=2)
    assert_budget_matches_reference(x, w, y, dataclasses.replace(spec, gradient=gradient), None)
    assert counter.calls == 0  # three chunks, none recomputed


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_every_spec_with_some_chunks_stored(spec, monkeypatch):
    counter = RecomputeCounter(monkeypatch)
    x, w, y = make(B=12, C=150, D=40, seed=3, ignored=2)
    assert_budget_matches_reference(x, w, y, spec, budget_for_chunks(12, 1))
    assert counter.calls == 2  # chunk 1 stored, chunks 2 and 3 (partial) recomputed


@pytest.mark.parametrize("budget_chunks", [None, 1], ids=["unlimited", "one-chunk"])
@pytest.mark.parametrize("spec", [mk.CosFace(0.35), mk.ArcFace(0.5), mk.CombinedMargin(1.1, 0.3, 0.05)], ids=spec_id)
def test_sample_margins(spec, budget_chunks):
    x, w, y = make(B=10, C=90, D=24, seed=5, ignored=1)
    margins = torch.linspace(0.0, 0.6, 10, device=x.device)
    budget = None if budget_chunks is None else budget_for_chunks(10, budget_chunks)
    assert_budget_matches_reference(x, w, y, spec, budget, scale=32.0, margins=margins)


@pytest.mark.parametrize("budget_chunks", [None, 1], ids=["unlimited", "one-chunk"])
def test_class_margins_and_ignore_index_through_the_public_api(budget_chunks):
    x, w, y = make(B=8, C=140, D=16, seed=6, ignored=2)
    class_margins = torch.rand(140, generator=torch.Generator().manual_seed(0)).to(x.device) * 0.5
    margins = class_margins[torch.where(y == IGNORE, torch.zeros_like(y), y)]
    budget = None if budget_chunks is None else budget_for_chunks(8, budget_chunks)
    with tb.tuning(**SMALL):
        out = run(
            lambda x, w, y: mk.margin_cross_entropy(
                x, w, y, mk.ArcFace(0.5), 30.0, class_margins=class_margins, reduction="none", backend="triton",
                ignore_index=IGNORE, memory_budget=budget,
            ),
            x, w, y,
        )
    ref = run(reference_rows, x, w, y, mk.ArcFace(0.5), 30.0, margins)
    assert all(rel(o, r) < 1e-5 for o, r in zip(out, ref)), [rel(o, r) for o, r in zip(out, ref)]
    assert out[0][:2].abs().max() == 0 and out[1][:2].abs().max() == 0  # ignored rows: no loss, no gradient


@pytest.mark.parametrize("B,C,D", [(1, 1, 1), (3, 33, 7), (17, 65, 33), (5, 129, 70)])
@pytest.mark.parametrize("budget_chunks", [None, 1], ids=["unlimited", "one-chunk"])
def test_odd_shapes(B, C, D, budget_chunks):
    x, w, y = make(B=B, C=C, D=D, seed=7 + C)
    budget = None if budget_chunks is None else budget_for_chunks(B, budget_chunks)
    assert_budget_matches_reference(x, w, y, mk.ArcFace(0.5), budget, scale=16.0)


@pytest.mark.parametrize("budget_chunks", [None, 1], ids=["unlimited", "one-chunk"])
def test_normalize_false(budget_chunks):
    x, w, y = make(B=8, C=130, D=16, seed=8, ignored=1)
    x = torch.nn.functional.normalize(x, dim=1)
    w = torch.nn.functional.normalize(w, dim=1)
    budget = None if budget_chunks is None else budget_for_chunks(8, budget_chunks)
    assert_budget_matches_reference(x, w, y, mk.CosFace(0.35), budget, scale=30.0, normalize=False)


@pytest.mark.parametrize("budget_chunks", [None, 1], ids=["unlimited", "one-chunk"])
@pytest.mark.parametrize(
    "quadratic,linear", [(1.0, 0.4), (-0.6, 1.3), (0.0, 0.0)], ids=["curricular-t0.4", "any-quadratic", "filter"],
)
def test_modulation(quadratic, linear, budget_chunks):
    """The stored values carry dN/dcos: CurricularFace, any quadratic, and the zero filter."""
    x, w, y, psi = hard_negative_inputs()
    budget = None if budget_chunks is None else budget_for_chunks(7, budget_chunks)
    assert_budget_matches_reference(
        x, w, y, mk.ArcFace(0.8), budget, scale=16.0, modulation=(psi.float(), quadratic, linear)
    )


def test_interclass_filter_through_the_public_api():
    x, w, y = make(B=9, C=120, D=16, seed=44, ignored=2)
    x[2:5] = w[:3] * 3.0 + 0.5 * w[3:6]
    filt = interclass_filter(y != IGNORE, 0.2, torch.float32)
    with tb.tuning(**SMALL):
        ours = run(
            lambda x, w, y: mk.margin_cross_entropy(
                x, w, y, mk.ArcFace(0.5), reduction="none", backend="triton", ignore_index=IGNORE,
                interclass_filtering_threshold=0.2, memory_budget=None,
            ),
            x, w, y,
        )
    ref = run(reference_rows, x, w, y, mk.ArcFace(0.5), 64.0, modulation=(filt.threshold, filt.quadratic, filt.linear))
    assert all(rel(o, r) < 1e-5 for o, r in zip(ours, ref))


def test_large_scale_rows_far_below_their_max():
    """Tile-max shifts: a row whose every cosine is very negative (logits ≈ −s) still gets its
    probabilities, where a fixed shift of +s would underflow exp(−2s) to 0."""
    x, w, y = make(B=6, C=100, D=8, seed=9)
    x[0] = -w[:100].mean(0) * 50.0  # row 0 points away from (most) classes
    assert_budget_matches_reference(x, w, y, mk.ArcFace(0.5), None, scale=64.0)


# ------------------------------------------------------------------------------------------
# Low precision, master weights, determinism, the saved store
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_twice_textbook_error(dtype):
    x, w, y = make(B=12, C=200, D=40, dtype=dtype, seed=11, ignored=1)
    spec = mk.ArcFace(0.5)
    with tb.tuning(**SMALL):
        ours = run(budget_rows, x, w, y, spec, 64.0, budget=None)
    ref = run(reference_rows, x, w, y, spec, 64.0)
    book = run(textbook_rows, x, w, y, spec, 64.0)
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    floor = 8e-3 if dtype == torch.bfloat16 else 1e-3
    for name, o, b, r in zip(("loss", "dX", "dW"), ours, book, ref):
        assert rel(o, r) <= 2 * rel(b, r) + floor, f"{name}: ours {rel(o, r):.3g} vs textbook {rel(b, r):.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_master_weights(dtype):
    """fp16/bf16 embeddings with a float32 weight: the stored path writes dW straight into the
    float32 gradient; as accurate as the recompute path."""
    x, w32, y = make(B=12, C=200, D=40, seed=45, ignored=1)
    x = x.to(dtype)
    spec = mk.ArcFace(0.5)
    with tb.tuning(**SMALL):
        stored = run(budget_rows, x, w32, y, spec, 64.0, budget=None)
        recomputed = run(budget_rows, x, w32, y, spec, 64.0, budget=0)
    ref = run(reference_rows, x, w32, y, spec, 64.0)
    assert stored[1].dtype == dtype and stored[2].dtype == torch.float32
    floor = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for name, a, b, r in zip(("loss", "dX", "dW"), stored, recomputed, ref):
        assert rel(a, r) <= rel(b, r) + floor / 4, name
        assert rel(a, r) < floor, (name, rel(a, r))


def test_deterministic_mode_is_bitwise_reproducible():
    x, w, y = make(B=11, C=200, D=24, seed=12, ignored=1)
    outs = []
    for _ in range(2):
        with tb.tuning(**SMALL):
            outs.append(run(budget_rows, x, w, y, mk.ArcFace(0.5), 64.0, budget=budget_for_chunks(11, 2),
                            deterministic=True))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_second_backward_reuses_the_untouched_store():
    """The backward reads the store without writing it: retain_graph gives equal gradients twice."""
    x, w, y = make(B=8, C=140, D=16, seed=13)
    x.requires_grad_(True)
    w.requires_grad_(True)
    with tb.tuning(**SMALL):
        loss = mk.margin_cross_entropy(x, w, y, backend="triton", memory_budget=None)
        first = torch.autograd.grad(loss, (x, w), retain_graph=True)
        second = torch.autograd.grad(loss, (x, w))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------------
# Peak extra memory (dispatch-mode tracker, as tests/core/test_memory.py; bytes, not time)
# ------------------------------------------------------------------------------------------
def step_peak_bytes(B, C, D, budget):
    x, w, y = make(B=B, C=C, D=D, seed=14)
    x.requires_grad_(True)
    w.requires_grad_(True)
    tracker = LiveTensorBytes(exclude=[x, w, y])
    with tb.tuning(chunk_classes=CHUNK), tracker:
        mk.margin_cross_entropy(x, w, y, backend="triton", memory_budget=budget).backward()
    return tracker.peak


def test_peak_extra_memory_follows_the_budget():
    """What the loss holds from forward to backward: nothing (default), exactly the stored
    chunks (a budget), or all of S (None): B·C·4 + B·⌈C/32⌉·4 bytes in fp32. The tracker sees
    the op's outputs (the store) and the gradients (2·C·D·4 + B·D·4 at most, with O(B + C)
    vectors); a kernel's own scratch inside the custom op is not seen."""
    B, C, D = 32, 640, 8
    grads_and_vectors = (2 * C * D + 2 * B * D) * 4 + 64 * (B + C)
    default = step_peak_bytes(B, C, D, 0)
    assert default < grads_and_vectors
    unlimited = step_peak_bytes(B, C, D, None)
    everything = stored_bytes(B, C, 4)
    assert everything <= unlimited - default + 1024 and unlimited < everything + grads_and_vectors
    budget = budget_for_chunks(B, 3) + 100  # three whole chunks and change
    partial = step_peak_bytes(B, C, D, budget)
    assert stored_bytes(B, 3 * CHUNK, 4) <= partial - default + 1024 and partial <= budget + grads_and_vectors


def test_the_backward_of_a_stored_chunk_allocates_no_recompute_buffers():
    """The backward pass itself (no custom op around it, so every allocation is seen): with
    every chunk stored no column-sum buffer is made, only the bounded workspace and dW's
    chunk buffer."""
    B, C, D = 16, 256, 8
    x, w, y = make(B=B, C=C, D=D, seed=15)
    labels = owned_labels(y)
    x_inv, w_inv = tb.inverse_norms(x, True), tb.inverse_norms(w, True)
    with tb.tuning(chunk_classes=CHUNK):
        stored = torch.empty((B, C)), torch.empty((B, C // STORE_GROUP))
        store = (*stored, 1.0)
        row_max, row_sumexp = passes.forward(x, w, x_inv, w_inv, labels, 64.0, store=store)
        lse = (row_max + row_sumexp.log()).double()
        grad_rows = torch.ones(B)
        peaks = {}
        for name, arg in (("stored", store), ("recompute", None)):
            tracker = LiveTensorBytes(exclude=[x, w, x_inv, w_inv, labels, lse, grad_rows, *stored])
            with tracker:
                passes.backward(x, w, x_inv, w_inv, labels, lse, grad_rows, 64.0, True, False, store=arg)
            peaks[name] = tracker.peak
    outputs = (B * D + C * D) * 4
    workspace = B * CHUNK * 4
    assert peaks["stored"] <= outputs + workspace + 64 * (B + C)
    assert peaks["recompute"] >= outputs + workspace + (B // 16) * CHUNK * 4  # it does make the column sums


# ------------------------------------------------------------------------------------------
# The keyword on the modules, a class-less tile, bad values
# ------------------------------------------------------------------------------------------
def test_margin_softmax_and_other_heads_take_the_budget():
    x, w, y = make(B=8, C=140, D=16, seed=16)
    head = mk.MarginSoftmax(140, 16, backend="triton", memory_budget=None)
    assert head.memory_budget is None
    with torch.no_grad():
        head.weight.copy_(w)
    with tb.tuning(**SMALL):
        fast = head(x, y)
        head.memory_budget = 0
        bounded = head(x, y)
    assert abs(float(fast.detach()) - float(bounded.detach())) <= 1e-6 * abs(float(bounded.detach()))
    curricular = mk.CurricularFace(140, 16, backend="triton")
    assert curricular.memory_budget == 0  # every head has it through ClassWeightHead


@pytest.mark.parametrize("budget", [0, None], ids=["recompute", "stored"])
def test_a_row_with_no_other_class_gets_zero_gradients_at_a_large_scale(budget):
    """One class (the target): loss and gradients are exactly 0. A stored tile with no class of
    the row has tile max 0, and exp2(0 − lse·log2 e) overflowed at lse = s·ψ ≈ −270: 0·inf = NaN."""
    w = torch.randn(1, 8, generator=torch.Generator().manual_seed(17))
    x = (-w).expand(5, 8).clone().requires_grad_(True)  # cos θ_y = −1: ψ = −1.35 (CosFace 0.35)
    w.requires_grad_(True)
    labels = torch.zeros(5, dtype=torch.long)
    with tb.tuning(**SMALL):
        loss = mk.margin_cross_entropy(x, w, labels, mk.CosFace(0.35), 200.0, backend="triton", memory_budget=budget)
        loss.backward()
    assert all(torch.equal(t, torch.zeros_like(t)) for t in (loss.detach(), x.grad, w.grad))


@pytest.mark.parametrize("bad", [-1, float("nan"), "2GB", True])
def test_bad_budget_is_a_typed_error_naming_it(bad):
    x, w, y = make(B=4, C=10, D=8, seed=18)
    with pytest.raises((ValueError, TypeError), match="memory_budget"):
        mk.margin_cross_entropy(x, w, y, backend="triton", memory_budget=bad)
    with pytest.raises((ValueError, TypeError), match="memory_budget"):
        mk.MarginSoftmax(10, 8, memory_budget=bad)


def test_half_precision_weight_gradient_in_pieces(monkeypatch):
    """bf16 weights: a stored chunk's raw dW goes through an fp32 buffer in pieces (here two of
    32 classes per 64-class chunk); as accurate as the recompute path."""
    D = 24
    monkeypatch.setattr(passes, "STORED_DW_BYTES", 32 * 4 * D)
    x, w, y = make(B=10, C=150, D=D, dtype=torch.bfloat16, seed=19, ignored=1)
    spec = mk.ArcFace(0.5)
    with tb.tuning(**SMALL):
        stored = run(budget_rows, x, w, y, spec, 64.0, budget=None)
        recomputed = run(budget_rows, x, w, y, spec, 64.0, budget=0)
    ref = run(reference_rows, x, w, y, spec, 64.0)
    assert stored[2].dtype == torch.bfloat16
    for name, a, b, r in zip(("loss", "dX", "dW"), stored, recomputed, ref):
        assert rel(a, r) <= rel(b, r) + 2e-3, (name, rel(a, r), rel(b, r))
    assert rel(stored[2], recomputed[2]) < 1e-2


# ------------------------------------------------------------------------------------------
# The CUDA launch path (stub libcuda: Triton's real host path, kernels compiled for sm_90)
# ------------------------------------------------------------------------------------------
FAST_STEP = r"""
import json, math, sys
from collections import Counter
import torch
from tests.stub_cuda.probe import count_binder_launches, install_stub_driver, route_to_cuda_path

launches, binder = Counter(), Counter()
install_stub_driver(launches)
count_binder_launches(binder)
import marginkit as mk
from marginkit.backends.triton import tuning

route_to_cuda_path(Counter(), [False])  # also: each autotuner keeps one config, untimed
B, D, C, chunk = 64, 64, 40000, 16384
gen = torch.Generator().manual_seed(0)
x = torch.randn(B, D, generator=gen).to(torch.bfloat16).requires_grad_(True)
w = torch.randn(C, D, generator=gen).to(torch.bfloat16).requires_grad_(True)
y = torch.randint(0, C, (B,), generator=gen)
rows = {}
with tuning(chunk_classes=chunk):
    for name, budget in (("fast", None), ("default", 0)):
        for _ in range(3):  # compile + tune, first direct launches, then only cached handles
            launches.clear(); binder.clear()
            x.grad = w.grad = None
            mk.margin_cross_entropy(x, w, y, backend="triton", memory_budget=budget).backward()
        rows[name] = dict(launches=dict(launches), binder=dict(binder))
print("RESULT" + json.dumps(rows))
"""


def test_fast_step_on_the_cuda_launch_path(tmp_path):
    """memory_budget=None through Triton's real CUDA host path (driver stubbed, so kernels compile
    for sm_90 and launch, but never run): per chunk one stored→workspace pass, dX, dW and the
    projection, no recompute; the third step launches every tuned kernel through cached handles."""
    from tests.stub_cuda import REPO, build_stub, probe_env

    folder, why_not = build_stub(tmp_path / "stub")
    if folder is None:
        pytest.skip(f"cannot build the stub libcuda: {why_not}")
    done = subprocess.run(
        [sys.executable, "-c", FAST_STEP], env=probe_env(folder), capture_output=True, text=True, timeout=900,
        cwd=str(REPO),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
    chunks = 3  # 40000 classes in chunks of 16384
    common = {"row_inv_norm_kernel": 2, "lse_partials_kernel": 1, "lse_merge_kernel": 1, "dx_gemm_kernel": chunks,
              "dw_gemm_kernel": chunks, "target_terms_kernel": 1, "target_backward_kernel": 1,
              "masked_mean_kernel": 1, "masked_mean_backward_kernel": 1}
    assert rows["fast"]["launches"] == dict(common, stored_to_workspace_kernel=chunks,
                                            project_weight_rows_kernel=chunks)
    assert rows["default"]["launches"] == dict(common, scores_kernel=chunks)
    # every kernel, the per-row ones included, launches through a cached handle in a steady step
    assert rows["fast"]["binder"] == {}, rows["fast"]["binder"]
