"""The 'mean' reduction of per-row losses over the rows that take part, and its backward.

One program each (B is a batch: a few thousand rows), so the sum is in one fixed order
(deterministic) and no host op runs: the mean over rows with label >= 0 is
Σ loss / max(count, 1) in float64, and its gradient g / max(count, 1) on those rows, 0 elsewhere.
"""

import triton
import triton.language as tl

from .target_column import rounded


@triton.jit
def masked_mean_kernel(losses_ptr, labels_ptr, out_ptr, B, BLOCK: tl.constexpr):
    """out (1,) = Σ_{labels_i >= 0} losses_i / max(#{labels_i >= 0}, 1), summed in float64."""
    total = tl.zeros([BLOCK], dtype=tl.float64)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for b0 in range(0, B, BLOCK):
        rows = b0 + tl.arange(0, BLOCK)
        owned = tl.load(labels_ptr + rows, mask=rows < B, other=-1) >= 0
        losses = tl.load(losses_ptr + rows, mask=owned, other=0.0).to(tl.float64)
        total += tl.where(owned, losses, 0.0)
        count += owned.to(tl.int32)
    mean = tl.sum(total, axis=0) / tl.maximum(tl.sum(count, axis=0), 1).to(tl.float64)
    tl.store(out_ptr, rounded(mean, out_ptr.dtype.element_ty))


@triton.jit
def masked_mean_backward_kernel(grad_ptr, labels_ptr, grad_rows_ptr, B, BLOCK: tl.constexpr):
    """grad_rows (B,) = g / max(#{labels_i >= 0}, 1) where labels_i >= 0, else 0 (g: grad_ptr (1,))."""
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for b0 in range(0, B, BLOCK):
        rows = b0 + tl.arange(0, BLOCK)
        count += (tl.load(labels_ptr + rows, mask=rows < B, other=-1) >= 0).to(tl.int32)
    share = tl.load(grad_ptr).to(tl.float64) / tl.maximum(tl.sum(count, axis=0), 1).to(tl.float64)
    for b0 in range(0, B, BLOCK):
        rows = b0 + tl.arange(0, BLOCK)
        owned = tl.load(labels_ptr + rows, mask=rows < B, other=-1) >= 0
        tl.store(grad_rows_ptr + rows, rounded(tl.where(owned, share, 0.0), grad_rows_ptr.dtype.element_ty), mask=rows < B)
