"""torch.autograd.gradcheck in float64: the analytic gradients of every spec × gradient mode.

gradcheck differentiates the loss numerically, so for gradient="exact" it checks the
backend's analytic dψ/dcos and its chain rules against the formula itself. For
"straight_through" the analytic gradient is by design not the formula's: there it
checks against the same loss with ψ's derivative replaced by 1 (ψ − cos held fixed).
"""

import pytest
import torch

import marginkit as mk
from marginkit.backends import torch_chunked
from marginkit.backends.common import target_cosine
from tests.helpers import SPECS, make_inputs, spec_id, with_gradient


@pytest.fixture(autouse=True, params=["chunked", "dense"])
def torch_path(request, monkeypatch):
    """Both torch-backend paths: one class per chunk (13 elements), or every class at once."""
    if request.param == "chunked":
        monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", 13)
    return request.param


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_gradcheck_exact(spec, normalize):
    x, w, y = make_inputs(B=4, C=7, D=5, dtype=torch.float64, seed=11, ignored=1)
    if not normalize:  # inputs taken as normalised: keep cosines inside (-1, 1)
        x, w = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(w, dim=1)
    x.requires_grad_(True)
    w.requires_grad_(True)
    spec = with_gradient(spec, "exact")

    def loss(x, w):
        return mk.margin_cross_entropy(x, w, y, spec, 3.0, reduction="none", normalize=normalize, backend="torch")

    assert torch.autograd.gradcheck(loss, (x, w), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_gradcheck_straight_through(spec):
    """Straight-through gradients equal those of the textbook loss with ψ − cos held constant."""
    x, w, y = make_inputs(B=4, C=7, D=5, dtype=torch.float64, seed=12)
    x.requires_grad_(True)
    w.requires_grad_(True)
    spec = with_gradient(spec, "straight_through")
    cos_target = target_cosine(x, w, y, True)
    offset = (spec.psi(cos_target) - cos_target).detach()

    def offset_textbook(x, w):
        cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
        logits = 3.0 * (cos + torch.nn.functional.one_hot(y, w.shape[0]) * offset[:, None])
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")

    ours = mk.margin_cross_entropy(x, w, y, spec, 3.0, reduction="none", backend="torch")
    torch.testing.assert_close(ours, offset_textbook(x, w), rtol=1e-12, atol=1e-12)
    gx, gw = torch.autograd.grad(ours.sum(), (x, w))
    rx, rw = torch.autograd.grad(offset_textbook(x, w).sum(), (x, w))
    torch.testing.assert_close(gx, rx, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-9, atol=1e-12)
