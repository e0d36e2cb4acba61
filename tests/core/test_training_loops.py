"""What real training loops do around the loss (issue 12, points 1, 6, 7, 8): autocast, fp32
master weights with half-precision embeddings, insightface's CombinedMarginLoss as a drop-in,
and nonsense arguments refused before a step runs.

Every number is checked against the float64 reference (``mk.reference``) evaluated at the values
the loss really computes on (the half-precision-rounded embeddings), or against an independent
dense float64 re-implementation (insightface's formulas).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import marginkit as mk
from marginkit.backends import torch_chunked
from tests.helpers import GemmCounter, make_inputs, rel_err

HALF = [torch.bfloat16, torch.float16]
# Unit roundoff of each dtype: a correctly rounded value is within u·|x| of the exact one.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def run(loss_fn, x, w, y, **kwargs):
    """(loss, grad of x, grad of w) of ``loss_fn(x, w, y, **kwargs)`` on fresh leaves of x and w."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = loss_fn(x, w, y, **kwargs)
    loss.sum().backward()
    return loss.detach(), x.grad, w.grad


def truth(x, w, y, margin, scale, **kwargs):
    """The float64 reference's (loss, dx, dw) at exactly the values of x and w given."""
    return run(mk.reference.margin_cross_entropy, x.double(), w.double(), y, margin=margin, scale=scale, **kwargs)


def assert_within_rounding(grad, ref, dtype, slack=1e-5):
    """Each element of ``grad`` is ``ref`` rounded to ``dtype`` (one rounding: |g − r| ≤ u·|r|),
    up to ``slack`` of the largest element for the fp32 compute before that rounding."""
    grad, ref = grad.double(), ref.double()
    bound = UNIT_ROUNDOFF[dtype] * ref.abs() + slack * ref.abs().max()
    excess = ((grad - ref).abs() - bound).max()
    assert excess <= 0, f"gradient off by more than one {dtype} rounding (excess {float(excess):.3g})"


# ----------------------------------------------------------------------------------------
# Point 1: autocast runs forward and backward in one precision
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("margin", [mk.ArcFace(0.5), mk.CosFace(0.35)], ids=["arcface", "cosface"])
def test_autocast_equals_explicit_cast_and_the_float64_truth_torch_backend(dtype, margin):
    """Under CPU autocast the loss equals the explicit call on embeddings.to(dtype) with the fp32
    weight, bit for bit, and equals the float64 truth at the rounded embeddings to fp32 accuracy:
    a forward in half precision and a backward in fp32 (the bug of issue 12) is ~1e-2 off."""
    x, w, y = make_inputs(16, 40, 24, seed=3, ignored=2)

    def under_autocast(x, w, y):
        with torch.autocast("cpu", dtype=dtype):
            return mk.margin_cross_entropy(x, w, y, margin, 64.0, backend="torch")

    def explicit(x, w, y):
        return mk.margin_cross_entropy(x.to(dtype), w, y, margin, 64.0, backend="torch")

    loss, gx, gw = run(under_autocast, x, w, y)
    e_loss, e_gx, e_gw = run(explicit, x, w, y)
    assert loss.dtype == torch.float32 and gx.dtype == torch.float32 and gw.dtype == torch.float32
    assert torch.equal(loss, e_loss) and torch.equal(gx, e_gx) and torch.equal(gw, e_gw)

    r_loss, r_gx, r_gw = truth(x.to(dtype), w, y, margin, 64.0)
    assert rel_err(loss, r_loss) < 1e-5
    assert rel_err(gw, r_gw) < 1e-5
    # dx is rounded once to the embeddings' dtype (the cast's backward then widens it exactly)
    assert_within_rounding(gx, r_gx, dtype)


