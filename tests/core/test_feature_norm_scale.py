"""A-Softmax as published (logits scaled per row by ‖x‖) against pytorch-metric-learning's
SphereFaceLoss: loss and gradients, both backends, fp32 and fp64."""

import os

import pytest
import torch

import marginkit as mk
from tests.helpers import rel_err

losses = pytest.importorskip("pytorch_metric_learning.losses")

BACKENDS = ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]
B, D, C = 9, 12, 17


def _inputs(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(B, D, generator=g, dtype=torch.float64) * 3.0).to(dtype)
    w = torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return x, w, y


# The Triton backend computes float64 inputs in float32 kernels (README): fp32 only there.
COMBOS = [(b, d) for b in BACKENDS for d in (torch.float64, torch.float32) if not (b == "triton" and d == torch.float64)]


@pytest.mark.parametrize("m", [4, 10])
@pytest.mark.parametrize("backend,dtype", COMBOS)
def test_sphereface_matches_pml(m, dtype, backend):
    x, w, y = _inputs(dtype)
    pml = losses.SphereFaceLoss(num_classes=C, embedding_size=D, margin=m, scale=1.0)
    pml.W.data = w.T.clone().to(dtype)
    xp = x.clone().requires_grad_()
    want = pml(xp, y)
    want.backward()
    xm, wm = x.clone().requires_grad_(), w.clone().requires_grad_()
    got = mk.margin_cross_entropy(xm, wm, y, mk.SphereFace(float(m)), 1.0, feature_norm_scale=True, backend=backend)
    got.backward()
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    assert rel_err(got, want) < tol
    assert rel_err(xm.grad, xp.grad) < tol
    assert rel_err(wm.grad, pml.W.grad.T) < tol
    # the per-row norm matters: the fixed-scale loss differs
    plain = mk.margin_cross_entropy(x, w, y, mk.SphereFace(float(m)), 1.0, backend=backend)
    assert rel_err(plain, want) > 1e-2


def test_feature_norm_scale_gradcheck_float64():
    x, w, y = _inputs(torch.float64)
    x, w = x[:4, :5].clone().requires_grad_(), w[:6, :5].clone().requires_grad_()
    y = y[:4] % 6
    assert torch.autograd.gradcheck(
        lambda a, b: mk.margin_cross_entropy(a, b, y, mk.ArcFace(0.4), 2.0, feature_norm_scale=True), (x, w)
    )


def test_feature_norm_scale_needs_normalised_cosines():
    x, w, y = _inputs(torch.float32)
    with pytest.raises(ValueError, match="feature_norm_scale"):
        mk.margin_cross_entropy(x, w, y, mk.SphereFace(4.0), 1.0, feature_norm_scale=True, normalize=False)
    with pytest.raises(TypeError, match="feature_norm_scale"):
        mk.margin_cross_entropy(x, w, y, mk.SphereFace(4.0), 1.0, feature_norm_scale="yes")
