"""The Triton backend (marginkit.backends.triton) against a float64 oracle.

On a machine without CUDA every test runs the kernels under TRITON_INTERPRET=1 (set
here defensively before anything imports triton; tests/conftest.py does the same), so
sizes stay tiny. GPU tests are skipped without CUDA; each names its CPU twin.

The oracle is written here from the formula: float64, materialised logits, torch
autograd, with the spec's ``differentiable_target`` for the target column.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import marginkit as mk  # noqa: E402
from marginkit.backends import torch_chunked  # noqa: E402
from marginkit.backends import triton as tb  # noqa: E402
from marginkit.backends.common import combine_partials, owned_labels, target_cosine  # noqa: E402
from tests.helpers import SPECS, spec_id  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CPU twin runs under TRITON_INTERPRET=1)")

IGNORE = -100
# Small chunks and splits so that tiny problems still cross every boundary:
# several forward class splits, several backward chunks (last one partial), split-K of dX.
SMALL = dict(class_splits=3, chunk_classes=64, dx_splits=2)


def rel(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def make(B, C, D, dtype=torch.float32, seed=0, ignored=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g) * 3.0
    w = torch.randn(C, D, generator=g) * 0.5
    # make a few targets well aligned (large cos θ_y: the margins' interesting branches)
    y = torch.randint(0, C, (B,), generator=g)
    if B > 2:
        x[: B // 3] = w[y[: B // 3]] * 4.0 + 0.3 * torch.randn(B // 3, D, generator=g)
    y[:ignored] = IGNORE
    return x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype), y.to(device)


def reference_rows(x, w, y, spec, scale, margins=None, normalize=True):
    """float64 textbook: per-row losses (0 on ignored rows), differentiable in x and w."""
    x64, w64 = x.double(), w.double()
    if normalize:
        x64, w64 = F.normalize(x64, dim=1), F.normalize(w64, dim=1)
    cos = x64 @ w64.T
    owned = y != IGNORE
    safe = torch.where(owned, y, torch.zeros_like(y))
    cos_y = cos.gather(1, safe[:, None])[:, 0]
    m = None if margins is None else margins.double()
    psi = spec.differentiable_target(cos_y, m)
    onehot = F.one_hot(safe, w.shape[0]).bool() & owned[:, None]
    logits = torch.where(onehot, scale * psi[:, None], scale * cos)
    losses = torch.logsumexp(logits, dim=1) - scale * psi
    return torch.where(owned, losses, torch.zeros_like(losses))


def triton_rows(x, w, y, spec, scale, margins=None, normalize=True, deterministic=False):
    labels_local = owned_labels(y, IGNORE)
    cos = target_cosine(x, w, labels_local, normalize)
    psi, dpsi = spec.target_terms(cos, margins)
    return tb.row_losses(x, w, y, psi, dpsi, scale, IGNORE, normalize, deterministic=deterministic)


def run(fn, x, w, y, *args, grad_seed=1, **kwargs):
    """(losses, dX, dW) of Σ_i g_i·loss_i with random per-row weights g (checks grad_rows scaling)."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    losses = fn(x, w, y, *args, **kwargs)
    g = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(grad_seed)).to(losses.device, losses.dtype)
    gx, gw = torch.autograd.grad((losses * g).sum(), (x, w))
    return losses.detach(), gx, gw


def assert_close_to_reference(x, w, y, spec, scale=64.0, margins=None, normalize=True, tol=1e-5, **kwargs):
    out = run(triton_rows, x, w, y, spec, scale, margins, normalize, **kwargs)
    ref = run(reference_rows, x, w, y, spec, scale, margins, normalize)
    assert out[0].dtype == torch.float32
    assert out[1].dtype == x.dtype and out[2].dtype == w.dtype
    errs = [rel(o, r) for o, r in zip(out, ref)]
    assert all(e < tol for e in errs), f"relative errors (loss, dX, dW) = {errs}"
    return out, ref


# ------------------------------------------------------------------------------------------
# fp32 accuracy: every spec × gradient mode
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gradient", ["exact", "straight_through"])
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_every_spec_fp32_matches_float64_reference(spec, gradient):
    spec = dataclasses.replace(spec, gradient=gradient)
    x, w, y = make(B=12, C=150, D=40, seed=3, ignored=2)
    with tb.tuning(**SMALL):
        assert_close_to_reference(x, w, y, spec)