@pytest.mark.parametrize(
    "backend, options, chunk_elements",
    [("torch", {}, None), ("torch", {}, 97), ("triton", {}, None), ("triton", {"memory_budget": None}, None)],
    ids=["torch-dense", "torch-chunked", "triton", "triton-fast"],
)
def test_a_backward_called_inside_autocast_equals_one_called_after_it(backend, options, chunk_elements, monkeypatch):
    """``loss.backward()`` inside the ``torch.autocast`` block (as many training loops write it) runs
    the loss's backward in the forward's precision: the same bits as a backward after the block (the
    torch backend's GEMMs ran in bf16 there, ~3e-3 off at C = 500, 4e-2 at C = 300K), and the float64
    truth at the rounded embeddings."""

    if chunk_elements:
        monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", chunk_elements)
    x, w, y = make_inputs(16, 40, 24, seed=9, ignored=2)
    grads = {}
    for inside in (False, True):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mk.margin_cross_entropy(xs, ws, y, mk.ArcFace(0.5), 64.0, backend=backend, **options)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads[inside] = xs.grad, ws.grad
    assert torch.equal(grads[True][0], grads[False][0]) and torch.equal(grads[True][1], grads[False][1])
    _, r_gx, r_gw = truth(x.bfloat16(), w, y, mk.ArcFace(0.5), 64.0)
    tolerance = 1e-5 if backend == "torch" else 2e-2  # the Triton backend computes in bf16 on bf16 inputs
    assert rel_err(grads[True][1], r_gw) < tolerance and rel_err(grads[True][0], r_gx) < max(tolerance, 1e-2)


@pytest.mark.parametrize("chunk_elements", [None, 97], ids=["dense", "chunked"])
def test_a_model_compiled_inside_autocast_has_the_eager_gradients(chunk_elements, monkeypatch):
    """``with torch.autocast(...): loss = compiled(x, y)``, the usual way: AOT autograd traced the
    backward under the caller's autocast, so its GEMMs ran in bf16 (2.6e-3 off the eager weight
    gradient on the dense path; a dtype error on the chunked one)."""
    if chunk_elements:
        monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", chunk_elements)
    x, w, y = make_inputs(16, 40, 24, seed=9, ignored=2)
    spec = mk.ArcFace(0.5)
    grads = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

        def step(a, b):
            return mk.margin_cross_entropy(a, b, y, spec, 64.0, backend="torch")

        run = torch.compile(step, backend="aot_eager", fullgraph=True) if compiled else step
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(xs, ws)
        loss.backward()
        grads[compiled] = xs.grad, ws.grad
    assert rel_err(grads[True][1], grads[False][1]) < 1e-5 and rel_err(grads[True][0], grads[False][0]) < 1e-5


@pytest.mark.parametrize(
    "backend, options, chunk_elements",
    [("torch", {}, None), ("torch", {}, 97), ("torch", {"memory_budget": None}, 97), ("triton", {}, None),
     ("partitioned", {}, None)],
    ids=["torch-dense", "torch-chunked", "torch-stored", "triton", "partitioned"],
)
def test_a_double_backward_raises_instead_of_a_silently_constant_gradient(backend, options, chunk_elements, monkeypatch):
    """create_graph=True through the loss (a gradient penalty): the torch backend's gradient came back
    without a graph, so a penalty on it added nothing to the training gradient, silently."""
    if chunk_elements:
        monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", chunk_elements)
    x, w, y = make_inputs(6, 40, 8, seed=2)
    x.requires_grad_(True)
    if backend == "partitioned":
        head = mk.PartitionedMarginSoftmax(40, 8, mk.ArcFace(0.5), 16.0)
        loss = head(x, y)
    else:
        loss = mk.margin_cross_entropy(x, w.requires_grad_(True), y, mk.ArcFace(0.5), 16.0, backend=backend, **options)
    with pytest.raises(RuntimeError, match="differentiable once: a backward with create_graph=True"):
        torch.autograd.grad(loss, [x], create_graph=True)
    (gx,) = torch.autograd.grad(loss, [x])  # the first-order gradient is unaffected
    _, r_gx, _ = truth(x.detach(), w.detach() if backend != "partitioned" else head.weight.detach(), y,
                       mk.ArcFace(0.5), 16.0)
    assert rel_err(gx, r_gx) < 1e-5


def test_range_loss_refuses_a_double_backward_too():
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    loss = mk.RangeLoss(k=2)(x, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2]))
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, [x], create_graph=True)


