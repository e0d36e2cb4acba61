"""The benchmark's providers compute the losses they claim to, and the timer behaves."""

from __future__ import annotations

import math
import time

import pytest
import torch

from marginkit.bench import providers as bench_providers
from marginkit.bench.config import BenchConfig, make_spec
from marginkit.bench.providers import PROVIDERS, Case, make_inputs
from marginkit.bench.timing import measure, quantiles


def _case_loss_and_grads(name, inputs, margin):
    case = PROVIDERS[name].build(inputs, make_spec(margin))
    loss = case.forward()
    loss.backward()
    return loss.detach().double(), [p.grad.detach().double().clone() for p in case.params]


def _inputs(margin, C=777, B=24, D=40, dtype=torch.float32, seed=5):
    # embeddings pulled towards their class weights so the margins act on real angles
    inp = make_inputs(BenchConfig("cpu", B, D, C, dtype, margin, 16.0), seed)
    with torch.no_grad():
        inp.x.add_(inp.w[inp.labels] * 0.5)  # target cos ~ 0.45
    return inp


def _needs_marginkit():
    reason = PROVIDERS["marginkit-torch"].unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("margin", ["arcface", "cosface", "none", "combined", "sphereface"])
def test_textbook_agrees_with_marginkit_torch(margin):
    _needs_marginkit()
    inp = _inputs(margin)
    ref_loss, ref_grads = _case_loss_and_grads("torch-textbook", inp, margin)
    loss, grads = _case_loss_and_grads("marginkit-torch", inp, margin)
    assert math.isfinite(ref_loss.item()) and ref_loss.item() > 0.1
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for g, rg in zip(grads, ref_grads):
        assert (g - rg).norm() / rg.norm() < 1e-4


def test_arcface_loss_value_textbook_vs_marginkit_torch_vs_reference():
    """The headline check: one real ArcFace number, three implementations."""
    _needs_marginkit()
    import marginkit as mk

    inp = _inputs("arcface", C=1000, B=32, D=64, seed=11)
    tb, _ = _case_loss_and_grads("torch-textbook", inp, "arcface")
    mkt, _ = _case_loss_and_grads("marginkit-torch", inp, "arcface")
    ref = mk.reference.margin_cross_entropy(inp.x.double(), inp.w.double(), inp.labels, margin=mk.ArcFace(),
                                            scale=16.0)
    assert tb.item() == pytest.approx(ref.item(), rel=2e-6)
    assert mkt.item() == pytest.approx(ref.item(), rel=2e-6)


@pytest.mark.parametrize("margin", ["arcface", "cosface", "none"])
def test_textbook_agrees_with_pml(margin):
    """An independent implementation: pytorch-metric-learning (W transposed, margin in degrees)."""
    if PROVIDERS["pml"].unavailable():
        pytest.skip(PROVIDERS["pml"].unavailable())
    inp = _inputs(margin, dtype=torch.float64)
    ref_loss, ref_grads = _case_loss_and_grads("torch-textbook", inp, margin)
    loss, grads = _case_loss_and_grads("pml", inp, margin)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10)
    assert (grads[0] - ref_grads[0]).norm() / ref_grads[0].norm() < 1e-9  # d embeddings
    assert (grads[1].t() - ref_grads[1]).norm() / ref_grads[1].norm() < 1e-9  # pml's W is (D, C)


def test_textbook_arcface_fallback_beyond_pi():
    """θ + m > π uses cos θ − m·sin m (API.md), not cos(θ + m)."""
    from marginkit.bench.textbook import textbook_target_logit

    cos = torch.tensor([-0.99, 0.3], dtype=torch.float64)
    psi = textbook_target_logit(make_spec("arcface"), cos)
    assert psi[0].item() == pytest.approx(-0.99 - 0.5 * math.sin(0.5))
    assert psi[1].item() == pytest.approx(math.cos(math.acos(0.3) + 0.5))


def test_providers_share_input_storage():
    inp = _inputs("arcface")
    case = PROVIDERS["torch-textbook"].build(inp, make_spec("arcface"))
    assert case.params[1].data_ptr() == inp.w.data_ptr()  # no copy of W per provider
    pml = PROVIDERS["pml"]
    if pml.unavailable() is None:
        c = pml.build(inp, make_spec("arcface"))
        assert c.params[1].shape == (inp.cfg.D, inp.cfg.C) and c.params[1].data_ptr() == inp.w.data_ptr()


def test_floor_runs_the_three_gemms(monkeypatch):
    monkeypatch.setattr(bench_providers, "FLOOR_CHUNK", 4)  # C = 10: chunks of 4, 4, 2
    inp = make_inputs(BenchConfig("cpu", 3, 5, 10, torch.float64, "arcface"), 2)
    case = PROVIDERS["floor-3gemm"].build(inp, None)
    g, dx, dw = case.keepalive
    case.step()
    w = inp.w
    want_dx = sum(g[:, : min(4, 10 - c0)] @ w[c0 : c0 + 4] for c0 in range(0, 10, 4))
    assert torch.allclose(dx, want_dx)
    for c0 in range(0, 10, 4):
        c1 = min(c0 + 4, 10)
        assert torch.allclose(dw[c0:c1], g[:, : c1 - c0].t() @ inp.x)
    assert g.abs().min() > 0 or g.abs().max() > 0  # random, not zeros


def test_no_margin_peers_file_their_rows_under_none():
    assert PROVIDERS["cce"].row_margin("arcface") == "none"
    assert PROVIDERS["liger"].row_margin("arcface") == "none"
    assert PROVIDERS["pml"].row_margin("arcface") == "arcface"
    assert PROVIDERS["cce"].unsupported("cpu", "arcface")  # CUDA only
    assert PROVIDERS["pml"].unsupported("cpu", "sphereface")


def test_measure_times_and_resets_gradients():
    p = torch.zeros(3, requires_grad=True)
    seen = []

    def step():
        seen.append(p.grad is None)  # every step starts without the last step's gradient
        time.sleep(0.004)
        (p * 2).sum().backward()

    m = measure(Case(step, None, [p]), "cpu", reps=5, warmup=2)
    assert all(seen) and len(seen) == 2 + 1 + 5
    assert m.reps == 5 and m.timer == "perf_counter"
    assert 4.0 <= m.ms_p20 <= m.ms_median <= m.ms_p80 < 200
    assert 0 <= m.peak_extra_mib < 0.01  # a few 12-byte tensors, measured by the CPU tracker
    assert p.grad is None


def test_measure_budget_bounds_slow_steps():
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.05)

    m = measure(Case(step, None, []), "cpu", budget_s=0.12)
    assert 1 <= m.reps <= 3 and len(calls) == 1 + m.reps  # warm-up + timed


def test_quantiles():
    assert quantiles([1, 2, 3, 4, 5]) == pytest.approx((3.0, 1.8, 4.2))