def test_default_launch_shapes_single_chunk():
    """The interpreter's default choices (one backward chunk, no dX split) agree too."""
    x, w, y = make(B=9, C=70, D=40, seed=4, ignored=1)
    assert_close_to_reference(x, w, y, mk.ArcFace(0.5))


@pytest.mark.parametrize(
    "spec", [mk.CosFace(0.35), mk.ArcFace(0.5), mk.CombinedMargin(1.1, 0.3, 0.05)], ids=spec_id
)
def test_per_row_margins(spec):
    """sample_margins / class_margins reach the kernels as per-row ψ and dψ."""
    x, w, y = make(B=10, C=90, D=24, seed=5, ignored=1)
    margins = torch.linspace(0.0, 0.6, 10, device=x.device)
    with tb.tuning(**SMALL):
        assert_close_to_reference(x, w, y, spec, scale=32.0, margins=margins)


def test_class_margins_through_the_public_api():
    x, w, y = make(B=8, C=40, D=16, seed=6, ignored=1)
    class_margins = torch.rand(40, generator=torch.Generator().manual_seed(0)).to(x.device) * 0.5
    margins = class_margins[torch.where(y == IGNORE, torch.zeros_like(y), y)]
    with tb.tuning(**SMALL):
        out = run(
            lambda x, w, y: mk.margin_cross_entropy(
                x, w, y, mk.ArcFace(0.5), 30.0, class_margins=class_margins, reduction="none", backend="triton"
            ),
            x, w, y,
        )
    ref = run(reference_rows, x, w, y, mk.ArcFace(0.5), 30.0, margins)
    assert all(rel(o, r) < 1e-5 for o, r in zip(out, ref))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_api_reductions(reduction):
    """mk.margin_cross_entropy(backend="triton") dispatches here; losses and grads match."""
    x, w, y = make(B=8, C=60, D=16, seed=15, ignored=2)

    def ours(x, w, y):
        return mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 64.0, reduction=reduction, backend="triton")

    def ref(x, w, y):
        rows = reference_rows(x, w, y, mk.ArcFace(0.5), 64.0)
        if reduction == "none":
            return rows
        return rows.sum() if reduction == "sum" else rows.sum() / (y != IGNORE).sum()

    with tb.tuning(**SMALL):
        out = run(lambda *a: ours(*a).reshape(-1), x, w, y)
    expected = run(lambda *a: ref(*a).reshape(-1), x, w, y)
    assert out[0].dtype == torch.float32
    assert all(rel(o, r) < 1e-5 for o, r in zip(out, expected))


def test_normalize_false():
    x, w, y = make(B=8, C=100, D=40, seed=7, ignored=1)
    x, w = F.normalize(x, dim=1), F.normalize(w, dim=1)
    with tb.tuning(**SMALL):
        assert_close_to_reference(x, w, y, mk.ArcFace(0.5), normalize=False)


@pytest.mark.parametrize(
    "B,C,D",
    [(1, 33, 40), (5, 300, 24), (3, 1, 7), (16, 97, 33)],
    ids=["B1", "C300-D24", "C1-D7", "B16-C97-D33"],
)
def test_odd_shapes(B, C, D):
    """C not a multiple of any block, D not a power of two, B = 1, C = 1."""
    x, w, y = make(B=B, C=C, D=D, seed=8)
    with tb.tuning(**SMALL):
        assert_close_to_reference(x, w, y, mk.CombinedMargin(1.2, 0.3, 0.1))


def test_non_contiguous_inputs():
    """Strided weight and embeddings (e.g. a column slice) are read through their strides."""
    x, w, y = make(B=6, C=50, D=48, seed=9)
    xs, ws = x[:, ::2], w[:, 8:40]
    assert not xs.is_contiguous() and not ws.is_contiguous()
    xs, ws = xs[:, :24], ws[:, :24]
    with tb.tuning(**SMALL):
        out = run(triton_rows, xs, ws, y, mk.ArcFace(0.5), 64.0)
    ref = run(reference_rows, xs, ws, y, mk.ArcFace(0.5), 64.0)
    assert all(rel(o, r) < 1e-5 for o, r in zip(out, ref))


