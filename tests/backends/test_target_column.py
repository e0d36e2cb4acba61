"""The Triton backend's fused target column (``backends/triton/target_column.py``) against its
torch twins: ``common.target_cosine`` + ``MarginSpec.target_terms`` in the forward,
``common.apply_target_gradients`` + the chain rule of x̂ in the backward, ``common.combine_partials``
for the merge's COMBINE. Everything compared in float64 (interpreter, tiny sizes).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

import marginkit as mk  # noqa: E402
from marginkit.backends.common import (  # noqa: E402
    apply_target_gradients,
    combine_partials,
    target_cosine,
    target_gradient,
)
from marginkit.backends.triton import passes  # noqa: E402
from marginkit.backends.triton.target_column import apply_target_column, target_rows  # noqa: E402
from tests.helpers import SPECS, rel_err, spec_id, with_gradient  # noqa: E402

IGNORE = -100
#: The kernels run on CUDA where there is one, else under the interpreter (the CPU twin).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda_twin  # benchmarks/gpu_run.sh runs this module on the GPU too
#: Every spec with an additive-angle form, in both gradient modes (insightface's ArcFace port too).
FUSED_SPECS = [s for s in SPECS if s.angle_form() is not None] + [
    mk.CombinedMargin(1.0, 0.3, 0.2),
    mk.CosFace(0.35, gradient="straight_through"),
    mk.insightface_margin((1.0, 0.5, 0.0)),
    mk.ArcFace(2.9),  # most rows past π − m: the fallback branch
]


def inputs(B=12, C=9, D=20, dtype=torch.float64, seed=0):
    """Rows at every angle: aligned with their class (cos ≈ 1), opposite (cos ≈ −1), exactly on it, random."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 2.0
    x[1] = w[y[1]] * 3.0  # θ = 0 exactly
    x[2] = -w[y[2]] * 0.5  # θ = π
    x[3] = w[y[3]] + 1e-3 * torch.randn(D, generator=g, dtype=torch.float64)
    y[0] = IGNORE
    y[4] = y[5]  # a class with several rows (the backward's groups)
    y[6] = y[5]
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype), y.to(DEVICE)


def torch_terms(spec, x, w, labels_local, row_margins, normalize=True):
    cos = target_cosine(x, w, labels_local, normalize)
    psi, dpsi = spec.target_terms(cos, row_margins)
    owned = labels_local >= 0
    return torch.where(owned, psi, 0.0), torch.where(owned, dpsi, 0.0), cos


@pytest.mark.parametrize("spec", FUSED_SPECS, ids=spec_id)
@pytest.mark.parametrize("normalize", [True, False])
def test_terms_equal_the_spec_in_float64(spec, normalize):
    x, w, y = inputs()
    if not normalize:
        x, w = x / x.norm(dim=1, keepdim=True), w / w.norm(dim=1, keepdim=True)
    labels_local, psi, dpsi, cos, flag = target_rows(x, w, y, IGNORE, spec.angle_form(), None, normalize, True)
    assert torch.equal(labels_local, torch.where(y == IGNORE, -1, y))
    assert flag.tolist() == [IGNORE, IGNORE]
    ref_psi, ref_dpsi, ref_cos = torch_terms(spec, x, w, labels_local, None, normalize)
    assert (cos - ref_cos).abs().max() < 1e-14
    assert (psi - ref_psi).abs().max() < 1e-12
    # dψ = sin(θ + m)/sin θ reaches ~1e3 at the clamp (θ ≈ 4.5e-4): relative there
    assert ((dpsi - ref_dpsi).abs() / ref_dpsi.abs().clamp_min(1.0)).max() < 1e-9


@pytest.mark.parametrize("spec, want", [
    (mk.ArcFace(0.5), [-1.0 - 0.5 * math.sin(0.5), -1.0 - 0.5 * math.sin(0.5)]),
    (mk.ArcFace(0.5, easy_margin=True), [-1.0, -1.0]),
    # (λ·cos θ_y + ψ)/(1 + λ): only ψ's arccos sees the clamp
    (mk.SphereFace(4.0, lambda_=1.0), [(-1.0 - math.cos(4.0 * math.acos(-1.0 + 1e-7)) - 6.0) / 2.0] * 2),  # k = 3
], ids=lambda v: spec_id(v) if isinstance(v, mk.MarginSpec) else "")
def test_fallbacks_take_the_target_cosine_unclamped(spec, want):
    """API.md clamps cos θ_y only before an arccos or a derivative: at θ_y = π ArcFace's fallback is
    −1 − m·sin m, not (−1 + 1e-7) − m·sin m (it was, on every path)."""
    x = torch.tensor([[-2.0, 0.0], [-0.5, 0.0]], dtype=torch.float64, device=DEVICE)
    w = torch.eye(2, dtype=torch.float64, device=DEVICE)
    y = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    want = torch.tensor(want, dtype=torch.float64, device=DEVICE)
    cos = target_cosine(x, w, y, True)
    assert torch.equal(cos, torch.full_like(cos, -1.0))
    assert (spec.target_terms(cos)[0] - want).abs().max() < 1e-15
    assert (spec.psi(cos) - want).abs().max() < 1e-15
    if spec.angle_form() is not None:
        psi = target_rows(x, w, y, IGNORE, spec.angle_form(), None, True, False)[1]
        assert (psi - want).abs().max() < 1e-15
    loss = mk.reference.margin_cross_entropy(x, w, y, spec, 2.0, reduction="none")
    assert (loss - torch.nn.functional.softplus(2.0 * (0.0 - want))).abs().max() < 1e-14


