"""Bad input gives a typed error that names the argument, before any work."""

import math

import pytest
import torch

import marginkit as mk
from tests.helpers import make_inputs


def call(x=None, w=None, y=None, **kwargs):
    dx, dw, dy = make_inputs(B=4, C=10, D=6)
    margin = kwargs.pop("margin", mk.ArcFace())
    return mk.margin_cross_entropy(
        dx if x is None else x, dw if w is None else w, dy if y is None else y, margin, **kwargs
    )


@pytest.mark.parametrize("bad", [10, 11, -1, -101])
def test_label_out_of_range(bad):
    _, _, y = make_inputs(B=4, C=10, D=6)
    y[2] = bad
    with pytest.raises(ValueError, match=str(bad)):
        call(y=y)


def test_ignore_index_is_allowed_and_custom_one_checked():
    _, _, y = make_inputs(B=4, C=10, D=6)
    y[1] = -100
    assert torch.isfinite(call(y=y))
    with pytest.raises(ValueError, match="-100"):
        call(y=y, ignore_index=-1)


def test_dtype_mismatch():
    x, w, _ = make_inputs(B=4, C=10, D=6)
    with pytest.raises(TypeError, match="weight dtype"):
        call(w=w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="weight dtype"):  # also a ValueError, as API.md says
        call(w=w.to(torch.bfloat16))
    with pytest.raises(TypeError, match="labels must be int64"):
        call(y=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="embeddings must be float32"):
        call(x=x.to(torch.int64), w=w.to(torch.int64))


def test_device_mismatch():
    x, _, _ = make_inputs(B=4, C=10, D=6)
    with pytest.raises(ValueError, match="on meta"):
        call(w=torch.empty(10, 6, device="meta"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(4, 5)), "embedding_dim"),
        (dict(x=torch.randn(4)), r"embeddings must have shape \(B, D\)"),
        (dict(y=torch.zeros(3, dtype=torch.long)), "labels has 3 rows"),
        (dict(w=torch.randn(0, 6)), "at least one class"),
        (dict(scale=0.0), "scale must be > 0"),
        (dict(scale=-2.0), "scale must be > 0"),
        (dict(scale=math.nan), "scale must be finite"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(ignore_index=1 << 63), r"ignore_index = 9223372036854775808 does not fit in int64"),
        (dict(ignore_index=-(1 << 64)), "ignore_index = -18446744073709551616 does not fit in int64"),
        (dict(class_margins=torch.rand(10), sample_margins=torch.rand(4)), "not both"),
        (dict(class_margins=torch.rand(9)), r"class_margins must have shape \(C,\)"),
        (dict(sample_margins=torch.tensor([0.1, math.nan, 0.2, 0.3])), "NaN"),
        (dict(sample_margins=torch.tensor([0.1, -0.1, 0.2, 0.3])), "negative"),
        (dict(margin=mk.SphereFace(), sample_margins=torch.rand(4)), "no single margin"),
        (dict(margin=mk.NoMargin(), class_margins=torch.rand(10)), "no single margin"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        call(**kwargs)


def test_margin_must_be_a_spec():
    with pytest.raises(TypeError, match="margin must be a marginkit margin spec"):
        call(margin=0.5)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: mk.ArcFace(-0.1), "m must be >= 0"),
        (lambda: mk.ArcFace(math.nan), "m must be finite"),
        (lambda: mk.CosFace(-1.0), "m must be >= 0"),
        (lambda: mk.CosFace(math.inf), "m must be finite"),
        (lambda: mk.SphereFace(0.5), "m must be >= 1"),
        (lambda: mk.SphereFace(4.0, lambda_=-1.0), "lambda_ must be >= 0"),
        (lambda: mk.CombinedMargin(m1=0.9), "m1 must be >= 1"),
        (lambda: mk.CombinedMargin(m2=-0.2), "m2 must be >= 0"),
        (lambda: mk.CombinedMargin(m3=math.nan), "m3 must be finite"),
        (lambda: mk.ArcFace(gradient="approx"), "gradient must be one of"),
    ],
)
def test_bad_specs(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_spec_m_type():
    with pytest.raises(TypeError, match="m must be a real number"):
        mk.CosFace("0.3")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        call(backend="triton")


def test_specs_are_frozen():
    spec = mk.ArcFace(0.5)
    with pytest.raises(Exception):
        spec.m = 0.1
    assert mk.ArcFace(0.5) == spec and hash(mk.ArcFace(0.5)) == hash(spec)


@pytest.mark.parametrize("m", [math.pi, 3.5, 10.0])
def test_arcface_margin_of_pi_or_more_is_rejected(m):
    # Past π the margin would become a bonus (ArcFace(3.5) gave loss 0.0 where NoMargin gives 49.8).
    with pytest.raises(ValueError, match=r"m must be < 3.14"):
        mk.ArcFace(m)
    x, w, y = make_inputs(B=5, C=10, D=6)
    for name, kwargs in (("class_margins", {"class_margins": torch.full((10,), m)}),
                         ("sample_margins", {"sample_margins": torch.full((5,), m)})):
        with pytest.raises(ValueError, match=name):
            mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 16.0, **kwargs)


def test_margin_just_below_pi_takes_the_fallback_everywhere():
    x, w, y = make_inputs(B=5, C=10, D=6)
    m = 3.1
    big = mk.margin_cross_entropy(x, w, y, mk.ArcFace(m), 16.0)
    ref = mk.reference.margin_cross_entropy(x, w, y, mk.ArcFace(m), 16.0)
    assert torch.allclose(big, ref, rtol=1e-5)
    cos = torch.tensor([0.3, -0.9], dtype=torch.float64)
    assert torch.allclose(mk.ArcFace(m).psi(cos), cos - m * math.sin(m))


def test_float64_inputs_give_float64_losses_in_backend_and_reference():
    x, w, y = make_inputs(B=5, C=10, D=6, dtype=torch.float64)
    assert mk.margin_cross_entropy(x, w, y).dtype == torch.float64
    assert mk.reference.margin_cross_entropy(x, w, y).dtype == torch.float64


@pytest.mark.parametrize("keyword,length", [("class_margins", 10), ("sample_margins", 4)])
def test_margins_that_require_grad_are_refused_not_silently_constant(keyword, length):
    # margins are constants to the loss: one computed from the embeddings would lose its gradient
    margins = torch.full((length,), 0.2, requires_grad=True)
    with pytest.raises(ValueError, match=rf"{keyword} requires grad.*{keyword}\.detach\(\)"):
        call(margin=mk.CosFace(), **{keyword: margins * 1.0})
    x, _, y = make_inputs(B=4, C=10, D=6)
    with pytest.raises(ValueError, match=f"{keyword} requires grad"):  # at construction, or the first forward
        mk.MarginSoftmax(10, 6, mk.CosFace(), **{keyword: torch.nn.Parameter(torch.full((length,), 0.2))})(x, y)
    with torch.no_grad():  # nothing would flow into them here
        expected = call(margin=mk.CosFace(), **{keyword: margins.detach()})
        assert torch.equal(call(margin=mk.CosFace(), **{keyword: margins}), expected)