# ------------------------------------------------------------------------------------------
# Empty and ignored batches
# ------------------------------------------------------------------------------------------
def test_empty_batch():
    x, w, _ = make(B=1, C=30, D=16)
    x = x[:0].clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = torch.zeros(0, dtype=torch.int64, device=x.device)
    losses = triton_rows(x, w, y, mk.ArcFace(), 64.0)
    assert losses.shape == (0,) and losses.dtype == torch.float32
    losses.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros_like(w))
    loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="triton")
    assert loss.item() == 0.0


def test_all_ignored_rows_give_zero_loss_and_zero_grads():
    x, w, y = make(B=6, C=40, D=16, ignored=6)
    x.requires_grad_(True)
    w.requires_grad_(True)
    with tb.tuning(**SMALL):
        losses = triton_rows(x, w, y, mk.ArcFace(), 64.0)
        assert torch.equal(losses, torch.zeros_like(losses))
        losses.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))
    x.grad = w.grad = None
    loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(x.grad).any() and not torch.isnan(w.grad).any()


def test_zero_embedding_row_is_finite():
    x, w, y = make(B=4, C=40, D=16)
    x[1] = 0.0
    out = run(triton_rows, x, w, y, mk.ArcFace(), 64.0)
    assert all(torch.isfinite(t).all() for t in out)


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dx_splits", [1, 3])
def test_deterministic_mode_is_bitwise_reproducible(dx_splits):
    x, w, y = make(B=12, C=200, D=40, seed=10, ignored=2)
    with tb.tuning(class_splits=3, chunk_classes=64, dx_splits=dx_splits):
        a = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0, deterministic=True)
        b = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0, deterministic=True)
        c = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0, deterministic=False)
    for t1, t2, t3 in zip(a, b, c):
        assert torch.equal(t1, t2)
        assert rel(t3, t1) < 1e-6  # the atomic split-K path sums the same terms in another order


# ------------------------------------------------------------------------------------------
# Low precision
# ------------------------------------------------------------------------------------------
def textbook_rows(x, w, y, spec, scale):
    """The same-dtype textbook PyTorch version (what users write without marginkit)."""
    xn, wn = F.normalize(x, dim=1), F.normalize(w, dim=1)
    cos = xn @ wn.T
    owned = y != IGNORE
    safe = torch.where(owned, y, torch.zeros_like(y))
    cos_y = cos.gather(1, safe[:, None])[:, 0]
    psi = spec.differentiable_target(cos_y)
    onehot = F.one_hot(safe, w.shape[0]).bool()
    logits = scale * torch.where(onehot, psi[:, None], cos)
    losses = F.cross_entropy(logits, safe, reduction="none")
    return torch.where(owned, losses, torch.zeros_like(losses)).float()