@pytest.mark.parametrize("spec", [mk.ArcFace(0.5), mk.CosFace(0.35), mk.CombinedMargin(1.0, 0.3, 0.1)], ids=spec_id)
def test_per_row_margins_replace_the_spec_margin(spec):
    x, w, y = inputs(seed=1)
    margins = torch.linspace(0.0, 3.0, y.numel(), dtype=torch.float64, device=DEVICE)  # crosses ArcFace's fallback
    labels_local, psi, dpsi, cos, _ = target_rows(x, w, y, IGNORE, spec.angle_form(), margins, True, False)
    ref_psi, ref_dpsi, _ = torch_terms(spec, x, w, labels_local, margins)
    assert (psi - ref_psi).abs().max() < 1e-12
    assert ((dpsi - ref_dpsi).abs() / ref_dpsi.abs().clamp_min(1.0)).max() < 1e-9


def test_specs_that_need_the_angle_itself_have_no_fused_form():
    assert mk.SphereFace(4.0).angle_form() is None
    assert mk.CombinedMargin(1.2, 0.3, 0.1).angle_form() is None
    assert mk.AdaFaceMargin(0.4).angle_form() is None


def test_out_of_range_labels_are_left_out_and_flagged_on_the_device():
    x, w, y = inputs(B=40, C=9, dtype=torch.float32)
    y[7], y[21], y[33] = 9, -3, 12  # past C, negative, past C (rows in different programs)
    labels_local, psi, dpsi, cos, flag = target_rows(x, w, y, IGNORE, mk.ArcFace(0.5).angle_form(), None, True, True)
    assert flag.tolist() == [IGNORE, 12]  # (min, max) over ignore_index and the bad labels
    for row in (0, 7, 21, 33):
        assert labels_local[row] == -1 and psi[row] == 0 and dpsi[row] == 0 and cos[row] == 0
    good = torch.ones(40, dtype=torch.bool, device=DEVICE)
    good[[0, 7, 21, 33]] = False
    assert torch.equal(labels_local[good], y[good])


def test_merge_combine_equals_the_float64_softplus_even_for_tiny_losses():
    """loss = softplus(max + log Σexp − s·ψ) from the fp32 partials: within their precision (1e-6
    relative) of float64 math, and never rounded to 0 where it is ~1e-20."""
    g = torch.Generator().manual_seed(3)
    rows = 300  # several merge programs
    part_max = torch.randn(2, rows, generator=g).mul(3.0)  # log2 units
    part_sum = torch.rand(2, rows, generator=g).add(0.5)
    part_max[:, 5] = float("-inf")  # a row with no other class
    part_sum[:, 5] = 0.0
    psi = torch.rand(rows, generator=g, dtype=torch.float64) * 2 - 1
    psi[10:20] = 1.0 + torch.arange(10, dtype=torch.float64) * 0.1  # well-classified: tiny losses
    labels = torch.randint(0, 5, (rows,), generator=g)
    labels[7] = -1
    scale = 30.0
    part_max, part_sum, psi, labels = (t.to(DEVICE) for t in (part_max, part_sum, psi, labels))
    losses, lse = (torch.empty(rows, dtype=torch.float64, device=DEVICE) for _ in range(2))
    out = torch.empty(rows, device=DEVICE)
    passes.MERGE((math.ceil(rows / passes.MERGE_BLOCK_ROWS),), part_max, part_sum, psi, psi, psi, labels, losses, out,
                 lse, rows, 2, scale, BLOCK=passes.MERGE_BLOCK_ROWS, COMBINE=True, pinned=True)
    pm, ps = part_max.double(), part_sum.double()
    top = pm.max(dim=0).values
    row_sum = (ps * torch.exp2(pm - torch.where(top.isinf(), 0.0, top))).sum(dim=0)
    ref_losses, ref_lse = combine_partials(top * math.log(2.0), row_sum, psi, scale)
    ref_losses = torch.where(labels >= 0, ref_losses, 0.0)
    assert ref_losses[10:20].max() < 1e-10 and ref_losses[10:20].min() > 0
    ok = ref_losses > 0
    assert ((losses - ref_losses).abs()[ok] / ref_losses[ok]).max() < 1e-6
    assert losses[7] == 0 and losses[5] == 0 and torch.equal(out, losses.float())
    assert ((lse - ref_lse).abs() / ref_lse.abs().clamp_min(1.0)).max() < 1e-6


