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
from marginkit.backends.common import combine_partials, target_cosine  # noqa: E402
from marginkit.backends.triton import launch, passes  # noqa: E402
from marginkit.errors import MarginKitTypeError  # noqa: E402
from marginkit.modulation import NegativeModulation, curricular, interclass_filter  # noqa: E402
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


def owned_labels(y):
    """labels_local of one shard: the label, -1 on ignored rows."""
    return torch.where(y == IGNORE, torch.full_like(y, -1), y)


def reference_rows(x, w, y, spec, scale, margins=None, normalize=True, modulation=None):
    """float64 textbook: per-row losses (0 on ignored rows), differentiable in x and w.

    modulation: (threshold (B,), quadratic, linear) applied to the non-target cosines,
    written here from its definition (cos above the row's threshold -> q·cos² + l·cos)."""
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
    if modulation is not None:
        threshold, quadratic, linear = modulation
        above = cos > threshold.double()[:, None]
        cos = torch.where(above, quadratic * cos * cos + linear * cos, cos)
    logits = torch.where(onehot, scale * psi[:, None], scale * cos)
    losses = torch.logsumexp(logits, dim=1) - scale * psi
    return torch.where(owned, losses, torch.zeros_like(losses))


def triton_rows(x, w, y, spec, scale, margins=None, normalize=True, deterministic=False, modulation=None):
    labels_local = owned_labels(y)
    cos = target_cosine(x, w, labels_local, normalize)
    psi, dpsi = spec.target_terms(cos, margins)
    if modulation is not None:
        modulation = NegativeModulation(*modulation)
    return tb.row_losses(
        x, w, labels_local, psi, dpsi, scale, normalize, modulation=modulation, deterministic=deterministic
    )


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
    ref = run(reference_rows, x, w, y, spec, scale, margins, normalize, modulation=kwargs.get("modulation"))
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
    assert launch.dot_precision(torch.float32) == ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert launch.dot_precision(torch.float32) == "tf32"
        assert launch.dot_precision(torch.bfloat16) == "ieee"
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
    labels = owned_labels(y)
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
        gx_only, no_gw = tb.grads_from_lse(x, w, labels, lse, grad_rows, scale, True, need_weight_grad=False)
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
    assert no_gw is None and torch.equal(gx_only, gx)  # no dW GEMM, the same dX
    assert rel(lse_sharded, lse) < 1e-6
    assert rel(shard_grads[0][0] + shard_grads[1][0], gx) < 1e-5
    assert rel(torch.cat([shard_grads[0][1], shard_grads[1][1]]), gw) < 1e-5


