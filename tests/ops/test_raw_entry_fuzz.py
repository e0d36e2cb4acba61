"""Every raw ``marginkit._C.cpu`` entry point raises a Python exception on the bad inputs of
issue 18 (labels >= C or 2^62, negative sizes, unordered ranges, bad dtype codes, bad saved
indices, step/count overflow, ints beyond int64) instead of crashing or corrupting memory.

The cases run in one child process (a crash would otherwise kill pytest); under
``make test-sanitize`` an ASan/UBSan report ends that child and fails this test with it.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("marginkit._C")

RAW_CASES = Path(__file__).with_name("raw_cases.py")


@pytest.fixture(scope="module")
def raw_results():
    so_path = importlib.util.find_spec("marginkit._C").origin
    proc = subprocess.run([sys.executable, str(RAW_CASES), so_path], capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    starts = [d["start"] for d in lines if "start" in d]
    results = {d["case"]: d for d in lines if "case" in d}
    assert proc.returncode == 0, (
        f"the raw-case process died (rc {proc.returncode}) in case {starts[-1] if starts else '?'}:\n"
        f"{proc.stderr[-6000:]}"
    )
    assert len(results) == len(starts) and len(results) >= 50, (len(results), len(starts))
    return results


def test_controls_return_normally(raw_results):
    controls = {k: v for k, v in raw_results.items() if k.startswith("control:")}
    assert len(controls) == 8
    assert all(v["raised"] is None for v in controls.values()), controls


def test_every_bad_case_raises_a_python_exception(raw_results):
    bad = {k: v for k, v in raw_results.items() if not k.startswith("control:")}
    wrong = {k: v for k, v in bad.items() if v["raised"] not in ("ValueError", "TypeError")}
    assert not wrong, wrong


def test_messages_name_what_is_wrong(raw_results):
    assert "label" in raw_results["class_center_update:label>=C"]["message"]
    assert "[0, C) = [0, 2)" in raw_results["class_center_update:label=2^62"]["message"]
    assert "emb_dtype = 7" in raw_results["class_center_update:dtype=7"]["message"]
    assert "dtype = 4" in raw_results["range_loss_backward:dtype=4_before_reading_grad_loss"]["message"]
    assert "row_seg[1] = 1000000" in raw_results["range_loss_backward:row_seg=10^6"]["message"]
    assert "stop = 0 must be >= start = 8" in raw_results["partial_fc_mark:stop<start"]["message"]
    assert "step[1] = -1" in raw_results["sparse_adamw_step:step=-1"]["message"]
    assert "counts[0]" in raw_results["class_statistics_update:counts_at_int64_max"]["message"]
    assert "rows[0] = 2 is outside [0, 2)" in raw_results["sparse_sgd_step:row>=C"]["message"]
    # pybind11 refuses an int beyond int64 before C++ runs
    assert raw_results["class_center_update:B=2^64"]["raised"] == "TypeError"
