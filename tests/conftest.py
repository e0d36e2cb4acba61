"""Test-wide setup: Triton runs in its CPU interpreter when no GPU is present."""

import os

import torch

# Must be set before any Triton kernel is decorated (i.e. before marginkit.triton_kernels is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.interpreter_rounding import round_bf16_casts_to_nearest_even  # noqa: E402

round_bf16_casts_to_nearest_even()