def torch_backward(grad_raw, kappa, grad_w, x, w, labels_local, losses, dpsi, grad_rows, scale, normalize, out_dtype):
    """The unfused path: 1/κ and the chain rule of x̂ in fp32 (passes.backward), then the float64 share."""
    grad_x = grad_raw / kappa
    if normalize:  # G carries 1/‖x‖ already (the kernels scale by it): only the radial part goes
        x_unit = x.float() / x.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        grad_x = grad_x - x_unit * (x_unit * grad_x).sum(dim=1, keepdim=True)
    target_grad = target_gradient(losses, dpsi, grad_rows, scale)
    return apply_target_gradients(grad_x, grad_w, x, w, labels_local, target_grad, normalize, out_dtype)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float32)], ids=["f64", "f32", "bf16+master"])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_backward_share_equals_the_torch_path(normalize, dtypes, weight_grad):
    x_dtype, w_dtype = dtypes
    x, w, y = inputs(B=14, C=9, D=40, seed=4)
    x, w = x.to(x_dtype), w.to(w_dtype)
    labels_local = torch.where(y == IGNORE, -1, y)
    g = torch.Generator().manual_seed(5)
    grad_raw = (torch.randn(x.shape, generator=g) * 4.0).to(DEVICE)
    kappa = torch.tensor([4.0], device=DEVICE)
    losses = torch.rand(14, generator=g, dtype=torch.float64) * 3.0
    losses[3] = 1e-12  # p_y − 1 = expm1(−1e-12): relative precision needs expm1
    dpsi = torch.rand(14, generator=g, dtype=torch.float64) * 50.0
    losses, dpsi = losses.to(DEVICE), dpsi.to(DEVICE)
    grad_rows = torch.where(labels_local >= 0, torch.rand(14, generator=g).to(DEVICE), 0.0)
    start_w = torch.randn(w.shape, generator=g).to(DEVICE, w_dtype)
    ours_w, ref_w = (start_w.clone(), start_w.clone()) if weight_grad else (None, None)
    args = (x, w, labels_local, losses, dpsi, grad_rows, 16.0, normalize, x_dtype)
    ours = apply_target_column(grad_raw, kappa, ours_w, *args)
    ref = torch_backward(grad_raw, kappa, ref_w, *args)
    tol = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 1e-2}[x_dtype]  # the unfused chain rule is fp32
    assert ours.dtype == x_dtype and rel_err(ours, ref) < tol
    if weight_grad:
        assert ours_w.dtype == w_dtype
        assert rel_err(ours_w - start_w, ref_w - start_w) < 1e-6
        absent = [c for c in range(w.shape[0]) if not bool((labels_local == c).any())]
        assert absent and all(torch.equal(ours_w[c], start_w[c]) for c in absent)  # untouched classes stay


def test_backward_share_is_bitwise_reproducible():
    x, w, y = inputs(B=14, C=4, D=24, dtype=torch.float32, seed=6)  # 4 classes: large groups
    labels_local = torch.where(y == IGNORE, -1, y)
    g = torch.Generator().manual_seed(7)
    grad_raw, losses = torch.randn(x.shape, generator=g), torch.rand(14, generator=g, dtype=torch.float64)
    dpsi, grad_rows = torch.rand(14, generator=g, dtype=torch.float64), torch.rand(14, generator=g)
    grad_raw, losses, dpsi, grad_rows = (t.to(DEVICE) for t in (grad_raw, losses, dpsi, grad_rows))
    runs = []
    for _ in range(2):
        dw = torch.zeros_like(w)
        dx = apply_target_column(grad_raw, torch.ones(1, device=DEVICE), dw, x, w, labels_local, losses, dpsi, grad_rows, 8.0, True,
                                 torch.float32)
        runs.append((dx, dw))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("spec", [mk.ArcFace(0.5), with_gradient(mk.CosFace(0.35), "straight_through")], ids=spec_id)
