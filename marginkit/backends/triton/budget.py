"""The memory-budget mode: how many classes' exp-scaled logits the forward keeps for the backward.

``memory_budget`` (bytes; the keyword of ``mk.margin_cross_entropy`` and the heads) buys
speed with memory: the forward stores S = σ·exp(logit − tile max)·dN/dcos (compute dtype,
the workspace's precision) plus one fp32 tile max per ``STORE_GROUP`` classes, for as many
whole backward chunks as fit; the backward turns stored chunks into the dS workspace with one
bandwidth pass instead of the recompute GEMM (three GEMM passes instead of four).
0 (the default): nothing stored, today's bounded workspace. None: every class stored
(B·C·(element size + 4/32) bytes: 2.03 GiB at B = 1024, C = 1M in bf16).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from marginkit.backends.triton.launch import cdiv, chunk_classes

__all__ = ["STORE_GROUP", "STORE_ROW_ALIGN", "stored_classes", "stored_bytes", "store_width", "store_scale"]

#: Classes per stored tile max: the smallest class tile of any config (interpreter: 32).
STORE_GROUP = 32
#: fp16 store: the largest stored value σ·1·max|dN/dcos| is brought near 2^14 (well inside 65 504).
FP16_STORE_MAX = 2.0**14


def stored_bytes(num_rows: int, n_stored: int, element_size: int) -> int:
    """Bytes held from forward to backward for ``n_stored`` classes: S and its tile maxima."""
    return num_rows * n_stored * element_size + num_rows * cdiv(n_stored, STORE_GROUP) * 4


def stored_classes(num_rows: int, num_classes: int, element_size: int, memory_budget: Optional[float]) -> int:
    """Classes [0, n) whose logits the forward stores: all C when they fit the budget (None:
    unlimited), else the most whole backward chunks that fit, else 0."""
    if num_rows == 0 or num_classes == 0 or memory_budget == 0:
        return 0
    if memory_budget is None or stored_bytes(num_rows, num_classes, element_size) <= memory_budget:
        return num_classes
    chunk = chunk_classes(num_rows, num_classes, element_size)
    whole = int(memory_budget // stored_bytes(num_rows, chunk, element_size))  # chunk is a multiple of 32
    return min(whole * chunk, num_classes)


def store_scale(dtype: torch.dtype, slope_bound: float) -> float:
    """Power-of-two σ of the stored values: 1, except fp16 (largest → ≤ 2^14, so small
    probabilities stay normal numbers rather than fp16 subnormals)."""
    if dtype != torch.float16:
        return 1.0
    return 2.0 ** (math.log2(FP16_STORE_MAX) - math.ceil(math.log2(max(slope_bound, 1.0))))


#: Store row stride multiple: Triton specialises it as divisible by 16, so the deferred GEMMs load
#: the stored dS with cp.async, not scalar 2-byte loads (sm_90: 24-32 KiB less pipelined smem).
STORE_ROW_ALIGN = 16


def store_width(num_rows: int, num_classes: int, element_size: int, memory_budget: Optional[float]) -> tuple[int, int]:
    """(classes stored, row stride of the store in elements, a multiple of ``STORE_ROW_ALIGN``).

    The padding counts against the budget: when all C classes fit but not their padded rows,
    the store falls back to whole chunks (multiples of the chunk granule: no padding then).
    """
    n_stored = stored_classes(num_rows, num_classes, element_size, memory_budget)
    padded = cdiv(n_stored, STORE_ROW_ALIGN) * STORE_ROW_ALIGN
    if memory_budget is not None and padded != n_stored and stored_bytes(num_rows, padded, element_size) > memory_budget:
        whole_chunks_only = stored_bytes(num_rows, num_classes, element_size) - 1  # all C no longer fits
        n_stored = stored_classes(num_rows, num_classes, element_size, whole_chunks_only)
        padded = cdiv(n_stored, STORE_ROW_ALIGN) * STORE_ROW_ALIGN
    return n_stored, padded