def low_precision_errors(dtype, B, C, D, spec, scale=64.0, seed=11):
    x, w, y = make(B=B, C=C, D=D, dtype=dtype, seed=seed, ignored=1)
    ref = run(reference_rows, x, w, y, spec, scale)  # float64 truth of the rounded inputs
    ours = run(triton_rows, x, w, y, spec, scale)
    book = run(textbook_rows, x, w, y, spec, scale)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    assert all(torch.isfinite(t).all() for t in ours)
    return [rel(o, r) for o, r in zip(ours, ref)], [rel(b, r) for b, r in zip(book, ref)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_twice_textbook_error(dtype):
    """CPU twin of test_gpu_low_precision_within_twice_textbook_error."""
    with tb.tuning(**SMALL):
        ours, book = low_precision_errors(dtype, B=12, C=200, D=40, spec=mk.ArcFace(0.5))
    floor = 8e-3 if dtype == torch.bfloat16 else 1e-3  # one rounding of the returned gradients
    for name, o, b in zip(("loss", "dX", "dW"), ours, book):
        assert o <= 2 * b + floor, f"{name}: ours {o:.3g} vs textbook {b:.3g}"


def test_fp16_small_gradients_survive():
    """fp16 workspace range: with a mean over ~10^4 rows (g = 1e-4) and large-norm inputs,
    dS·x_inv·w_inv is ~1e-6 and would sit in fp16's subnormals (22 % error on dW when
    tried); the power-of-two κ scale keeps it normal."""
    x, w, y = make(B=8, C=200, D=32, dtype=torch.float16, seed=12)
    x, w = x * 10, w * 20

    def weight_grad(fn):
        wl = w.detach().clone().requires_grad_(True)
        (fn(x, wl, y, mk.CosFace(0.35), 16.0).sum() * 1e-4).backward()
        return wl.grad

    with tb.tuning(**SMALL):
        ours = weight_grad(triton_rows)
    ref, book = weight_grad(reference_rows), weight_grad(textbook_rows)
    assert rel(ours, ref) < 1e-2 and rel(ours, ref) < rel(book, ref), (rel(ours, ref), rel(book, ref))


def test_tf32_flag_is_followed():
    assert tb._dot_precision(torch.float32) == ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert tb._dot_precision(torch.float32) == "tf32"
        assert tb._dot_precision(torch.bfloat16) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# ------------------------------------------------------------------------------------------
# Two-phase API (the distributed layer's contract)
# ------------------------------------------------------------------------------------------
def test_two_phase_api_matches_torch_backend_and_shards_combine():
    """Contract v3: non-target partials and gradients, equal to the torch backend's, and
    two class shards (local labels, partials merged by hand) equal to one."""
    x, w, y = make(B=10, C=130, D=40, seed=13, ignored=2)
    scale = 64.0
    labels = owned_labels(y, IGNORE)
    psi, _ = mk.ArcFace(0.5).target_terms(target_cosine(x, w, labels, True))
    grad_rows = torch.where(labels >= 0, torch.rand(10, generator=torch.Generator().manual_seed(0)), 0.0)
    rm, rs = torch_chunked.lse_partials(x, w, labels, scale, True)
    _, ref_lse = combine_partials(rm, rs, psi, scale)
    rgx, rgw = torch_chunked.grads_from_lse(x, w, labels, ref_lse, grad_rows, scale, True)
    with tb.tuning(**SMALL):
        m1, s1 = tb.lse_partials(x, w, labels, scale, True)
        _, lse = combine_partials(m1, s1, psi, scale)
        gx, gw = tb.grads_from_lse(x, w, labels, lse, grad_rows, scale, True)
        gx_det, gw_det = tb.grads_from_lse(x, w, labels, lse, grad_rows, scale, True, deterministic=True)
        cut = 70
        shards = []
        for lo, hi in ((0, cut), (cut, 130)):
            local = torch.where((labels >= lo) & (labels < hi), labels - lo, torch.full_like(labels, -1))
            shards.append((local, lo, hi, tb.lse_partials(x, w[lo:hi], local, scale, True)))
        row_max = torch.maximum(shards[0][3][0], shards[1][3][0])
        sumexp = sum(s * torch.exp(m - row_max) for *_, (m, s) in shards)
        _, lse_sharded = combine_partials(row_max, sumexp, psi, scale)
        shard_grads = [
            tb.grads_from_lse(x, w[lo:hi], local, lse_sharded, grad_rows, scale, True) for local, lo, hi, _ in shards
        ]
    assert m1.dtype == s1.dtype == gx.dtype == torch.float32 and gw.dtype == w.dtype
    assert rel(m1, rm) < 1e-6 and rel(s1, rs) < 1e-5
    assert rel(gx, rgx) < 1e-5 and rel(gw, rgw) < 1e-5
    assert rel(gx_det, gx) < 1e-6 and rel(gw_det, gw) < 1e-6
    assert rel(lse_sharded, lse) < 1e-6
    assert rel(shard_grads[0][0] + shard_grads[1][0], gx) < 1e-5
    assert rel(torch.cat([shard_grads[0][1], shard_grads[1][1]]), gw) < 1e-5


def test_row_without_non_target_class():
    """C = 1: the only class is the target; partials are (−inf, 0) and the loss is 0."""
    x, w, y = make(B=3, C=1, D=8)
    m, s = tb.lse_partials(x, w, y, 64.0, True)
    assert torch.equal(m, torch.full_like(m, float("-inf"))) and torch.equal(s, torch.zeros_like(s))
    out = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0)
    assert all(torch.isfinite(t).all() for t in out) and torch.equal(out[0], torch.zeros_like(out[0]))


def test_rejects_mismatched_dtypes():
    x, w, y = make(B=2, C=5, D=8)
    with pytest.raises((TypeError, ValueError)):
        tb.lse_partials(x, w.double(), y, 64.0, True)


