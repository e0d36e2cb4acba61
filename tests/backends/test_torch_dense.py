"""The torch backend's dense path (every class in one chunk: the forward's logits kept for the
backward) against the chunked path it replaces and the float64 reference."""

import pytest
import torch

import marginkit as mk
from marginkit.backends import common, torch_chunked
from marginkit.modulation import NegativeModulation, curricular
from tests.helpers import (
    GRADIENT_MODES, SPECS, GemmCounter, loss_and_grads, make_inputs, rel_err, spec_id, with_gradient,
)

#: A budget of 5 elements: one class per chunk at any B, D, so the chunked path runs.
CHUNKED = 5


def rows_losses_and_grads(x, w, labels_local, spec, scale=32.0, chunk_elements=None, modulation=None, normalize=True):
    """(losses, grad x, grad w) of Σ row losses · varied row weights through torch_chunked.row_losses."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    cos = common.target_cosine(x, w, labels_local, normalize)
    psi, dpsi = spec.target_terms(cos, None)
    losses = torch_chunked.row_losses(
        x, w, labels_local, psi, dpsi, scale, normalize, modulation=modulation, chunk_elements=chunk_elements
    )
    row_weights = torch.linspace(0.5, 1.5, x.shape[0], dtype=losses.dtype)
    gx, gw = torch.autograd.grad((losses * row_weights).sum(), (x, w))
    return losses.detach(), gx, gw


def assert_same(dense, chunked, tol=0.0):
    for name, d, c in zip(("losses", "grad embeddings", "grad weight"), dense, chunked):
        assert torch.isfinite(d).all(), name
        assert rel_err(d, c) <= tol, f"{name}: rel err {rel_err(d, c):.2e}"


def labels_with_ignored(C, B, seed=0, ignored=2):
    labels = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(seed))
    labels[:ignored] = -1
    return labels


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_dense_path_equals_the_chunked_path(spec):
    x, w, _ = make_inputs(B=12, C=50, D=16)
    labels = labels_with_ignored(50, 12)
    assert torch_chunked.dense_fits(12, 50, 16, 1)
    # The same maths; the chunked path sums its online log-sum-exp over 50 one-class chunks.
    chunked = rows_losses_and_grads(x, w, labels, spec, chunk_elements=CHUNKED)
    assert_same(rows_losses_and_grads(x, w, labels, spec), chunked, 1e-6)


@pytest.mark.parametrize("gradient", GRADIENT_MODES)
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_dense_path_matches_the_float64_reference(spec, gradient):
    x, w, y = make_inputs(B=9, C=61, D=24, ignored=2)
    spec = with_gradient(spec, gradient)
    out = loss_and_grads(mk.margin_cross_entropy, x, w, y, spec, 32.0, backend="torch")
    ref = loss_and_grads(mk.reference.margin_cross_entropy, x, w, y, spec, 32.0)
    for name, o, r in zip(("loss", "grad embeddings", "grad weight"), out, ref):
        assert rel_err(o, r) < 1e-5, f"{name}: rel err {rel_err(o, r):.2e}"


@pytest.mark.parametrize("kind", ["curricular", "interclass-filter"])
def test_dense_path_with_a_negative_modulation(kind):
    x, w, _ = make_inputs(B=10, C=40, D=8, seed=2)
    labels = labels_with_ignored(40, 10, seed=2)
    if kind == "curricular":  # thresholds low enough that many negatives are modulated
        modulation = curricular(torch.full((10,), -0.1), 0.3)
    else:
        modulation = NegativeModulation(torch.where(labels >= 0, 0.05, float("inf")), 0.0, 0.0)
    spec = mk.ArcFace(0.5)
    dense = rows_losses_and_grads(x, w, labels, spec, modulation=modulation)
    assert_same(dense, rows_losses_and_grads(x, w, labels, spec, modulation=modulation, chunk_elements=CHUNKED), 1e-6)
    plain = rows_losses_and_grads(x, w, labels, spec)
    assert rel_err(dense[2], plain[2]) > 1e-3  # the modulation did change the weight gradient


def test_dense_path_float64_unnormalised_and_a_single_class():
    x, w, _ = make_inputs(B=7, C=13, D=5, dtype=torch.float64, seed=4)
    labels = labels_with_ignored(13, 7, seed=4, ignored=1)
    spec = mk.CosFace(0.3)
    for normalize in (True, False):
        dense = rows_losses_and_grads(x, w, labels, spec, scale=4.0, normalize=normalize)
        chunked = rows_losses_and_grads(x, w, labels, spec, scale=4.0, normalize=normalize, chunk_elements=CHUNKED)
        assert_same(dense, chunked, 1e-13)
    # One class: no other class, so every loss and every gradient is exactly 0 (no NaN from −inf − −inf).
    one = rows_losses_and_grads(x, w[:1], torch.tensor([0, 0, -1, 0, 0, 0, 0]), spec)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in one)


def test_dense_path_with_fp32_master_weights_and_a_frozen_weight():
    x, w, y = make_inputs(B=8, C=30, D=16, seed=5)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    master = w.clone().requires_grad_(True)
    mk.margin_cross_entropy(xb, master, y, mk.ArcFace(0.5), 32.0, backend="torch").backward()
    assert master.grad.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    ref = loss_and_grads(mk.reference.margin_cross_entropy, xb.detach().double(), w.double(), y, mk.ArcFace(0.5), 32.0)
    assert rel_err(master.grad, ref[2]) < 2e-2 and rel_err(xb.grad, ref[1]) < 2e-2
    frozen = w.clone()
    xf = x.clone().requires_grad_(True)
    mk.margin_cross_entropy(xf, frozen, y, mk.ArcFace(0.5), 32.0, backend="torch").backward()
    assert frozen.grad is None and torch.allclose(xf.grad, loss_and_grads(
        mk.margin_cross_entropy, x, w, y, mk.ArcFace(0.5), 32.0, backend="torch")[1], rtol=0, atol=0)


@pytest.mark.parametrize("chunk_elements, gemms", [(None, 3), (1 << 30, 3), (180, 2 + 2 * 3)])
def test_dense_path_skips_the_backwards_recomputation(chunk_elements, gemms):
    """Dense: logits, dX, dW (3 GEMMs). Chunked (180 elements: 18 classes of B + D = 10, so
    2 chunks): the forward's logits per chunk, then the backward recomputes them, dX, dW."""
    x, w, _ = make_inputs(B=6, C=20, D=4, seed=6)
    labels = labels_with_ignored(20, 6, seed=6)
    with GemmCounter() as counter:
        rows_losses_and_grads(x, w, labels, mk.CosFace(), chunk_elements=chunk_elements)
    assert counter.gemms == gemms


