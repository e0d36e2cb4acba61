"""marginkit against pytorch-metric-learning's losses on identical weights and inputs."""

import math

import pytest
import torch

import marginkit as mk
from tests.helpers import make_inputs, rel_err

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def _run_pair(pml_loss, spec, scale, x, w, y):
    """Loss and gradients of pml (its W is (D, C)) and of marginkit on the same numbers."""
    with torch.no_grad():
        pml_loss.W.copy_(w.T)
    xp = x.clone().requires_grad_(True)
    pml_value = pml_loss(xp, y)
    pgx, pgw = _grads(pml_value, xp, pml_loss.W)
    xm = x.clone().requires_grad_(True)
    wm = w.clone().requires_grad_(True)
    ours = mk.margin_cross_entropy(xm, wm, y, spec, scale, backend="torch")
    mgx, mgw = _grads(ours, xm, wm)
    return (pml_value, pgx, pgw.T), (ours, mgx, mgw)


def test_arcface_matches_pml():
    x, w, y = make_inputs(B=12, C=50, D=32, seed=21)
    margin = 0.5
    pml = pml_losses.ArcFaceLoss(50, 32, margin=math.degrees(margin), scale=30.0)
    theirs, ours = _run_pair(pml, mk.ArcFace(margin), 30.0, x, w, y)
    for t, o in zip(theirs, ours):
        assert rel_err(o, t) < 1e-5


def test_cosface_matches_pml():
    x, w, y = make_inputs(B=12, C=50, D=32, seed=22)
    pml = pml_losses.CosFaceLoss(50, 32, margin=0.35, scale=64.0)
    theirs, ours = _run_pair(pml, mk.CosFace(0.35), 64.0, x, w, y)
    for t, o in zip(theirs, ours):
        assert rel_err(o, t) < 1e-5


def test_sphereface_matches_pml_on_rows_of_equal_norm():
    """pml scales SphereFace logits by ‖x‖·s: with every row of norm r that is our scale r·s.

    pml's gradient also has a radial part (through ‖x‖), which ours, at fixed scale, has not:
    the tangential parts must agree."""
    x, w, y = make_inputs(B=12, C=50, D=32, seed=23)
    radius = 1.5
    x = torch.nn.functional.normalize(x, dim=1) * radius
    pml = pml_losses.SphereFaceLoss(50, 32, margin=4, scale=2.0)
    (tl, tgx, tgw), (ol, ogx, ogw) = _run_pair(pml, mk.SphereFace(4.0), 2.0 * radius, x, w, y)
    assert rel_err(ol, tl) < 1e-5
    assert rel_err(ogw, tgw) < 1e-5
    x_unit = x / radius
    tangential = tgx - x_unit * (tgx * x_unit).sum(dim=1, keepdim=True)
    assert rel_err(ogx, tangential) < 1e-5