def test_row_without_non_target_class():
    """C = 1: the only class is the target; partials are (−inf, 0) and the loss is 0."""
    x, w, y = make(B=3, C=1, D=8)
    m, s = tb.lse_partials(x, w, owned_labels(y), 64.0, True)
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
    labels = owned_labels(y)
    psi, dpsi = mk.ArcFace(0.5).target_terms(target_cosine(x, w, labels, True))
    x.requires_grad_(True)
    w.requires_grad_(True)
    for n_stored in (0, 20):  # the memory-budget mode's store: none, or every class
        args = (x, w, labels, psi, dpsi, 16.0, True, False, n_stored)
        torch.library.opcheck(torch.ops.marginkit.triton_margin_ce_rows.default, args)
        _, losses, lse, x_inv, w_inv, stored, tile_max = torch.ops.marginkit.triton_margin_ce_rows(
            x.detach(), w.detach(), *args[2:]
        )
        assert stored.shape == (3, n_stored) and tile_max.shape == (3, (n_stored + 31) // 32)
        bwd_args = (x.detach(), w.detach(), labels, dpsi, losses, lse, x_inv, w_inv, stored, tile_max,
                    torch.ones(3, device=x.device), 16.0, True, True, True)
        torch.library.opcheck(torch.ops.marginkit.triton_margin_ce_rows_backward.default, bwd_args)
        no_dw = bwd_args[:-1] + (False,)  # a frozen weight: no dW
        torch.library.opcheck(torch.ops.marginkit.triton_margin_ce_rows_backward.default, no_dw)
        modulation = (psi.float(), 1.0, 0.3)  # a negative modulation: threshold, quadratic, linear
        torch.library.opcheck(torch.ops.marginkit.triton_margin_ce_rows.default, args + modulation)
        torch.library.opcheck(torch.ops.marginkit.triton_margin_ce_rows_backward.default, bwd_args + modulation)


def test_opcheck_target_rows():
    x, w, y = make(B=5, C=20, D=8, seed=16, ignored=1)
    margins = torch.full((5,), 0.3)
    for normalize in (True, False):
        for row_margins, slot in ((None, 0), (margins, 2)):  # ArcFace's form, with and without per-row margins
            args = (x, w, y, row_margins, -100, normalize, 0.5, 0.0, True, 1, slot, False, True)
            torch.library.opcheck(torch.ops.marginkit.triton_target_rows.default, args)


def test_frozen_weight_skips_the_weight_gradient(monkeypatch):
    """IR-Softmax's centers and frozen heads: the backward runs no dW GEMM, and dX is unchanged."""
    from marginkit.backends.triton import ops as triton_ops

    x, w, y = make(B=5, C=40, D=8, seed=15, ignored=1)
    xa = x.clone().requires_grad_(True)
    mk.margin_cross_entropy(xa, w.clone().requires_grad_(True), y, mk.ArcFace(0.5), 16.0, backend="triton").backward()
    seen, real = [], triton_ops.backward
    monkeypatch.setattr(triton_ops, "backward", lambda *a, **k: seen.append(k["need_weight_grad"]) or real(*a, **k))
    xb = x.clone().requires_grad_(True)
    mk.margin_cross_entropy(xb, w, y, mk.ArcFace(0.5), 16.0, backend="triton").backward()
    assert seen == [False]
    assert torch.equal(xb.grad, xa.grad)


@pytest.mark.parametrize("memory_budget", [0, None], ids=["bounded", "store-all"])
def test_torch_compile_fullgraph(memory_budget):
    """A small model using the op compiles with fullgraph=True (aot_eager keeps the CPU test fast;
    on CUDA the default inductor backend treats the op as an opaque kernel the same way), with
    and without the memory-budget mode's stored logits among the op's outputs."""
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
            local = owned_labels(labels)
            psi, dpsi = self.spec.target_terms(target_cosine(emb, self.weight, local, True))
            return tb.row_losses(emb, self.weight, local, psi, dpsi, 32.0, True, memory_budget=memory_budget).mean()

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
    labels = owned_labels(y)
    spec, scale = mk.ArcFace(0.5), 64.0
    psi, dpsi = spec.target_terms(target_cosine(x, w, labels, True))
    x.requires_grad_(True)
    w.requires_grad_(True)
    losses = tb.row_losses(x, w, labels, psi, dpsi, scale, True)  # warm-up + autotune
    losses.mean().backward()
    x.grad = w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    losses = tb.row_losses(x, w, labels, psi, dpsi, scale, True)
    losses.mean().backward()
    torch.cuda.synchronize()
    grads_bytes = x.grad.numel() * 2 + w.grad.numel() * 2
    extra = torch.cuda.max_memory_allocated() - base - grads_bytes
    assert extra <= 64 * 2**20 + C * 4, f"peak extra {extra / 2**20:.1f} MiB"  # + w_inv (C floats, saved)
    with torch.no_grad():
        ref = torch_chunked.row_losses(x, w, labels, psi, dpsi, scale, True)
    assert rel(losses, ref) < 1e-3
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@gpu
@pytest.mark.gpu
def test_gpu_direct_launch_matches_the_autotuner_path():
    """CPU twin: test_later_launches_of_a_tuning_key_skip_the_autotuner. The autotuner's pick
    launched directly, and through the cached CompiledKernel handles, computes what the
    autotuner's own launch computes."""
    x, w, y = make(B=512, C=30011, D=256, dtype=torch.bfloat16, seed=22, ignored=5)
    with tb.tuning(direct_launch=False):
        via_autotuner = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0)
    with tb.tuning(compiled_launch=False):
        via_jit = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0)  # direct, records the handles
    assert passes.SCORES.picked and passes.DX.picked and passes.DW.picked  # the first launches recorded their picks
    run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0)  # the first compiled launch records the handles ...
    assert passes.SCORES.handles and passes.DX.handles and passes.DW.handles
    direct = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0)  # ... and this one launches through them
    for other in (via_autotuner, via_jit):
        assert torch.equal(direct[0], other[0])  # forward: same kernels and tiles, no atomics
        for a, b in zip(direct[1:], other[1:]):
            assert rel(a, b) < 1e-3  # dX's split-K adds with atomics, in any order


