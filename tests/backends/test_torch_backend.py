"""backend="torch" against the float64 reference: every spec, margins, reductions, shapes."""

import math

import pytest
import torch

import marginkit as mk
from marginkit.backends import torch_chunked
from tests.helpers import GRADIENT_MODES, SPECS, loss_and_grads, make_inputs, rel_err, spec_id, with_gradient

TOL = 1e-5


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Force several class chunks even at test sizes, so the online log-sum-exp is exercised.
    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", 97)


def check_against_reference(x, w, y, spec, scale=32.0, tol=TOL, **kwargs):
    out = loss_and_grads(mk.margin_cross_entropy, x, w, y, spec, scale, backend="torch", **kwargs)
    ref = loss_and_grads(mk.reference.margin_cross_entropy, x, w, y, spec, scale, **kwargs)
    for name, o, r in zip(("loss", "grad embeddings", "grad weight"), out, ref):
        assert torch.isfinite(o).all(), name
        assert rel_err(o, r) < tol, f"{name}: rel err {rel_err(o, r):.2e}"
    return out


@pytest.mark.parametrize("gradient", GRADIENT_MODES)
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_every_spec_matches_reference(spec, gradient):
    x, w, y = make_inputs(B=9, C=61, D=24, ignored=2)
    check_against_reference(x, w, y, with_gradient(spec, gradient))


@pytest.mark.parametrize("gradient", GRADIENT_MODES)
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_every_spec_across_all_angles(spec, gradient):
    """Rows at angles from ~0 to ~π to their class weight: the ArcFace fallback, easy margin,
    every SphereFace k and the clamp near cos = ±1 all occur."""
    B, C, D = 24, 37, 16
    g = torch.Generator().manual_seed(3)
    w = torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    w_unit = torch.nn.functional.normalize(w[y], dim=1)
    u = torch.randn(B, D, generator=g)
    u = torch.nn.functional.normalize(u - (u * w_unit).sum(1, keepdim=True) * w_unit, dim=1)
    theta = torch.linspace(1e-5, math.pi - 1e-5, B)
    x = (torch.cos(theta)[:, None] * w_unit + torch.sin(theta)[:, None] * u) * 2.5
    x[0] = w[y[0]] * 1.7  # exactly parallel: cos = 1 before the clamp
    x[-1] = -w[y[-1]] * 0.3  # exactly opposite
    check_against_reference(x, w, y, with_gradient(spec, gradient), scale=16.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_ignored_rows(reduction):
    x, w, y = make_inputs(B=12, C=40, D=16, ignored=3)
    loss, _, _ = check_against_reference(x, w, y, mk.ArcFace(0.4), reduction=reduction)
    if reduction == "none":
        assert loss.shape == (12,) and loss.dtype == torch.float32
        assert torch.all(loss[:3] == 0) and torch.all(loss[3:] > 0)


def test_custom_ignore_index():
    x, w, y = make_inputs(B=10, C=30, D=8)
    y[4] = 7777
    check_against_reference(x, w, y, mk.CosFace(), ignore_index=7777)


@pytest.mark.parametrize("spec", [mk.CosFace(0.2), mk.ArcFace(0.3), mk.CombinedMargin(1.1, 0.2, 0.05)], ids=spec_id)
def test_class_margins(spec):
    x, w, y = make_inputs(B=10, C=23, D=12, ignored=1)
    class_margins = torch.rand(23) * 0.5
    check_against_reference(x, w, y, spec, class_margins=class_margins)
    # The spec's own m is replaced: a constant vector equal to m gives the plain loss.
    plain = mk.margin_cross_entropy(x, w, y, spec, 32.0)
    same = mk.margin_cross_entropy(x, w, y, spec, 32.0, class_margins=torch.full((23,), spec.default_margin()))
    assert rel_err(same, plain) < 1e-6


def test_sample_margins():
    x, w, y = make_inputs(B=10, C=23, D=12, ignored=2)
    check_against_reference(x, w, y, mk.ArcFace(), sample_margins=torch.rand(10) * 0.6)


def test_awkward_shapes():
    x, w, y = make_inputs(B=1, C=1003, D=40)
    check_against_reference(x, w, y, mk.ArcFace())
    x, w, y = make_inputs(B=5, C=1, D=3)
    check_against_reference(x, w, y, mk.CosFace())


def test_normalize_false_takes_inputs_as_given():
    x, w, y = make_inputs(B=8, C=19, D=10)
    x = torch.nn.functional.normalize(x, dim=1)
    w = torch.nn.functional.normalize(w, dim=1)
    check_against_reference(x, w, y, mk.ArcFace(), normalize=False)
    with_norm = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), 32.0)
    without = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), 32.0, normalize=False)
    assert rel_err(without, with_norm) < 1e-6


@pytest.mark.parametrize("labels", ["empty", "all_ignored"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_and_all_ignored_batches_give_zero_loss_and_zero_grads(labels, reduction):
    B = 0 if labels == "empty" else 6
    x, w, y = make_inputs(B=B, C=17, D=8, ignored=B)
    x.requires_grad_(True)
    w.requires_grad_(True)
    loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), 64.0, reduction=reduction, backend="torch")
    assert loss.dtype == torch.float32
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert x.grad is not None and torch.all(x.grad == 0)
    assert w.grad is not None and torch.all(w.grad == 0)


def test_large_scale_does_not_overflow():
    x, w, y = make_inputs(B=6, C=50, D=8)
    check_against_reference(x, w, y, mk.ArcFace(), scale=1000.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_textbook_error(dtype):
    """Low-precision inputs: error vs float64 ≤ 2× a same-dtype textbook version + a rounding floor."""
    x, w, y = make_inputs(B=16, C=300, D=64, dtype=dtype, seed=5)
    spec = mk.ArcFace(0.5)
    truth = loss_and_grads(mk.reference.margin_cross_entropy, x, w, y, spec, 64.0)
    ours = loss_and_grads(mk.margin_cross_entropy, x, w, y, spec, 64.0, backend="torch")

    def textbook(x, w, y, spec, scale):
        cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
        target = spec.differentiable_target(cos.gather(1, y[:, None]).squeeze(1))
        logits = scale * cos.scatter(1, y[:, None], target[:, None].to(cos.dtype))
        return torch.nn.functional.cross_entropy(logits, y)

    book = loss_and_grads(textbook, x, w, y, spec, 64.0)
    assert ours[0].dtype == torch.float32
    floor = 2.0 ** -8  # one bf16 ulp of relative rounding
    for name, o, b, t in zip(("loss", "grad embeddings", "grad weight"), ours, book, truth):
        assert o.dtype == t.dtype
        assert rel_err(o, t) <= 2 * rel_err(b, t) + floor, name


def test_frozen_weight_gets_no_gradient_and_embeddings_the_same_one():
    """A weight that needs no gradient (IR-Softmax's centers) skips the dW work entirely."""
    x, w, y = make_inputs(B=8, C=40, D=12, ignored=1)
    _, full_gx, _ = loss_and_grads(mk.margin_cross_entropy, x, w, y, mk.ArcFace(), 32.0, backend="torch")
    xr = x.clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(xr, w, y, mk.ArcFace(), 32.0, backend="torch")
    loss.backward()
    assert w.grad is None
    assert torch.equal(xr.grad, full_gx)