# ------------------------------------------------------------------------------------------
# torch.library registration and torch.compile
# ------------------------------------------------------------------------------------------
def test_opcheck():
    x, w, y = make(B=3, C=20, D=8, seed=14, ignored=1)
    labels = owned_labels(y, IGNORE)
    psi, dpsi = mk.ArcFace(0.5).target_terms(target_cosine(x, w, labels, True))
    x.requires_grad_(True)
    w.requires_grad_(True)
    args = (x, w, labels, psi, dpsi, 16.0, True, False)
    torch.library.opcheck(torch.ops.marginkit.triton_margin_ce_rows.default, args)
    losses, lse, w_inv = torch.ops.marginkit.triton_margin_ce_rows(x.detach(), w.detach(), *args[2:])
    bwd_args = (x.detach(), w.detach(), labels, dpsi, losses, lse, w_inv, torch.ones(3, device=x.device),
                16.0, True, True)
    torch.library.opcheck(torch.ops.marginkit.triton_margin_ce_rows_backward.default, bwd_args)
    hook = (psi.float(), 0.3)  # CurricularFace's negative hook
    torch.library.opcheck(torch.ops.marginkit.triton_margin_ce_rows.default, args + hook)
    torch.library.opcheck(torch.ops.marginkit.triton_margin_ce_rows_backward.default, bwd_args + hook)


def test_torch_compile_fullgraph():
    """A small model using the op compiles with fullgraph=True (aot_eager keeps the CPU test fast;
    on CUDA the default inductor backend treats the op as an opaque kernel the same way)."""
    torch._dynamo.reset()
    D_in, D, C = 12, 16, 40

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D_in, D)
            self.weight = torch.nn.Parameter(torch.randn(C, D) * 0.5)
            self.spec = mk.ArcFace(0.5)

        def forward(self, feats, labels):
            emb = self.proj(feats)
            local = owned_labels(labels, IGNORE)
            psi, dpsi = self.spec.target_terms(target_cosine(emb, self.weight, local, True))
            return tb.row_losses(emb, self.weight, labels, psi, dpsi, 32.0, IGNORE, True).mean()

    torch.manual_seed(0)
    model = Model().to(DEVICE)
    feats = torch.randn(6, D_in, device=DEVICE)
    labels = torch.randint(0, C, (6,), device=DEVICE)
    labels[0] = IGNORE
    eager = model(feats, labels)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if not CUDA else "inductor")
    loss = compiled(feats, labels)
    loss.backward()
    assert rel(loss, eager) < 1e-6
    for p, g in zip(model.parameters(), eager_grads):
        assert rel(p.grad, g) < 1e-5


# ------------------------------------------------------------------------------------------
# GPU (skipped without CUDA; CPU twins named in each docstring)
# ------------------------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("spec", [mk.ArcFace(0.5), mk.SphereFace(4.0), mk.CombinedMargin(1.2, 0.3, 0.1)], ids=spec_id)
def test_gpu_fp32_matches_float64_reference(spec):
    """CPU twin: test_every_spec_fp32_matches_float64_reference (autotuned launch shapes here)."""
    x, w, y = make(B=300, C=5003, D=200, seed=20, ignored=30)
    assert_close_to_reference(x, w, y, spec)
    assert_close_to_reference(x, w, y, spec, deterministic=True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_low_precision_within_twice_textbook_error(dtype):
    """CPU twin: test_low_precision_within_twice_textbook_error."""
    ours, book = low_precision_errors(dtype, B=512, C=20011, D=256, spec=mk.ArcFace(0.5))
    floor = 8e-3 if dtype == torch.bfloat16 else 1e-3
    for name, o, b in zip(("loss", "dX", "dW"), ours, book):
        assert o <= 2 * b + floor, f"{name}: ours {o:.3g} vs textbook {b:.3g}"


@gpu
@pytest.mark.gpu
def test_gpu_deterministic_bitwise():
    """CPU twin: test_deterministic_mode_is_bitwise_reproducible."""
    x, w, y = make(B=256, C=40000, D=128, dtype=torch.bfloat16, seed=21)
    a = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0, deterministic=True)
    b = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0, deterministic=True)
    assert all(torch.equal(t1, t2) for t1, t2 in zip(a, b))