@gpu
@pytest.mark.gpu
def test_gpu_dw_prefetch_variant_gives_the_plain_bits(monkeypatch):
    """CPU twin: test_dw_prefetch_variant_gives_the_same_bits. Deterministic mode launches the first dW
    config that fits: pinned to one M128 N128 tile with PREFETCH, then without."""
    import triton

    x, w, y = make(B=256, C=20011, D=256, dtype=torch.bfloat16, seed=23, ignored=4)
    out = {}
    for prefetch in (False, True):
        meta = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, **({"PREFETCH": True} if prefetch else {}))
        monkeypatch.setitem(passes.DW.configs, "mma", [triton.Config(meta, num_warps=8, num_stages=3)])
        monkeypatch.setattr(passes.DW, "pinned_configs", {})
        out[prefetch] = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0, deterministic=True)
        assert [bool(c.kwargs.get("PREFETCH")) for c in passes.DW.pinned_configs.values()] == [prefetch]
    assert all(torch.equal(a, b) for a, b in zip(out[False], out[True]))


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


# ------------------------------------------------------------------------------------------
# The negative modulation (CurricularFace, inter-class filtering, any quadratic)
# ------------------------------------------------------------------------------------------
def hard_negative_inputs(seed=43):
    """Inputs where many non-target cosines exceed the row's ArcFace(0.8) target logit."""
    x, w, y = make(B=7, C=150, D=24, seed=seed, ignored=1)
    psi, _ = mk.ArcFace(0.8).target_terms(target_cosine(x, w, owned_labels(y), True))
    cos = F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).T
    assert int((cos > psi[:, None]).sum()) > 20  # the modulation has work to do
    return x, w, y, psi


@pytest.mark.parametrize(
    "quadratic,linear", [(1.0, 0.0), (1.0, 0.4), (-0.6, 1.3), (0.0, 0.0)],
    ids=["curricular-t0", "curricular-t0.4", "any-quadratic", "filter-to-zero"],
)
def test_modulation_matches_float64_reference(quadratic, linear):
    """N(cos) = q·cos² + l·cos above the row's threshold (ψ here), in the loss and both gradients."""
    x, w, y, psi = hard_negative_inputs()
    with tb.tuning(**SMALL):
        assert_close_to_reference(x, w, y, mk.ArcFace(0.8), scale=16.0, modulation=(psi.float(), quadratic, linear))


@pytest.mark.parametrize("t", [0.0, 0.4])
def test_curricular_modulation_matches_the_torch_backend(t):
    """The kernels' modulation equals the torch backend's ``NegativeModulation.apply``."""
    x, w, y, psi = hard_negative_inputs()
    labels = owned_labels(y)
    _, dpsi = mk.ArcFace(0.8).target_terms(target_cosine(x, w, labels, True))
    modulation = curricular(psi, t)

    def rows(backend):
        return lambda x, w, y: backend.row_losses(x, w, labels, psi, dpsi, 16.0, True, modulation=modulation)

    with tb.tuning(**SMALL):
        ours = run(rows(tb), x, w, y)
    theirs = run(rows(torch_chunked), x, w, y)
    for name, a, b in zip(("loss", "dX", "dW"), ours, theirs):
        assert rel(a, b) < 1e-5, name


def test_interclass_filter_on_labelled_rows_only():
    """insightface's inter-class filtering: non-target cosines above 0.2 count as 0 on labelled
    rows; the ignored row keeps +inf (untouched, and takes no part anyway)."""
    x, w, y = make(B=9, C=120, D=16, seed=44, ignored=2)
    x[2:5] = w[:3] * 3.0 + 0.5 * w[3:6]  # rows close to two classes: their negatives exceed 0.2
    filt = interclass_filter(y != IGNORE, 0.2, torch.float32)
    assert torch.isinf(filt.threshold[:2]).all()
    with tb.tuning(**SMALL):
        (loss, *_), _ = assert_close_to_reference(
            x, w, y, mk.ArcFace(0.5), modulation=(filt.threshold, filt.quadratic, filt.linear)
        )
    plain = run(reference_rows, x, w, y, mk.ArcFace(0.5), 64.0)[0]
    assert rel(loss, plain) > 1e-3  # the filter changed the losses