def test_autocast_triton_backend_equals_explicit_cast():
    """The Triton backend (interpreter, tiny): autocast = the explicit bf16 call bit for bit, and
    the float64 truth at the rounded embeddings and weight within bf16 compute accuracy."""
    x, w, y = make_inputs(4, 12, 16, seed=5)
    margin = mk.ArcFace(0.5)

    def under_autocast(x, w, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return mk.margin_cross_entropy(x, w, y, margin, 32.0, backend="triton")

    def explicit(x, w, y):
        return mk.margin_cross_entropy(x.to(torch.bfloat16), w, y, margin, 32.0, backend="triton")

    loss, gx, gw = run(under_autocast, x, w, y)
    e_loss, e_gx, e_gw = run(explicit, x, w, y)
    assert torch.equal(loss, e_loss) and torch.equal(gx, e_gx) and torch.equal(gw, e_gw)
    assert gw.dtype == torch.float32
    # Triton multiplies bf16 tiles (the fp32 weight is cast in registers): bf16-level accuracy
    r_loss, r_gx, r_gw = truth(x.to(torch.bfloat16), w.to(torch.bfloat16), y, margin, 32.0)
    assert rel_err(loss, r_loss) < 1e-2
    assert rel_err(gx, r_gx) < 2e-2 and rel_err(gw, r_gw) < 2e-2


def test_margin_softmax_module_under_autocast_trains_like_explicit_casts():
    """Three SGD steps of a MarginSoftmax head under bf16 autocast equal the same steps written
    with explicit casts (weights bit for bit), and every step's loss is the float64 truth."""
    torch.manual_seed(0)
    head = mk.MarginSoftmax(30, 16, mk.ArcFace(0.5), 64.0, backend="torch")
    twin = mk.MarginSoftmax(30, 16, mk.ArcFace(0.5), 64.0, backend="torch")
    twin.load_state_dict(head.state_dict())
    opt, twin_opt = torch.optim.SGD(head.parameters(), lr=0.5), torch.optim.SGD(twin.parameters(), lr=0.5)
    for step in range(3):
        x, _, y = make_inputs(12, 30, 16, seed=10 + step)
        w_before = head.weight.detach().clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head(x, y)
        loss.backward()
        twin_loss = twin(x.to(torch.bfloat16), y)
        twin_loss.backward()
        assert loss.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
        assert torch.equal(loss, twin_loss) and torch.equal(head.weight.grad, twin.weight.grad)
        r_loss, _, r_gw = truth(x.to(torch.bfloat16), w_before, y, mk.ArcFace(0.5), 64.0)
        assert rel_err(loss, r_loss) < 1e-5 and rel_err(head.weight.grad, r_gw) < 1e-5
        for o in (opt, twin_opt):
            o.step()
            o.zero_grad()
    assert torch.equal(head.weight, twin.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU twins: the autocast tests above)")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", HALF)
def test_autocast_on_cuda_equals_explicit_cast_and_the_float64_truth(dtype, backend):
    """CUDA fp16/bf16 autocast: the explicit call on embeddings.to(dtype) + fp32 weight (up to the
    order of atomic adds), and the float64 truth at the rounded inputs within half-precision
    accuracy; the bug of issue 12 (half forward, fp32 backward) was 5.7 % off in dx, 8.5 % in dW."""
    x, w, y = make_inputs(64, 1000, 128, seed=13, ignored=4)
    x, w, y = x.cuda(), w.cuda(), y.cuda()

    def under_autocast(x, w, y):
        with torch.autocast("cuda", dtype=dtype):
            return mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 64.0, backend=backend)

    def explicit(x, w, y):
        return mk.margin_cross_entropy(x.to(dtype), w, y, mk.ArcFace(0.5), 64.0, backend=backend)

    loss, gx, gw = run(under_autocast, x, w, y)
    e_loss, e_gx, e_gw = run(explicit, x, w, y)
    assert loss.dtype == torch.float32 and gw.dtype == torch.float32
    assert rel_err(loss, e_loss) < 1e-6 and rel_err(gx, e_gx) < 1e-5 and rel_err(gw, e_gw) < 1e-5
    if backend == "torch":  # float32 compute with the fp32 master weight: that truth, to fp32 accuracy
        r_loss, r_gx, r_gw = truth(x.to(dtype), w, y, mk.ArcFace(0.5), 64.0)
        assert rel_err(loss, r_loss) < 1e-4 and rel_err(gw, r_gw) < 1e-4
        assert_within_rounding(gx, r_gx, dtype, slack=1e-4)
        return
    r_loss, r_gx, r_gw = truth(x.to(dtype), w.to(dtype), y, mk.ArcFace(0.5), 64.0)  # Triton: W's tiles in dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert rel_err(loss, r_loss) < tol / 2
    assert rel_err(gx, r_gx) < tol and rel_err(gw, r_gw) < tol


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (CPU twin: test_a_backward_called_inside_autocast_equals_one_called_after_it)"
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_a_backward_called_inside_autocast_equals_one_called_after_it(backend):
    """On CUDA the autograd engine's device thread inherits autocast: a backward inside the block
    gives the gradients of one after it (up to the order of atomic adds)."""
    x, w, y = make_inputs(64, 1000, 128, seed=14, ignored=4)
    x, w, y = x.cuda(), w.cuda(), y.cuda()
    grads = {}
    for inside in (False, True):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = mk.margin_cross_entropy(xs, ws, y, mk.ArcFace(0.5), 64.0, backend=backend)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads[inside] = xs.grad, ws.grad
    assert rel_err(grads[True][0], grads[False][0]) < 1e-6 and rel_err(grads[True][1], grads[False][1]) < 1e-6