@gpu
@pytest.mark.gpu
def test_gpu_four_million_classes():
    """C = 4M, B = 1024, D = 512 bf16: agrees with the torch backend, bounded extra memory.
    CPU twin: test_two_phase_api_matches_torch_backend_and_shards_combine."""
    B, C, D = 1024, 4_000_000, 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(C, D, device="cuda", generator=gen) * 0.5).bfloat16()
    y = torch.randint(0, C, (B,), device="cuda", generator=gen)
    labels = owned_labels(y, IGNORE)
    spec, scale = mk.ArcFace(0.5), 64.0
    psi, dpsi = spec.target_terms(target_cosine(x, w, labels, True))
    x.requires_grad_(True)
    w.requires_grad_(True)
    losses = tb.row_losses(x, w, y, psi, dpsi, scale, IGNORE, True)  # warm-up + autotune
    losses.mean().backward()
    x.grad = w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    losses = tb.row_losses(x, w, y, psi, dpsi, scale, IGNORE, True)
    losses.mean().backward()
    torch.cuda.synchronize()
    grads_bytes = x.grad.numel() * 2 + w.grad.numel() * 2
    extra = torch.cuda.max_memory_allocated() - base - grads_bytes
    assert extra <= 64 * 2**20 + C * 4, f"peak extra {extra / 2**20:.1f} MiB"  # + w_inv (C floats, saved)
    with torch.no_grad():
        ref = torch_chunked.row_losses(x, w, y, psi, dpsi, scale, IGNORE, True)
    assert rel(losses, ref) < 1e-3
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@gpu
@pytest.mark.gpu
def test_gpu_direct_launch_matches_the_autotuner_path():
    """CPU twin: test_later_launches_of_a_tuning_key_skip_the_autotuner. The autotuner's pick
    launched directly computes what the autotuner's own launch computes."""
    x, w, y = make(B=512, C=30011, D=256, dtype=torch.bfloat16, seed=22, ignored=5)
    with tb.tuning(direct_launch=False):
        via_autotuner = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0)
    assert tb._SCORES.picked and tb._DX.picked and tb._DW.picked  # the first launches recorded their picks
    direct = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0)
    assert torch.equal(direct[0], via_autotuner[0])  # forward: same kernels and tiles, no atomics
    for a, b in zip(direct[1:], via_autotuner[1:]):
        assert rel(a, b) < 1e-3  # dX's split-K adds with atomics, in any order


def test_public_deterministic_flag_reaches_the_kernels():
    """mk.margin_cross_entropy(..., deterministic=True) on the Triton backend: same bits twice."""
    x, w, y = make(6, 150, 24, seed=41, ignored=1)

    def run():
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with tb.tuning(**SMALL):
            loss = mk.margin_cross_entropy(xr, wr, y, mk.ArcFace(), 64.0, backend="triton", deterministic=True)
        loss.backward()
        return loss.detach(), xr.grad, wr.grad

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref = mk.reference.margin_cross_entropy(x, w, y, mk.ArcFace(), 64.0)
    assert rel(first[0], ref) < 1e-5


@pytest.mark.parametrize("t", [0.0, 0.4])
def test_curricular_hook_matches_the_torch_backend(t):
    """CurricularFace's hard-negative hook in the kernels equals the torch backend's (which
    tests/test_adaptive.py checks against the paper's formula in float64)."""
    from marginkit.nn.curricular_face import curricular_cross_entropy

    # Small scale weight rows and a large margin: many negatives are harder than the target.
    x, w, y = make(B=7, C=150, D=24, seed=43, ignored=1)
    spec = mk.ArcFace(0.8)
    psi, _ = spec.target_terms(target_cosine(x, w, owned_labels(y, IGNORE), True))
    cos = F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).T
    assert int((cos > psi[:, None]).sum()) > 20  # the hook has work to do

    def run(backend):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with tb.tuning(**SMALL):
            loss = curricular_cross_entropy(xr, wr, y, t, spec, 16.0, backend=backend)
        loss.backward()
        return loss.detach(), xr.grad, wr.grad

    for name, a, b in zip(("loss", "dX", "dW"), run("triton"), run("torch")):
        assert rel(a, b) < 1e-5, name


# ------------------------------------------------------------------------------------------
# Launch configs (the autotuner's candidate lists; pure Python, no kernel runs)
# ------------------------------------------------------------------------------------------
def _fwd_args(dtype, B=1024, D=512):
    x = torch.empty(B, D, dtype=dtype)
    return dict(zip(tb.lse_partials_kernel.arg_names, [x])) | {"B": B, "D": D}


def _tiles(configs):
    return [(c.num_warps, c.num_stages, c.kwargs["BLOCK_B"], c.kwargs["BLOCK_C"], c.kwargs["BLOCK_K"]) for c in configs]