# ------------------------------------------------------------------------------------------
# fp32 master weights, float64, deterministic without the global flag
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_master_weights(dtype):
    """fp16/bf16 embeddings with a float32 weight: computed in the embeddings' dtype (W tiles cast
    in registers), weight.grad float32, embeddings.grad in their dtype; as accurate as the
    explicit cast of W, and equal to it up to the rounding of W itself."""
    x, w32, y = make(B=12, C=200, D=40, seed=45, ignored=1)
    x = x.to(dtype)
    spec = mk.ArcFace(0.5)
    with tb.tuning(**SMALL):
        master = run(triton_rows, x, w32, y, spec, 64.0)
        cast = run(triton_rows, x, w32.to(dtype), y, spec, 64.0)
    ref = run(reference_rows, x, w32, y, spec, 64.0)
    assert master[1].dtype == dtype and master[2].dtype == torch.float32
    # (loss, dX, dW); bf16 measured 2.1e-4, 4.3e-3, 3.6e-3 against the reference (1.2e-3, 9.7e-3 and
    # 5.9e-3 while the interpreter truncated its bf16 casts: these floors catch that bias)
    floors = (1e-3, 8e-3, 8e-3) if dtype == torch.bfloat16 else (2e-4, 2e-3, 2e-3)
    for name, a, b, r, floor in zip(("loss", "dX", "dW"), master, cast, ref, floors):
        assert rel(a, r) <= rel(b, r) + floor / 4, name  # no worse than casting W first
        assert rel(a, r) < floor, (name, rel(a, r))
        assert rel(a, b) < floor, (name, rel(a, b))


@pytest.mark.parametrize("modulated", [False, True], ids=["plain", "modulated"])
def test_bf16_column_sums_on_the_tensor_cores_are_as_accurate_as_the_row_reduction(modulated):
    """The scores kernel's per-class Σ_i dS_ij·cos_ij for bf16 (COLSUM_MMA: terms rounded to bf16, as E
    itself is, then summed in fp32 by one tensor-core product) against the row reduction of fp32 terms
    (tuning(colsum_mma=False)) and float64: dW, the only output they enter, no less accurate."""
    x, w, y = make(B=40, C=300, D=48, seed=48, ignored=2)
    x, w = x.bfloat16(), w.bfloat16()
    spec = mk.ArcFace(0.5)
    kw = {}
    if modulated:  # a threshold below most cosines: the quadratic branch on many columns
        kw["modulation"] = (torch.full((40,), -0.2, device=DEVICE), 1.0, 0.3)
    with tb.tuning(**SMALL):
        mma = run(triton_rows, x, w, y, spec, 64.0, **kw)
        with tb.tuning(colsum_mma=False):
            rows = run(triton_rows, x, w, y, spec, 64.0, **kw)
    ref = run(reference_rows, x, w, y, spec, 64.0, modulation=kw.get("modulation"))
    assert torch.equal(mma[0], rows[0]) and torch.equal(mma[1], rows[1])  # loss and dX do not use them
    assert rel(mma[2], rows[2]) > 0  # the two paths differ (by the terms' bf16 rounding) ...
    assert rel(mma[2], ref[2]) < 1.1 * rel(rows[2], ref[2]) + 1e-4  # ... no more than the bf16 pipeline's own error
    assert rel(mma[2], ref[2]) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dw_prefetch_variant_gives_the_same_bits(monkeypatch, dtype):
    """The dW kernel's PREFETCH autotune variant (the projection's W tile and column sums loaded before
    the K loop) computes exactly what the plain one does, and both match float64."""
    if not launch.INTERPRETED:
        pytest.skip("the interpreter's fixed config is the variant switch; on a GPU the autotuner picks")
    from marginkit.backends.triton.configs import INTERPRETER_META

    x, w, y = make(B=20, C=150, D=40, seed=49, ignored=2, dtype=dtype)
    out = {}
    for prefetch in (False, True):
        monkeypatch.setitem(INTERPRETER_META["dw"], "PREFETCH", prefetch)
        with tb.tuning(**SMALL):
            out[prefetch] = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0)
    assert all(torch.equal(a, b) for a, b in zip(out[False], out[True]))
    ref = run(reference_rows, x, w, y, mk.ArcFace(0.5), 64.0)
    assert rel(out[True][2], ref[2]) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_fp32_master_weights_two_phase_api():
    x, w32, y = make(B=10, C=90, D=24, seed=46)
    x = x.to(torch.bfloat16)
    labels = owned_labels(y)
    with tb.tuning(**SMALL):
        row_max, row_sumexp = tb.lse_partials(x, w32, labels, 32.0, True)
        cast_max, cast_sumexp = tb.lse_partials(x, w32.bfloat16(), labels, 32.0, True)
        _, lse = combine_partials(row_max, row_sumexp, torch.zeros(10, dtype=torch.float64), 32.0)
        gx, gw = tb.grads_from_lse(x, w32, labels, lse, torch.ones(10), 32.0, True)
    assert gw.dtype == torch.float32 and gx.dtype == torch.float32
    assert rel(row_max, cast_max) < 1e-2 and rel(row_sumexp, cast_sumexp) < 2e-2


