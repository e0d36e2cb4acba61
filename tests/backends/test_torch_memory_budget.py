"""The torch backend's memory-budget mode (``memory_budget``): the forward keeps the exponentials
of as many leading class chunks as the budget holds, and the backward skips those chunks' logits
GEMM. Every accuracy test runs the settings that matter (None: every chunk kept; a budget that
holds only some chunks) against the float64 reference, and checks which path ran by counting
GEMMs (each stored chunk saves exactly one)."""

import pytest
import torch

import marginkit as mk
from marginkit.backends import common, torch_chunked
from marginkit.bench.memory import LiveTensorBytes
from marginkit.modulation import NegativeModulation, curricular
from tests.helpers import SPECS, GemmCounter, loss_and_grads, make_inputs, rel_err, spec_id

B, C, D = 9, 61, 8
#: 2^8 elements per chunk at B + D = 17: 15 classes, so C = 61 is 5 chunks (4 of 15, one of 1).
CHUNK_ELEMENTS = 256
CHUNK_CLASSES = CHUNK_ELEMENTS // (B + D)
NUM_CHUNKS = -(-C // CHUNK_CLASSES)


def budget_for(chunks, element_size=4, rows=B, sub_centers=1):
    """Bytes of exactly the first ``chunks`` whole chunks."""
    return chunks * torch_chunked.stored_chunk_bytes(rows, CHUNK_CLASSES, element_size, sub_centers)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", CHUNK_ELEMENTS)


def public_step(x, w, y, spec, budget, **kwargs):
    """(loss, grad x, grad w, GEMMs run) of the public call on the torch backend."""
    with GemmCounter() as counter:
        out = loss_and_grads(mk.margin_cross_entropy, x, w, y, spec, 32.0, backend="torch", memory_budget=budget,
                             **kwargs)
    return (*out, counter.gemms)


def gemms_with(stored_chunks, chunk_classes=CHUNK_CLASSES, sub_centers=1):
    """Forward: one GEMM per chunk (and the target column's with sub-centers); backward: dX and dW
    per chunk, plus the recompute of unstored ones."""
    chunks = -(-C // chunk_classes)
    return 4 * chunks - stored_chunks + (sub_centers > 1)


def assert_matches_reference(out, ref, tol):
    for name, o, r in zip(("loss", "grad embeddings", "grad weight"), out, ref):
        assert torch.isfinite(o).all(), name
        assert rel_err(o, r) < tol, f"{name}: rel err {rel_err(o, r):.2e}"


@pytest.mark.parametrize("stored", [NUM_CHUNKS, 2], ids=["all-chunks", "two-chunks"])
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_every_spec_matches_the_float64_reference(spec, stored, small_chunks):
    x, w, y = make_inputs(B, C, D, ignored=2, seed=1)
    budget = None if stored == NUM_CHUNKS else budget_for(stored) + 100  # two chunks and change
    *out, gemms = public_step(x, w, y, spec, budget)
    assert gemms == gemms_with(stored)
    assert_matches_reference(out, loss_and_grads(mk.reference.margin_cross_entropy, x, w, y, spec, 32.0), 1e-5)


@pytest.mark.parametrize("margins", ["class_margins", "sample_margins"])
def test_class_and_sample_margins_in_float64(margins, small_chunks):
    """float64 inputs: the stored path is the recompute path's maths to rounding (1e-12)."""
    x, w, y = make_inputs(B, C, D, dtype=torch.float64, ignored=1, seed=2)
    size = C if margins == "class_margins" else B
    values = torch.linspace(0.1, 0.6, size, dtype=torch.float64)
    kwargs = {margins: values}
    spec = mk.ArcFace(0.5)
    ref = loss_and_grads(mk.reference.margin_cross_entropy, x, w, y, spec, 32.0, **kwargs)
    for budget, stored in ((None, NUM_CHUNKS), (budget_for(3, element_size=8), 3)):
        *out, gemms = public_step(x, w, y, spec, budget, **kwargs)
        assert gemms == gemms_with(stored)
        assert_matches_reference(out, ref, 1e-12)


@pytest.mark.parametrize("kind", ["curricular", "interclass-filter"])
def test_a_negative_modulation_is_folded_into_the_stored_chunks(kind, small_chunks):
    """dN/dcos multiplies the kept exponentials once, in the forward: the gradients equal the recompute path's."""
    x, w, _ = make_inputs(B, C, D, seed=3)
    labels = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(3))
    labels[0] = -1
    if kind == "curricular":  # thresholds low enough that many negatives are modulated
        modulation = curricular(torch.full((B,), -0.1), 0.3)
    else:
        modulation = NegativeModulation(torch.where(labels >= 0, 0.05, float("inf")), 0.0, 0.0)

    def rows(budget):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        psi, dpsi = mk.ArcFace(0.5).target_terms(common.target_cosine(xs, ws, labels, True), None)
        with GemmCounter() as counter:
            losses = torch_chunked.row_losses(xs, ws, labels, psi, dpsi, 32.0, True, modulation=modulation,
                                              memory_budget=budget)
            weights = torch.linspace(0.5, 1.5, B)
            grads = torch.autograd.grad((losses * weights).sum(), (xs, ws))
        return (losses.detach(), *grads), counter.gemms

    recompute, _ = rows(0)
    for budget, stored in ((None, NUM_CHUNKS), (budget_for(2), 2)):
        got, gemms = rows(budget)
        assert gemms == gemms_with(stored)
        for name, a, b in zip(("losses", "grad x", "grad w"), got, recompute):
            assert rel_err(a, b) < 1e-6, f"{name} (budget {budget}): {rel_err(a, b):.2e}"


def test_sub_centers_keep_their_winners(small_chunks):
    """Sub-center ArcFace (the torch backend's own territory on CUDA): the stored chunks keep each
    class's winning sub-center, so the routed gradients equal the recompute path's; and one row
    equals ArcFace on its winning sub-centers through the float64 reference."""
    k = 3
    x, w, y = make_inputs(B, C * k, D, seed=4)
    y = y % C
    head = mk.SubCenterArcFace(C, D, k=k, margin=mk.ArcFace(0.5), scale=32.0)
    with torch.no_grad():
        head.weight.copy_(w)

    def grads(rows, budget):
        head.memory_budget = budget
        head.zero_grad()
        xs = x[:rows].clone().requires_grad_(True)
        head(xs, y[:rows]).backward()
        return xs.grad, head.weight.grad.clone()

    recompute = grads(B, 0)
    classes = CHUNK_ELEMENTS // ((B + D) * k)  # 5 classes (15 weight rows) a chunk: 13 chunks
    two_chunks = 2 * torch_chunked.stored_chunk_bytes(B, classes, 4, k)
    for budget, stored in ((None, -(-C // classes)), (two_chunks, 2)):
        with GemmCounter() as counter:
            got = grads(B, budget)
        assert counter.gemms == gemms_with(0, classes, k) - stored
        for name, a, b in zip(("grad x", "grad w"), got, recompute):
            assert rel_err(a, b) < 1e-6, f"{name} (budget {budget}): {rel_err(a, b):.2e}"
    unit = torch.nn.functional.normalize
    winners = (unit(x[:1].double(), dim=1) @ unit(w.double(), dim=1).T).view(C, k).argmax(dim=1)
    w_winners = w.double().view(C, k, D)[torch.arange(C), winners]
    ref = loss_and_grads(mk.reference.margin_cross_entropy, x[:1].double(), w_winners, y[:1], mk.ArcFace(0.5), 32.0)
    assert rel_err(grads(1, None)[0], ref[1]) < 1e-5


def test_which_chunks_are_kept_follows_the_budget():
    """Whole chunks from the first on; a chunk that does not fit ends the store (no gaps)."""
    x, w, y = make_inputs(B, C, D, seed=5)
    one = torch_chunked.stored_chunk_bytes(B, CHUNK_CLASSES, 4, 1)
    assert one == B * (CHUNK_CLASSES + 1) * 4
    for budget, chunks in ((0, 0), (one - 1, 0), (one, 1), (3 * one + 5, 3), (None, NUM_CHUNKS)):
        store = []
        torch_chunked.lse_partials(x, w, y, 32.0, True, chunk_elements=CHUNK_ELEMENTS, memory_budget=budget,
                                   store=store)
        assert len(store) == 2 * chunks, budget
        assert [t.shape for t in store[:2]] == ([(B, CHUNK_CLASSES), (B,)] if chunks else [])


def test_peak_extra_memory_follows_the_budget(small_chunks):
    """What the loss holds from forward to backward: exactly the kept chunks on top of the default."""
    x, w, y = make_inputs(B, C, D, seed=6)

    def peak(budget):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        tracker = LiveTensorBytes(exclude=[xs, ws, y])
        with tracker:
            mk.margin_cross_entropy(xs, ws, y, backend="torch", memory_budget=budget).backward()
        return tracker.peak

    default = peak(0)
    kept_all = NUM_CHUNKS * B * 4 + C * B * 4  # every shift and every exponential
    assert kept_all - 64 <= peak(None) - default <= kept_all + 1024
    two = budget_for(2)
    assert two - 64 <= peak(two) - default <= two + 1024


def test_nothing_is_kept_when_no_backward_will_run(small_chunks):
    """Inference (no_grad) and frozen inputs keep nothing, whatever the budget."""
    x, w, y = make_inputs(B, C, D, seed=9)

    def peak(budget, grad_enabled, requires_grad):
        xs, ws = x.clone().requires_grad_(requires_grad), w.clone().requires_grad_(requires_grad)
        tracker = LiveTensorBytes(exclude=[xs, ws, y])
        with tracker, torch.set_grad_enabled(grad_enabled):
            mk.margin_cross_entropy(xs, ws, y, backend="torch", memory_budget=budget)
        return tracker.peak

    for grad_enabled, requires_grad in ((False, True), (True, False)):
        assert peak(None, grad_enabled, requires_grad) == peak(0, grad_enabled, requires_grad)
    assert peak(None, True, True) > peak(0, True, True)  # the store, when a backward will run


def test_a_second_backward_reuses_the_untouched_store(small_chunks):
    x, w, y = make_inputs(B, C, D, seed=7)
    x.requires_grad_(True)
    w.requires_grad_(True)
    loss = mk.margin_cross_entropy(x, w, y, backend="torch", memory_budget=None)
    first = torch.autograd.grad(loss, (x, w), retain_graph=True)
    second = torch.autograd.grad(loss, (x, w))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_the_partitioned_head_reuses_the_untouched_store_on_every_backward(small_chunks):
    """Through a retained graph the torch backend's store serves the second and third backward too
    (they recomputed every chunk's logits: Triton's store is overwritten, torch's only read)."""
    x, w, y = make_inputs(B, C, D, seed=7)
    head = mk.PartitionedMarginSoftmax(C, D, mk.ArcFace(0.5), 32.0, backend="torch", memory_budget=None)
    head.load_full_state_dict({"weight": w})
    xl = x.clone().requires_grad_(True)
    loss = head(xl, y)
    grads = []
    for retain in (True, True, False):
        with GemmCounter() as counter:
            grads.append(torch.autograd.grad(loss, (xl, head.weight), retain_graph=retain))
        assert counter.gemms == 2 * NUM_CHUNKS  # dX and dW per chunk, no recompute
    assert all(torch.equal(a, b) for g in grads[1:] for a, b in zip(grads[0], g))
    _, r_gx, r_gw = loss_and_grads(mk.reference.margin_cross_entropy, x.double(), w.double(), y, mk.ArcFace(0.5), 32.0)
    assert rel_err(grads[0][0], r_gx) < 1e-5 and rel_err(grads[0][1], r_gw) < 1e-5


@pytest.mark.parametrize("budget", [0, None], ids=["recompute", "stored"])
@pytest.mark.parametrize("chunk_elements", [None, 5], ids=["dense", "one-class-chunks"])
def test_a_row_with_no_other_class_gets_zero_gradients_at_a_large_scale(budget, chunk_elements):
    """One class (the target): no other class, so loss and gradients are exactly 0. A stored or
    dense chunk turns exp(logit − shift) into p with exp(shift − lse); with shift 0 and
    lse = s·ψ ≈ −260 that factor overflowed to inf, and 0·inf made every gradient NaN."""
    x, w, _ = make_inputs(5, 1, D, seed=8)
    x = -w.expand(5, D).clone()  # cos θ_y = −1: ψ = −1.35, the target logit −270 at s = 200
    labels = torch.zeros(5, dtype=torch.long)
    psi, dpsi = mk.CosFace(0.35).target_terms(common.target_cosine(x, w, labels, True), None)
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    losses = torch_chunked.row_losses(xs, ws, labels, psi, dpsi, 200.0, True, chunk_elements=chunk_elements,
                                      memory_budget=budget)
    grads = torch.autograd.grad(losses.sum(), (xs, ws))
    assert all(torch.equal(t, torch.zeros_like(t)) for t in (losses.detach(), *grads))
