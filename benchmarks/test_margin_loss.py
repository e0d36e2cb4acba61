"""Forward + backward of every provider, timed by pytest-benchmark.

The providers, inputs, memory measurement and out-of-memory handling are the
ones ``marginkit bench`` uses (marginkit.bench); pytest-benchmark does the
timing here. marginkit's rows are checked against float64 first (a mismatch fails
the benchmark). Each benchmark's ``extra_info`` carries the CSV fields of API.md
(``peak_extra_mib`` from a separate measured step), so ``--benchmark-json``
output can be turned into the results table.
"""

from __future__ import annotations

import math

import pytest
import torch

from marginkit.bench.config import dtype_name, make_spec
from marginkit.bench.providers import PROVIDERS, make_inputs
from marginkit.bench.cell import is_oom
from marginkit.bench.check import check_against_float64
from marginkit.bench.timing import measure

_INPUTS = {}  # the current shape's inputs only: one W (C × D) alive at a time


def _inputs(cfg):
    if cfg not in _INPUTS:
        _INPUTS.clear()
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
        _INPUTS[cfg] = make_inputs(cfg)
    return _INPUTS[cfg]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def test_forward_backward(benchmark, mk_case, mk_rounds):
    cfg, name = mk_case
    prov = PROVIDERS[name]
    reason = prov.unavailable() or prov.unsupported(cfg.device, cfg.margin) or prov.too_large(cfg)
    if reason:
        pytest.skip(f"{name}: {reason}")
    margin = prov.row_margin(cfg.margin)
    benchmark.group = f"B={cfg.B} D={cfg.D} C={cfg.C} {dtype_name(cfg.dtype)} {cfg.margin}"
    try:
        inputs = _inputs(cfg)
        case = prov.build(inputs, make_spec(margin))
        if prov.checked:  # as `marginkit bench` does: correct numbers before any time
            check = check_against_float64(case, inputs, make_spec(margin))
            assert check.ok, f"{name} at B={cfg.B} D={cfg.D} C={cfg.C}: {check.summary()}"
        # warm-up, compile time and the memory peak
        m = measure(case, cfg.device, reps=1, preexisting=(inputs.x, inputs.w, inputs.labels))
    except Exception as exc:
        if is_oom(exc):
            _INPUTS.clear()
            pytest.skip(f"{name}: out of memory at B={cfg.B} D={cfg.D} C={cfg.C} ({type(exc).__name__})")
        raise
    benchmark.extra_info.update(
        device=cfg.device if not cfg.device.startswith("cuda") else torch.cuda.get_device_name(),
        method=name, B=cfg.B, D=cfg.D, C=cfg.C, dtype=dtype_name(cfg.dtype), margin=margin,
        peak_extra_mib=None if math.isnan(m.peak_extra_mib) else round(m.peak_extra_mib, 1),
        first_call_s=round(m.first_call_s, 3), floor_flops=6 * cfg.B * cfg.D * cfg.C,
    )

    def setup():
        for p in case.params:
            p.grad = None

    def target():
        case.step()
        _sync(cfg.device)

    rounds = mk_rounds or (10 if cfg.device.startswith("cuda") else 5)
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