def test_the_pipeline_takes_the_fused_path_and_matches_the_reference(spec, monkeypatch):
    """mk.margin_cross_entropy on the Triton backend launches the fused kernel (and not the torch
    target terms), and its loss and gradients match the float64 reference."""
    from marginkit import _pipeline

    calls = []
    monkeypatch.setattr(_pipeline, "target_terms", lambda *a, **k: calls.append(a))
    x, w, y = inputs(B=10, C=40, D=16, dtype=torch.float32, seed=8)
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(xs, ws, y, spec, 16.0, backend="triton")
    loss.backward()
    assert calls == []
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = mk.reference.margin_cross_entropy(xr, wr, y, spec, 16.0)
    ref.backward()
    assert abs(float(loss.detach()) - float(ref.detach())) / float(ref.detach()) < 1e-6
    assert rel_err(xs.grad, xr.grad) < 1e-5 and rel_err(ws.grad, wr.grad) < 1e-5


def test_strided_labels_and_margins_are_read_as_the_values_they_hold():
    """A column of a (B, 2) label tensor, a column of per-row margins: the fused path equals the torch one."""
    x, w, y = inputs(B=10, C=40, D=16, dtype=torch.float32, seed=9)
    labels = torch.stack([torch.zeros_like(y), y], dim=1)[:, 1]
    margins = torch.stack([torch.full((10,), 3.0), torch.linspace(0.1, 0.6, 10)], dim=1).to(DEVICE)[:, 1]
    assert labels.stride(0) == 2 and margins.stride(0) == 2
    got = [mk.margin_cross_entropy(x, w, labels, mk.ArcFace(0.5), 16.0, sample_margins=margins, backend=b,
                                   reduction="none") for b in ("triton", "torch")]
    assert rel_err(got[0], got[1]) < 1e-6


class ShiftedArcFace(mk.ArcFace):
    """A user's variant: ArcFace's ψ lowered by 0.2 (its own target_terms, not ArcFace's fused form)."""

    def target_terms(self, cos, m=None):
        psi, dpsi = super().target_terms(cos, m)
        return psi - 0.2, dpsi


def test_a_subclass_that_changes_the_formula_is_not_fused():
    spec = ShiftedArcFace(0.5)
    assert spec.angle_form() is None and mk.ArcFace(0.5).angle_form() is not None
    x, w, y = inputs(B=10, C=40, D=16, dtype=torch.float32, seed=10)
    got = [mk.margin_cross_entropy(x, w, y, spec, 16.0, backend=b) for b in ("triton", "torch")]
    assert abs(float(got[0]) - float(got[1])) < 1e-5 * abs(float(got[1]))


def test_the_target_terms_are_constants_for_autograd():
    x, w, y = inputs(B=8, C=9, D=8, dtype=torch.float32, seed=11)
    x.requires_grad_(True)
    outputs = target_rows(x, w, y, IGNORE, mk.ArcFace(0.5).angle_form(), None, True, False)
    assert not any(t.requires_grad for t in outputs)


def test_a_bad_label_is_reported_before_a_bad_margin_as_on_the_unfused_path(monkeypatch):
    """The deferred checks (the CUDA path, run here on the CPU): with a bad label and a bad class margin
    in one batch, both paths raise the label's error first."""
    from marginkit import _pipeline

    monkeypatch.setattr(_pipeline, "DEFERRED_LABEL_CHECK_DEVICES", (DEVICE,))
    x, w, y = inputs(B=8, C=9, D=8, dtype=torch.float32, seed=12)
    y[2] = 9  # out of range
    class_margins = torch.full((9,), 0.3, device=DEVICE)
    class_margins[int(y[4])] = float("nan")
    messages = []
    for backend in ("triton", "torch"):
        _pipeline._pending.clear()
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 16.0, class_margins=class_margins, backend=backend)
        with pytest.raises(ValueError) as raised:
            mk.functional.check_pending_labels(wait=True)
        messages.append(str(raised.value))
    assert "labels contains 9" in messages[0] and messages[0] == messages[1]


def test_margin_cross_entropy_on_triton_traces_under_torch_compile():
    """fullgraph: the fused target terms, the row-loss op and the reduction in one graph (aot_eager)."""
    x, w, y = inputs(B=8, C=40, D=16, dtype=torch.float32, seed=13)
    spec = mk.ArcFace(0.5)  # built outside: torch 2.11's dynamo cannot inline a dataclass with kw_only fields

    def step(x, w):
        return mk.margin_cross_entropy(x, w, y, spec, 16.0, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    compiled(xs, ws).backward()
    step(xe, we).backward()
    assert torch.allclose(xs.grad, xe.grad, rtol=1e-6, atol=1e-7) and torch.allclose(ws.grad, we.grad, rtol=1e-6, atol=1e-7)