# ----------------------------------------------------------------------------------------
# Point 7: fp32 master weights with half-precision embeddings
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp32_master_weight_torch_backend_matches_float64_truth(dtype, reduction):
    """weight float32 + embeddings bf16/fp16: the loss and weight gradient are the float64 truth at
    the same values to fp32 accuracy; embeddings.grad is that truth rounded once to the half dtype."""
    x, w, y = make_inputs(16, 50, 32, seed=7, ignored=3)
    xh = x.to(dtype)
    margin = mk.CombinedMargin(1.0, 0.4, 0.1)
    loss, gx, gw = run(
        mk.margin_cross_entropy, xh, w, y, margin=margin, scale=48.0, reduction=reduction, backend="torch"
    )
    assert loss.dtype == torch.float32 and gx.dtype == dtype and gw.dtype == torch.float32
    r_loss, r_gx, r_gw = truth(xh, w, y, margin, 48.0, reduction=reduction)
    assert rel_err(loss, r_loss) < 1e-5
    assert rel_err(gw, r_gw) < 1e-5
    assert_within_rounding(gx, r_gx, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_fp32_master_weight_triton_backend_matches_float64_truth(dtype):
    """The Triton backend (interpreter, tiny) computes in the embeddings' dtype: within that dtype's
    accuracy of the float64 truth at the rounded embeddings and weight; grad dtypes as the API says."""
    x, w, y = make_inputs(4, 12, 16, seed=8)
    xh = x.to(dtype)
    loss, gx, gw = run(mk.margin_cross_entropy, xh, w, y, margin=mk.ArcFace(0.5), scale=32.0, backend="triton")
    assert loss.dtype == torch.float32 and gx.dtype == dtype and gw.dtype == torch.float32
    r_loss, r_gx, r_gw = truth(xh, w.to(dtype), y, mk.ArcFace(0.5), 32.0)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel_err(loss, r_loss) < tol / 2
    assert rel_err(gx, r_gx) < tol and rel_err(gw, r_gw) < tol


# ----------------------------------------------------------------------------------------
# Point 8: mk.insightface_margin reproduces insightface's CombinedMarginLoss
# ----------------------------------------------------------------------------------------
def insightface_combined_margin_loss(x, w, y, s, m1, m2, m3):
    """insightface arcface_torch's PartialFC logits + CombinedMarginLoss + cross-entropy, written
    densely from its formulas: clamped normalised logits; for (1, m2, 0) arccos, +m2 on the target,
    cos, all under no_grad (so the gradient passes straight through); for m3 > 0, target − m3."""
    logits = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    rows = torch.arange(y.shape[0])
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            theta = logits.arccos()
            theta[rows, y] += m2
            shift = theta.cos() - logits
        final = logits + shift
    elif m3 > 0:
        final = logits.clone()
        final[rows, y] = logits[rows, y] - m3
    else:
        raise ValueError("insightface rejects this margin list")
    return F.cross_entropy(final * s, y)


def beyond_pi_inputs(m2):
    """float64 inputs where the first 3 rows sit almost opposite their class (θ_y + m2 > π)."""
    x, w, y = make_inputs(10, 14, 8, dtype=torch.float64, seed=11)
    g = torch.Generator().manual_seed(12)
    x[:3] = -F.normalize(w[y[:3]], dim=1) + 0.05 * torch.randn(3, 8, generator=g, dtype=torch.float64)
    cos = (F.normalize(x) * F.normalize(w[y])).sum(1)
    assert bool((cos[:3].arccos() + m2 > math.pi).all()) and bool((cos[3:].arccos() + m2 < math.pi).all())
    return x, w, y


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.5, 0.2)], ids=str)
def test_insightface_margin_equals_insightface_formulas(margins, backend):
    """Loss and both gradients vs autograd through the dense insightface re-implementation,
    rows past π included; m3 > 0 ignores m2. float64 on the torch backend; float32 on Triton
    (its kernels compute float64 input in float32)."""
    x, w, y = beyond_pi_inputs(0.5)
    spec = mk.insightface_margin(margins)
    dtype, tol = (torch.float64, 1e-10) if backend == "torch" else (torch.float32, 1e-5)
    loss, gx, gw = run(mk.margin_cross_entropy, x.to(dtype), w.to(dtype), y, margin=spec, scale=64.0, backend=backend)
    r_loss, r_gx, r_gw = run(insightface_combined_margin_loss, x, w, y, s=64.0, m1=margins[0], m2=margins[1], m3=margins[2])
    assert rel_err(loss, r_loss) < tol
    assert rel_err(gx, r_gx) < tol and rel_err(gw, r_gw) < tol