def test_configs_whose_pipeline_exceeds_shared_memory_are_pruned(monkeypatch):
    """fp32 tiles take twice bf16's shared memory: on a 227 KiB device (H100/H200) four of the six
    forward configs cannot launch (Triton reports 263168 B and more for them when compiled for
    sm_90), so the autotuner must not spend a compile on each."""
    monkeypatch.setattr(tb, "_shared_memory_limit", lambda t: 232448)
    kept_fp32 = _tiles(tb._FWD.prune(tb.FWD_CONFIGS, _fwd_args(torch.float32)))
    assert kept_fp32 == [(8, 3, 128, 128, 64), (4, 4, 64, 128, 64)]  # 3·256·64·4 and 4·192·64·4 = 196608 B
    assert len(tb._FWD.prune(tb.FWD_CONFIGS, _fwd_args(torch.bfloat16))) == len(tb.FWD_CONFIGS)
    monkeypatch.setattr(tb, "_shared_memory_limit", lambda t: None)  # off CUDA: shape limits only
    assert len(tb._FWD.prune(tb.FWD_CONFIGS, _fwd_args(torch.float32))) == len(tb.FWD_CONFIGS)


def test_fp32_without_tf32_uses_the_fma_tile_set():
    x32, x16 = torch.empty(4, 4), torch.empty(4, 4, dtype=torch.bfloat16)
    assert tb._Launcher.uses_fma((x32,), dict(DOT_PRECISION="ieee"))
    assert not tb._Launcher.uses_fma((x32,), dict(DOT_PRECISION="tf32"))
    assert not tb._Launcher.uses_fma((x16,), dict(DOT_PRECISION="ieee"))
    for launcher in (tb._FWD, tb._SCORES, tb._DX, tb._DW):
        assert max(c.kwargs["BLOCK_K"] for c in launcher.configs[True]) == 32  # small K: FMA dot, fast ptxas


def test_pow2_at_least_matches_tritons_next_power_of_2():
    import triton

    for n in [*range(0, 300), 1023, 1024, 1025, 2**20 - 1, 2**20, 2**20 + 1]:
        assert tb._pow2_at_least(n) == max(16, triton.next_power_of_2(max(n, 1)))
        assert tb._pow2_at_least(n, 64) == max(64, triton.next_power_of_2(max(n, 1)))


def test_later_launches_of_a_tuning_key_skip_the_autotuner():
    """First launch per key: Triton's autotuner; then its pick, launched directly with the
    same arguments and the pick's meta-parameters (the GPU-only path, with fakes here)."""
    calls = []
    pick = tb.SCORES_CONFIGS[2]

    class FakeAutotuner:
        best_config = None

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append(("autotuner", kwargs["HOOK"]))
                self.best_config = pick
            return run

    class FakeKernel:
        arg_names = tb.scores_kernel.arg_names

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("direct", grid, kwargs))

    launcher = tb._Launcher(tb.scores_kernel, tb.SCORES_CONFIGS, tb.FMA_SCORES_CONFIGS,
                            key=["D", "B_BUCKET", "HOOK", "NORMALIZE"], interp_meta={}, tiles=("BLOCK_B", "BLOCK_C", "BLOCK_K"))
    launcher.fn, launcher.tuned = FakeKernel(), {False: FakeAutotuner(), True: FakeAutotuner()}
    x = torch.empty(4, 8, dtype=torch.bfloat16)
    n_positional = tb.scores_kernel.arg_names.index("B_BUCKET") + 1
    args = [x] + [0] * (n_positional - 1)
    args[tb.scores_kernel.arg_names.index("D")] = 512

    def launch(hook, **over):
        with tb.tuning(**over):
            launcher(lambda meta: (1, 1000 // meta["BLOCK_C"]), *args, HOOK=hook, NORMALIZE=True,
                     BLOCK_B=128, DOT_PRECISION="ieee", UPCAST=False)

    launch(False)
    launch(False)
    launch(True)  # another key: the autotuner again
    launch(False, direct_launch=False)
    assert [c[0] for c in calls] == ["autotuner", "direct", "autotuner", "autotuner"]
    _, grid, meta = calls[1]
    assert grid == (1, 1000 // pick.kwargs["BLOCK_C"])
    assert meta["num_warps"] == pick.num_warps and meta["num_stages"] == pick.num_stages
    assert meta["BLOCK_C"] == pick.kwargs["BLOCK_C"] and meta["HOOK"] is False
