"""A kernel's fp32 -> bf16 cast rounds to nearest even, as torch's does: on the GPU natively, in the
CPU interpreter through ``tests/interpreter_rounding.py`` (it truncated, biasing the bf16 twins: see
``test_triton_backend.test_fp32_master_weights``)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda_twin


@triton.jit
def _cast_to_bf16(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(src_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, v.to(tl.bfloat16), mask=offs < n)


def test_kernel_casts_round_to_nearest_even_like_torch():
    g = torch.Generator().manual_seed(0)
    special = [0.3, 1 / 3, -2 / 3, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.0e38, -1e-40, 0.0, float("inf"), float("nan")]
    src = torch.cat([torch.tensor(special), torch.randn(246, generator=g) * 10.0]).to(DEVICE)
    out = torch.empty(src.shape, dtype=torch.bfloat16, device=DEVICE)
    _cast_to_bf16[(1,)](src, out, src.numel(), BLOCK=256)
    want = src.to(torch.bfloat16)
    nan = want.isnan()  # a NaN's payload is the device's business
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))