def test_insightface_rows_past_pi_differ_from_arcface():
    """The past-π rows are really exercised: ArcFace(0.5)'s fallback (even with the straight-through
    gradient) gives another loss there, and its exact gradient another gradient everywhere."""
    x, w, y = beyond_pi_inputs(0.5)
    r_loss, r_gx, _ = run(insightface_combined_margin_loss, x, w, y, s=64.0, m1=1.0, m2=0.5, m3=0.0)
    st = mk.ArcFace(0.5, gradient="straight_through")
    loss_st, _, _ = run(mk.margin_cross_entropy, x, w, y, margin=st, scale=64.0, backend="torch")
    _, gx_exact, _ = run(mk.margin_cross_entropy, x, w, y, margin=mk.ArcFace(0.5), scale=64.0, backend="torch")
    assert rel_err(loss_st, r_loss) > 1e-3
    assert rel_err(gx_exact, r_gx) > 1e-2


def test_insightface_margin_specs():
    """The spec chosen for each list: straight-through combined for (1, m2, 0), CosFace(m3) for
    m3 > 0, and the plain CombinedMargin for lists insightface rejects; non-triples refused."""
    assert mk.insightface_margin((1.0, 0.5, 0.0)) == mk.CombinedMargin(1.0, 0.5, 0.0, gradient="straight_through")
    assert mk.insightface_margin([1.0, 0.5, 0.2]) == mk.CosFace(0.2)
    assert mk.insightface_margin((1.0, 0.0, 0.4)) == mk.CosFace(0.4)
    assert mk.insightface_margin((1.2, 0.3, 0.0)) == mk.CombinedMargin(1.2, 0.3, 0.0)
    with pytest.raises(ValueError, match="margins"):
        mk.insightface_margin((1.0, 0.5))


# ----------------------------------------------------------------------------------------
# Point 6: nonsense refused with a typed error naming the argument and the value
# ----------------------------------------------------------------------------------------
def test_arcface_margin_at_or_past_pi_refused():
    for m in (math.pi, 3.5):
        with pytest.raises(ValueError, match=r"m must be < 3\.14"):
            mk.ArcFace(m)
    assert mk.ArcFace(math.pi - 1e-6).m < math.pi  # just below π is allowed
    with pytest.raises(ValueError, match=r"max_margin must be < 3\.14.*3\.5"):
        mk.LDAMSoftmax(10, 4, max_margin=3.5, margin=mk.ArcFace())