def test_rejected_dtype_pairs_name_both_dtypes():
    x, w, y = make(B=2, C=5, D=8)
    for emb, weight in ((x, w.double()), (x.bfloat16(), w.half()), (x, w.bfloat16())):
        with pytest.raises(MarginKitTypeError, match="weight dtype"):
            tb.lse_partials(emb, weight, owned_labels(y), 64.0, True)
    with pytest.raises(MarginKitTypeError, match="int64"):
        tb.lse_partials(x.long(), w, owned_labels(y), 64.0, True)


def test_float64_inputs_are_computed_in_float32():
    """Documented: float64 in, float64 losses out, float32 accuracy (the torch backend computes float64)."""
    x, w, y = make(B=8, C=60, D=16, seed=47, ignored=1, dtype=torch.float64)
    with tb.tuning(**SMALL):
        out = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0)
    ref = run(reference_rows, x, w, y, mk.ArcFace(0.5), 64.0)
    assert out[0].dtype == out[1].dtype == out[2].dtype == torch.float64
    errs = [rel(o, r) for o, r in zip(out, ref)]
    assert all(e < 1e-5 for e in errs), errs


def test_deterministic_mode_leaves_torchs_global_flag_alone(monkeypatch):
    """deterministic=True never calls torch.use_deterministic_algorithms (other threads would see
    it, and a user's own setting made meanwhile would be lost), and gives the same bits."""
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append(a))
    x, w, y = make(B=10, C=100, D=24, seed=48)
    y[3:7] = y[2]  # several rows of one class: the target share of dW sums duplicates
    with tb.tuning(class_splits=2, chunk_classes=64, dx_splits=2):
        a = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0, deterministic=True)
        b = run(triton_rows, x, w, y, mk.ArcFace(0.5), 64.0, deterministic=True)
    assert calls == [] and not torch.are_deterministic_algorithms_enabled()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


# ------------------------------------------------------------------------------------------
# The log2-unit epilogues: large scales, far-negative logits, partial tiles
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modulated", [False, True], ids=["plain", "modulated"])
def test_large_scale_far_negative_logits_and_partial_tiles(modulated):
    """Logits are kept as z = logit·log2(e) and exponentiated with exp2; padded columns get −inf
    through an additive bias and dead rows an lse of +inf. At scale 150 a row pointing away from
    every class has lse ≈ −150 + ln C, where exp(z − lse) of a padded column (z = 0) would be
    inf: nothing may leak from such columns or from ignored rows (C = 70: partial last tiles)."""
    x, w, y = make(B=9, C=70, D=12, seed=47, ignored=2)
    w[:, 0] = w[:, 0].abs() + 2.0  # every class leans along e_0 ...
    x[3] = 0.0
    x[3, 0] = -40.0  # ... so row 3's cosines are all negative: its max logit < 0 in every split
    x[4] = -w[y[4]] * 5.0  # the target itself far away: cos_y = -1
    spec = mk.CosFace(0.2)
    cos = F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).T
    assert float(cos[3].max()) < -0.5
    modulation = None
    if modulated:
        psi, _ = spec.target_terms(target_cosine(x, w, owned_labels(y), True))
        modulation = (psi.float(), 0.5, 0.7)
    with tb.tuning(**SMALL):
        out, _ = assert_close_to_reference(x, w, y, spec, scale=150.0, modulation=modulation)
    assert all(torch.isfinite(t).all() for t in out)


def test_rows_without_gradient_ignore_their_lse():
    """grads_from_lse: rows with grad_rows = 0 contribute nothing whatever lse they carry (the
    scores kernel gives them lse = +inf, so a garbage lse cannot make exp2 overflow into 0·inf)."""
    x, w, y = make(B=8, C=100, D=16, seed=48)
    labels = owned_labels(y)
    row_max, row_sumexp = tb.lse_partials(x, w, labels, 64.0, True)
    lse = (row_max + row_sumexp.log()).double()
    grad_rows = torch.ones(8)
    grad_rows[[1, 5]] = 0.0
    with tb.tuning(**SMALL):
        sane = tb.grads_from_lse(x, w, labels, lse, grad_rows, 64.0, True)
        garbage = lse.clone()
        garbage[1], garbage[5] = -1e4, float("nan")
        odd = tb.grads_from_lse(x, w, labels, garbage, grad_rows, 64.0, True)
    for a, b in zip(sane, odd):
        assert torch.isfinite(b).all() and torch.equal(a, b)