@pytest.mark.parametrize("chunk_elements", [None, CHUNKED], ids=["dense", "chunked"])
def test_a_second_backward_through_a_retained_graph_adds_the_same_gradients(chunk_elements):
    """The backward overwrites only what it makes (the chain rule runs in place on fresh products),
    never a tensor the forward saved: a second backward gives the first's gradients again."""
    x, w, y = make_inputs(B=9, C=61, D=24, ignored=2, seed=8)
    labels = labels_with_ignored(61, 9, seed=8)
    x.requires_grad_(True)
    w.requires_grad_(True)
    cos = common.target_cosine(x, w, labels, True)
    psi, dpsi = mk.ArcFace(0.5).target_terms(cos, None)
    losses = torch_chunked.row_losses(x, w, labels, psi, dpsi, 32.0, True, chunk_elements=chunk_elements)
    losses.sum().backward(retain_graph=True)
    first = (x.grad.clone(), w.grad.clone())
    losses.sum().backward()
    assert torch.equal(x.grad, 2 * first[0]) and torch.equal(w.grad, 2 * first[1])
    ref = loss_and_grads(mk.reference.margin_cross_entropy, x.detach(), w.detach(), labels.clamp_min(-100),
                         mk.ArcFace(0.5), 32.0, reduction="sum", ignore_index=-1)
    assert rel_err(first[0], ref[1]) < 1e-5 and rel_err(first[1], ref[2]) < 1e-5


def test_chunks_are_gpu_sized_on_cuda_and_cpu_sized_elsewhere():
    """B = 1024, D = 512 at C = 1M: 92 chunks of 10 922 classes on CUDA (each chunk costs ~20 ops of
    host time), 733 of 1365 on the CPU; a caller's chunk_elements wins on both."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert torch_chunked.chunk_budget(cuda) == torch_chunked.CUDA_CHUNK_ELEMENTS == 1 << 24
    assert torch_chunked.chunk_budget(cpu) == torch_chunked.CHUNK_ELEMENTS == 1 << 21
    assert torch_chunked.chunk_budget(cuda, 4096) == torch_chunked.chunk_budget(cpu, 4096) == 4096
    counts = {d: len(list(torch_chunked.class_chunks(1024, 1_000_000, 512, torch_chunked.chunk_budget(d))))
              for d in (cuda, cpu)}
    assert counts == {cuda: 92, cpu: 733}
