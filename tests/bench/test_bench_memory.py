"""The CPU memory column: the live-tensor tracker counts what it should, and the bench's numbers are
plausible against the known size of the textbook loss's (B, C) logits."""

from __future__ import annotations

import csv

import pytest
import torch

from marginkit.bench.config import BenchConfig, make_spec
from marginkit.bench.memory import LiveTensorBytes, peak_extra_bytes
from marginkit.bench.providers import PROVIDERS, make_inputs
from marginkit.cli import main

_MIB = 2**20


def test_tracker_counts_live_bytes_and_frees():
    with LiveTensorBytes() as tracker:
        a = torch.ones(1000, 1000)  # 4 MB alive
        b = a.view(-1)  # a view: no new bytes
        del a, b  # freed
        c = torch.ones(500, 500)  # 1 MB alive
    assert tracker.peak == 4_000_000
    assert tracker.live == 1_000_000
    del c


def test_tracker_ignores_inputs_and_in_place_results():
    x = torch.zeros(256, 256)
    with LiveTensorBytes(exclude=[x]) as tracker:
        x.add_(1.0)  # returns x: allocates nothing
        torch.mul(x, 2.0, out=x)
        y = x[3:7]  # a view of an input
    assert tracker.peak == 0 and y.shape == (4, 256)


def test_peak_extra_subtracts_the_gradients_left_behind():
    w = torch.zeros(1000, 250, requires_grad=True)

    def step():
        scratch = torch.ones(1000, 250)  # 1 MB the step needs and frees
        w.grad = torch.ones(1000, 250)  # 1 MB gradient it leaves (not "extra", as on CUDA)
        del scratch

    assert peak_extra_bytes(step, [w], exclude=[]) == 1_000_000
    assert w.grad is not None


def test_bench_memory_column_is_filled_and_plausible(tmp_path):
    """`marginkit bench` on the CPU fills peak_extra_mib; the textbook loss's is at least its (B, C)
    float32 logits and not twenty times them."""
    B, D, C = 64, 16, 20_000
    out = tmp_path / "m.csv"
    rc = main(["bench", "--device", "cpu", "--B", str(B), "--D", str(D), "--C", str(C), "--reps", "1",
               "--providers", "marginkit,torch-textbook", "--no-plot", "--no-progress", "--out", str(out)])
    assert rc == 0
    peak = {r["method"]: float(r["peak_extra_mib"]) for r in csv.DictReader(out.read_text().splitlines())}
    logits_mib = B * C * 4 / _MIB  # 4.9 MiB
    assert logits_mib <= peak["torch-textbook"] <= 20 * logits_mib
    assert peak["marginkit"] > 0


def test_marginkit_needs_a_tenth_of_the_textbook_memory_at_1m_classes():
    """The trade-off the CPU bench shows, at its large size (C = 1M, B = 64: the textbook loss's
    float32 logits are 244 MiB each); one tracked step each, same inputs (D = 4 keeps it quick)."""
    B, D, C = 64, 4, 1_000_000
    if PROVIDERS["marginkit"].unavailable():
        pytest.skip(PROVIDERS["marginkit"].unavailable())
    inputs = make_inputs(BenchConfig("cpu", B, D, C, torch.float32, "arcface", 64.0), seed=3)
    peak = {}
    for name in ("torch-textbook", "marginkit"):
        case = PROVIDERS[name].build(inputs, make_spec("arcface"))
        peak[name] = peak_extra_bytes(case.step, case.params, exclude=[inputs.x, inputs.w, inputs.labels])
        for p in case.params:
            p.grad = None
    assert B * C * 4 <= peak["torch-textbook"] <= 20 * B * C * 4
    assert 0 < peak["marginkit"] < peak["torch-textbook"] / 10
