"""Correctness before timing: the float64 path is right, and a wrong provider becomes an error row."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import marginkit as mk
from marginkit.bench import check
from marginkit.bench.config import BenchConfig, make_spec
from marginkit.bench.providers import PROVIDERS, MarginKit, make_inputs
from marginkit.cli import main
from tests.helpers import rel_err

TINY = ["--device", "cpu", "--C", "700", "--B", "8", "--D", "16", "--reps", "2", "--no-progress", "--no-plot"]


@pytest.mark.parametrize("margin", ["arcface", "cosface", "sphereface", "combined", "none"])
@pytest.mark.parametrize("chunk_elements", [1 << 22, 8 * 37, 8], ids=["one-chunk", "37-classes", "1-class"])
def test_float64_path_equals_the_reference(margin, chunk_elements, monkeypatch):
    """The independent path (online log-sum-exp over class chunks) against mk.reference's dense float64."""
    monkeypatch.setattr(check, "CHUNK_ELEMENTS", chunk_elements)
    B, C, D = 8, 300, 16
    g = torch.Generator().manual_seed(7)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) + 0.8 * w[y]  # real angles for the margins
    spec = make_spec(margin)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = mk.reference.margin_cross_entropy(xr, wr, y, margin=spec, scale=16.0)
    ref.backward()
    classes = check.sampled_classes(y, C)
    assert set(y.tolist()) <= set(classes.tolist())  # every target class is compared
    loss, gx, gw = check.float64_loss_and_grads(x, w, y, spec, 16.0, classes)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert rel_err(gx, xr.grad) < 1e-12
    assert rel_err(gw, wr.grad[classes]) < 1e-12


def test_marginkit_passes_the_check_at_fp32_and_bf16():
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, check.TOLERANCE[torch.bfloat16])):
        inputs = make_inputs(BenchConfig("cpu", 16, 32, 2_000, dtype, "arcface", 64.0), seed=1)
        case = PROVIDERS["marginkit"].build(inputs, make_spec("arcface"))
        result = check.check_against_float64(case, inputs, make_spec("arcface"))
        assert result.ok and result.max_rel_err < bound, result.summary()
        assert all(p.grad is None for p in case.params)  # the check leaves no gradient behind


class _ScaleOffByFivePercent(MarginKit):
    """marginkit at s·1.05: a plausible bug (a wrong constant) that a timing alone would never show."""

    def build(self, inputs, spec):
        fn = mk.margin_cross_entropy
        x, w, y = inputs.x.detach().requires_grad_(True), inputs.w.detach().requires_grad_(True), inputs.labels
        wrong = inputs.cfg.scale * 1.05

        def forward():
            return fn(x, w, y, margin=spec, scale=wrong, backend="torch")

        def step():
            forward().backward()

        from marginkit.bench.providers import Case

        return Case(step, forward, [x, w], inputs.cfg.margin)


def test_a_wrong_provider_is_an_error_row_not_a_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PROVIDERS, "marginkit", _ScaleOffByFivePercent())
    out = tmp_path / "r.csv"
    rc = main(["bench", *TINY, "--providers", "marginkit,torch-textbook", "--out", str(out)])
    assert rc == 3  # an error row
    rows = {r["method"]: r for r in csv.DictReader(out.read_text().splitlines())}
    bad = rows["marginkit"]
    assert bad["peak_extra_mib"] == "error"
    assert bad["ms_median"] == bad["ms_p20"] == bad["ms_p80"] == "nan"  # never a time
    assert math.isfinite(float(rows["torch-textbook"]["ms_median"]))  # the other rows are timed
    sidecar = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert "float64 check failed" in sidecar["marginkit"]["note"]
    assert sidecar["marginkit"]["check_rel_err"] > 0.01  # s off by 5 %: percents, not rounding
    assert "max rel err" in capsys.readouterr().out


def test_a_right_provider_is_timed_with_its_check_in_the_sidecar(tmp_path):
    out = tmp_path / "r.csv"
    assert main(["bench", *TINY, "--providers", "marginkit", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert rows["marginkit"]["status"] == "ok" and rows["marginkit"]["ms_median"] > 0
    assert rows["marginkit"]["check_rel_err"] < 1e-5  # float32 against float64
    assert rows["floor-3gemm"]["check_rel_err"] is None  # only marginkit's rows are checked
