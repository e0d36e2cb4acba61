"""Host-cost guards of the default CUDA training step, run on a CPU (issue 13 item 4).

A stub libcuda (tests/stub_cuda) lets Triton's real CUDA launch path run without a GPU: one
``mk.margin_cross_entropy`` forward + backward on the Triton backend's CUDA path (plain, and
with fp32 master weights and a negative modulation), at B = D = 64 bf16 embeddings with the
backward chunk of B = 1024 bf16 forced (16 384 classes: 32 MiB workspace / 2 KiB
per class), so the launch count is the real shape's. Counts are asserted, never times.
"""

from __future__ import annotations

import math

import pytest

from tests.stub_cuda import build_stub, run_probe

#: The backward chunk that B = 1024 bf16 gets on CUDA (WORKSPACE_BYTES // (1024 · 2)).
CHUNK = 16384
#: One chunk, and three (the last partial): launches must grow by 3 per chunk, aten calls not at all.
CLASS_COUNTS = (CHUNK, 40000)
#: Aten calls per forward + backward (profiler events not nested in another aten op), measured.
#: Plain step: 214 before trimming the label check and the float64 target column, 154 after,
#: 144 with ArcFace's one-pass ψ and dψ (label check 8, target cosine 13, ψ and dψ 15, row-loss combine 9, target-column
#: backward ~35, the Triton passes' allocations and casts ~30, autograd and reduction ~15); the
#: master-weight + filter step adds the modulation's 6. The bounds are the measured counts: an
#: added op fails here; lower them when ops go. The issue's aim (<= 30) needs the per-row
#: float64 work in a few fused kernels.
ATEN_CALLS_BOUND = {"plain": 144, "master-weights+filter": 150}
#: The default step (bf16 weight), and fp32 master weights with insightface's inter-class filter
#: (a NegativeModulation: MODULATE kernels, a threshold per row).
VARIANTS = {"plain": [], "master-weights+filter": ["--master-weights", "--filter", "0.3"]}


def expected_launches(num_classes: int, chunk: int = CHUNK) -> dict[str, int]:
    """Per kernel: forward = 1/‖x‖, 1/‖w‖, partials, merge; backward = 1/‖x‖ (1/‖w‖ is saved by
    the forward), then scores, dX and dW per chunk: 5 + 3·⌈C/chunk⌉ in all."""
    chunks = math.ceil(num_classes / chunk)
    return {
        "row_inv_norm_kernel": 3,
        "lse_partials_kernel": 1,
        "lse_merge_kernel": 1,
        "scores_kernel": chunks,
        "dx_gemm_kernel": chunks,
        "dw_gemm_kernel": chunks,
    }


@pytest.fixture(scope="module")
def stub_dir(tmp_path_factory):
    folder, why_not = build_stub(tmp_path_factory.mktemp("stub_libcuda"))
    if folder is None:
        pytest.skip(f"cannot build the stub libcuda: {why_not}")
    return folder


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def step_counts(stub_dir, variant):
    args = ["--C", ",".join(map(str, CLASS_COUNTS)), "--chunk", str(CHUNK), "--B", "64", "--D", "64"]
    args += VARIANTS[variant]
    return {row["C"]: row for row in run_probe(stub_dir, args)}


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_triton_launches_per_step_are_5_plus_3_per_chunk(step_counts, num_classes):
    row = step_counts[num_classes]
    assert row["launches"] == expected_launches(num_classes)
    assert row["triton_launches"] == 5 + 3 * math.ceil(num_classes / CHUNK)


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_the_tuned_kernels_launch_through_cached_handles(step_counts, num_classes):
    """In a steady step the four autotuned kernels (forward partials, scores, dX, dW) skip
    JITFunction.run (binder, specialisation, cache lookup); only the two small kernels launched
    directly (row norms, lse merge) take it, a fixed 4 per step whatever C."""
    assert step_counts[num_classes]["binder_launches"] == {"row_inv_norm_kernel": 3, "lse_merge_kernel": 1}


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_the_training_step_has_no_host_sync(step_counts, num_classes):
    row = step_counts[num_classes]
    assert row["host_syncs"] == 0, row["syncs"]
    # The instrument sees syncs: the control step's float(loss) and grad.cpu() count 2 ...
    assert row["control_host_syncs"] == 2
    # ... and the label check's flag, read from pinned host memory (no sync), is seen apart.
    assert row["pinned_flag_reads"] == 1


def test_aten_calls_per_step_are_bounded_and_independent_of_the_class_count(step_counts, variant):
    calls = {c: row["aten_calls"] for c, row in step_counts.items()}
    assert len(set(calls.values())) == 1, calls
    by_name = step_counts[CHUNK]["aten_by_name"]
    assert calls[CHUNK] <= ATEN_CALLS_BOUND[variant], sorted(by_name.items(), key=lambda kv: -kv[1])
