"""``mean_loss``: the 'mean' reduction of per-row losses on the Triton backend, one launch each way.

The mean over the rows that take part (``labels_local >= 0``) is Σ loss / max(count, 1); in torch
that is five small ops forward and two backward (each a few µs of host time per step on CUDA).
Here it is a custom op (``torch.compile`` traces it) over ``triton_kernels/row_reduction.py``:
summed in float64 in one fixed order, so it is deterministic and equals the torch reduction to
the last bits of a float64 sum.
"""

from __future__ import annotations

import torch

from marginkit.backends.triton.launch import device_guard
from marginkit.backends.triton.launchers import MASKED_MEAN, MASKED_MEAN_BACKWARD

__all__ = ["mean_loss"]

#: Rows per step of the one program's loop.
ROWS_PER_STEP = 1024


@torch.library.custom_op("marginkit::triton_mean_loss", mutates_args=())
def _mean_loss(losses: torch.Tensor, labels_local: torch.Tensor) -> torch.Tensor:
    out = losses.new_empty(())
    with device_guard(losses):
        MASKED_MEAN((1,), losses, labels_local, out, losses.shape[0], BLOCK=ROWS_PER_STEP, pinned=True)
    return out


@_mean_loss.register_fake
def _mean_loss_fake(losses, labels_local):
    return losses.new_empty(())


@torch.library.custom_op("marginkit::triton_mean_loss_backward", mutates_args=())
def _mean_loss_backward(grad: torch.Tensor, labels_local: torch.Tensor) -> torch.Tensor:
    grad_rows = grad.new_empty(labels_local.shape)
    with device_guard(grad):
        MASKED_MEAN_BACKWARD(
            (1,), grad, labels_local, grad_rows, labels_local.shape[0], BLOCK=ROWS_PER_STEP, pinned=True
        )
    return grad_rows


@_mean_loss_backward.register_fake
def _mean_loss_backward_fake(grad, labels_local):
    return grad.new_empty(labels_local.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward(ctx, grad):
    (labels_local,) = ctx.saved_tensors
    return torch.ops.marginkit.triton_mean_loss_backward(grad, labels_local), None


_mean_loss.register_autograd(_backward, setup_context=_setup_context)


def mean_loss(losses: torch.Tensor, labels_local: torch.Tensor) -> torch.Tensor:
    """Σ_{labels_local_i >= 0} losses_i / max(#those rows, 1), a 0-d tensor in losses' dtype.

    losses (B,) (differentiable), labels_local (B,) int64 (−1: the row takes no part; its loss is
    left out and gets a zero gradient). The pipeline's reduction='mean' on the Triton backend.
    """
    if losses.dim() != 1 or labels_local.shape != losses.shape:
        raise ValueError(
            f"losses and labels_local must both be (B,); got {tuple(losses.shape)} and {tuple(labels_local.shape)}"
        )
    # the kernels read both at unit stride (no op when they already are)
    return torch.ops.marginkit.triton_mean_loss(losses.contiguous(), labels_local.contiguous())
