"""ArcFace's one-pass (ψ, dψ/dcos) equals the generic ``psi`` + ``dpsi_exact`` bit for bit."""

import pytest
import torch

import marginkit as mk
from marginkit.specs import MarginSpec

COS = torch.cat([
    torch.linspace(-1.0, 1.0, 2001, dtype=torch.float64),
    torch.tensor([1.0 - 1e-9, -1.0 + 1e-9, 0.0, -0.0], dtype=torch.float64),
])


@pytest.mark.parametrize("spec", [
    mk.ArcFace(0.5), mk.ArcFace(0.5, easy_margin=True), mk.ArcFace(3.0), mk.ArcFace(0.0),
    mk.ArcFace(0.5, gradient="straight_through"), mk.ArcFace(0.3, easy_margin=True, gradient="straight_through"),
])
@pytest.mark.parametrize("per_row", [False, True])
def test_arcface_fused_terms_equal_the_generic_ones(spec, per_row):
    m = torch.linspace(0.0, 3.1, COS.shape[0], dtype=torch.float64) if per_row else None
    psi, dpsi = spec.target_terms(COS, m)
    want_psi, want_dpsi = MarginSpec.target_terms(spec, COS, m)
    assert torch.equal(psi, want_psi)
    assert torch.equal(dpsi, want_dpsi)
    assert psi.dtype == dpsi.dtype == torch.float64
