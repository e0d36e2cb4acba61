"""Make Triton's CPU interpreter cast float32 to bfloat16 as a GPU does.

The interpreter (Triton 3.6 to 3.9) casts fp32 to bf16 by dropping the low 16 bits, where
NVIDIA GPUs round to nearest even. Truncation biases every bf16 value downwards in magnitude:
the CPU twins of the bf16 kernels were ~1e-3 off (fp32 master weights, autocast), an error the
GPU does not make and one that a real bug of that size could hide behind.
"""

import os

import numpy as np
import torch


def round_bf16_casts_to_nearest_even() -> None:
    """Under TRITON_INTERPRET=1, patch the interpreter's fp32 -> bf16 cast to torch's (round to nearest
    even, NaN kept); a no-op elsewhere. Every process that runs kernels calls it: the test session
    (conftest.py) and the distributed tests' workers (distributed/harness.py)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "rounds_bf16", False):
        return
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return truncating(self, src, dst_type)

    cast_impl.rounds_bf16 = True
    builder.cast_impl = cast_impl
