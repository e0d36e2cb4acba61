"""backends/common.py: the per-row pieces every backend shares."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from marginkit.backends.common import apply_target_gradients, target_backward


def _inputs(B=13, C=7, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    w = torch.randn(C, D, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[[2, 9]] = -1  # rows whose target is not in this weight
    target_grad = torch.randn(B, generator=g, dtype=torch.float64)
    grad_x = torch.randn(B, D, generator=g)
    return x, w, labels, target_grad, grad_x


@pytest.mark.parametrize("rows_per_chunk", [None, 1, 4])
def test_target_share_summed_in_float64_then_rounded_once(rows_per_chunk):
    """Duplicate classes (several rows of one class, possibly in different chunks) are summed
    in float64 and rounded once into the bf16 weight gradient; dX is rounded once too."""
    x, w, labels, target_grad, grad_x = _inputs()
    grad_w = (torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 1e-3).to(torch.bfloat16)
    tdx, classes, tdw = target_backward(x, w, labels, target_grad, True)  # the whole batch at once
    want_w = grad_w.to(torch.float64)
    for i, c in enumerate(classes.tolist()):
        want_w[c] += tdw[i]
    want_x = (grad_x.to(torch.float64) + tdx).to(torch.bfloat16)

    out_w = grad_w.clone()
    out_x = apply_target_gradients(grad_x, out_w, x, w, labels, target_grad, True, torch.bfloat16, rows_per_chunk)
    assert torch.equal(out_x, want_x)
    assert torch.equal(out_w, want_w.to(torch.bfloat16))
    absent = sorted(set(range(w.shape[0])) - set(labels[labels >= 0].tolist()) - {0})
    assert torch.equal(out_w[absent], grad_w[absent])  # classes without rows are not touched


def test_without_a_weight_gradient_and_with_no_rows():
    x, w, labels, target_grad, grad_x = _inputs()
    tdx, _, _ = target_backward(x, w, labels, target_grad, False)
    out = apply_target_gradients(grad_x, None, x, w, labels, target_grad, False, torch.float32)
    assert torch.equal(out, (grad_x.double() + tdx).float())
    base = torch.randn(4, 3)
    empty = apply_target_gradients(torch.empty(0, 3), base, torch.empty(0, 3), base, torch.empty(0, dtype=torch.long),
                                   torch.empty(0, dtype=torch.float64), True, torch.float32)
    assert empty.shape == (0, 3)


class Float64Buffers(TorchDispatchMode):
    """The distinct float64 tensors of at least ``threshold`` elements any aten op returns."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold, self.storages = threshold, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.numel() >= self.threshold:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


def test_float64_work_holds_one_batch_sized_buffer():
    """Chunked: the only (B, D) float64 tensor is the per-class sums; every other float64
    temporary is chunk-sized, at most the chunk's (x, w) pair (the unchunked version made
    about six (B, D) ones)."""
    B, D, rows = 512, 16, 64
    x, w, labels, target_grad, grad_x = _inputs(B=B, C=50, D=D, seed=3)
    grad_w = torch.zeros(w.shape)
    with Float64Buffers(threshold=2 * rows * D + 1) as mode:
        apply_target_gradients(grad_x, grad_w, x, w, labels, target_grad, True, torch.float32, rows)
    assert len(mode.storages) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_inverse_norms_equal_the_widened_copy(dtype):
    """CPU twin of test_gpu_inverse_norms_copy_nothing: same numbers as widening first."""
    from marginkit.backends.common import compute_dtype, inverse_norms

    rows = torch.randn(300, 24, generator=torch.Generator().manual_seed(4)).to(dtype)
    rows[7] = 0  # the eps clamp
    want = torch.linalg.vector_norm(rows.to(compute_dtype(rows)), dim=1).clamp_min(1e-12).reciprocal()
    assert torch.equal(inverse_norms(rows, True), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU twin above)")
def test_gpu_inverse_norms_copy_nothing():
    """1/‖w‖ of a bf16 (1M, 512) weight without a float32 copy of it (2 GB)."""
    from marginkit.backends.common import inverse_norms

    w = torch.randn(1_000_000, 512, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    inverse_norms(w, True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 64 * 2**20