@pytest.mark.parametrize("which", ["class_margins", "sample_margins"])
def test_arcface_class_and_sample_margins_at_or_past_pi_refused(which):
    x, w, y = make_inputs(3, 5, 4)
    margins = torch.full((5 if which == "class_margins" else 3,), 0.3)
    margins[1] = math.pi
    with pytest.raises(ValueError, match=rf"{which} contains 3\.14.*\[0, π\)"):
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), **{which: margins})
    margins[1] = 3.0  # below π: accepted, finite
    assert torch.isfinite(mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), **{which: margins}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_features_refused_on_both_backends(backend):
    with pytest.raises(ValueError, match="D = 0"):
        mk.margin_cross_entropy(torch.randn(2, 0), torch.randn(3, 0), torch.tensor([0, 1]), backend=backend)


@pytest.mark.parametrize("name", ["normalize", "deterministic"])
@pytest.mark.parametrize("value", ["no", "yes", 1, None])
def test_flags_must_be_bool(name, value):
    x, w, y = make_inputs(2, 3, 4)
    with pytest.raises(TypeError, match=rf"{name} must be True or False, got {value!r}"):
        mk.margin_cross_entropy(x, w, y, **{name: value})
    with pytest.raises(TypeError, match=rf"{name} must be True or False, got {value!r}"):
        mk.MarginSoftmax(3, 4, **{name: value})


def test_margin_softmax_bad_keywords_fail_at_construction():
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none'; got 'avg'"):
        mk.MarginSoftmax(10, 4, reduction="avg")
    with pytest.raises(TypeError, match="unknown keyword.*foo"):
        mk.MarginSoftmax(10, 4, foo=1)
    with pytest.raises(ValueError, match=r"class_margins contains 3\.5"):
        mk.MarginSoftmax(10, 4, mk.ArcFace(), class_margins=torch.full((10,), 3.5))


@pytest.mark.parametrize("head", ["IRSoftmax", "FairLoss"])
def test_heads_that_pass_loss_keywords_on_check_them_at_construction(head):
    """IRSoftmax and FairLoss hand **loss_kwargs to the loss themselves: a typo or a bad value is
    refused when the head is built, naming the head and the keyword, not at the first forward."""
    build = getattr(mk, head)
    with pytest.raises(TypeError, match=rf"{head} got unknown keyword\(s\) reducton; allowed: reduction"):
        build(10, 4, reducton="sum")
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none'; got 'avg'"):
        build(10, 4, reduction="avg")
    with pytest.raises(ValueError, match="memory_budget"):
        build(10, 4, memory_budget=-1)
    if head == "FairLoss":  # its class margins are the agent's; feature_norm_scale it takes
        with pytest.raises(TypeError, match="unknown keyword.*class_margins"):
            build(10, 4, class_margins=torch.zeros(10))
        assert build(10, 4, feature_norm_scale=True).loss_kwargs == {"feature_norm_scale": True}


@pytest.mark.parametrize("head", ["IRSoftmax", "FairLoss"])
def test_memory_budget_set_on_the_head_after_construction_is_used(head, monkeypatch):
    """``head.memory_budget = None`` keeps the chunks (fewer GEMMs) and changes no number."""
    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", 8 * (6 + 4))  # 8-class chunks: 5 of them at C = 40
    torch.manual_seed(0)
    module = getattr(mk, head)(40, 4)
    assert module.memory_budget == 0
    x, y = torch.randn(6, 4), torch.randint(0, 40, (6,))
    results = {}
    for budget in (0, None):
        module.memory_budget = budget
        state = copy.deepcopy(module.state_dict())
        xs = x.clone().requires_grad_(True)
        with GemmCounter() as counter:
            loss = module(xs, y)
            loss.backward()
        results[budget] = (loss.detach(), xs.grad, counter.gemms)
        module.load_state_dict(state)  # the same state for both runs
    assert torch.allclose(results[None][0], results[0][0], rtol=1e-6) and rel_err(results[None][1], results[0][1]) < 1e-6
    assert results[0][2] - results[None][2] == 5
