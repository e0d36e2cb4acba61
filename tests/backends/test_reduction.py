"""The Triton backend's reduction='mean' (``backends/triton/reduction.py``) against the torch
reduction it replaces (``_pipeline.reduce_losses``): value, gradient, ignored rows, NaN, opcheck."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from marginkit._pipeline import reduce_losses  # noqa: E402
from marginkit.backends.triton.reduction import mean_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda_twin  # benchmarks/gpu_run.sh runs this module on the GPU too


def rows(B, dtype=torch.float32, seed=0, ignored=()):
    g = torch.Generator().manual_seed(seed)
    losses = (torch.rand(B, generator=g, dtype=torch.float64) * 5).to(DEVICE, dtype)
    labels = torch.randint(0, 7, (B,), generator=g).to(DEVICE)
    labels[list(ignored)] = -1
    losses = torch.where(labels >= 0, losses, 0.0)  # as the loss ops give them
    return losses, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, ignored", [(5, (1,)), (2500, (0, 7, 1999)), (3, (0, 1, 2)), (0, ())])
def test_mean_and_its_gradient_equal_the_torch_reduction(dtype, B, ignored):
    """Several steps of the program's loop (2500 rows), every row ignored (mean 0), an empty batch."""
    losses, labels = rows(B, dtype, ignored=ignored)
    ours_in, ref_in = losses.clone().requires_grad_(True), losses.clone().requires_grad_(True)
    ours = mean_loss(ours_in, labels)
    ref = reduce_losses(ref_in, labels >= 0, "mean")
    assert ours.dtype == dtype and ours.shape == ()
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert abs(float(ours.detach()) - float(ref.detach())) <= tol * max(1.0, abs(float(ref.detach())))
    (ours * 3.0).backward()
    (ref * 3.0).backward()
    expected = torch.where(labels >= 0, ref_in.grad, 0.0)  # ignored rows: exactly 0
    assert torch.allclose(ours_in.grad, expected, rtol=1e-6, atol=0.0)


def test_strided_inputs_are_read_as_the_values_they_hold_and_bad_shapes_are_refused():
    losses, labels = rows(12, ignored=(5,))
    wide_losses = torch.stack([losses, losses * 0 + 100.0], dim=1)[:, 0]
    wide_labels = torch.stack([labels, labels * 0 - 1], dim=1)[:, 0]
    assert wide_losses.stride(0) == 2 and wide_labels.stride(0) == 2
    ref = reduce_losses(losses, labels >= 0, "mean")
    assert abs(float(mean_loss(wide_losses, wide_labels)) - float(ref)) <= 1e-6 * float(ref)
    with pytest.raises(ValueError, match="labels_local"):
        mean_loss(losses, labels[:-1])


def test_a_nan_loss_makes_the_mean_nan():
    losses, labels = rows(6, ignored=(2,))
    losses[4] = float("nan")
    assert torch.isnan(mean_loss(losses, labels))


def test_opcheck():
    losses, labels = rows(9, ignored=(3,))
    torch.library.opcheck(torch.ops.marginkit.triton_mean_loss.default, (losses.requires_grad_(True), labels))
    grad = torch.tensor(2.0, device=DEVICE)
    torch.library.opcheck(torch.ops.marginkit.triton_mean_loss_backward.default, (grad, labels))
