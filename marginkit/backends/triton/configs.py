"""Launch configs of the Triton kernels and the pruner that keeps the autotuner honest.

Hopper-sized candidate tiles per kernel (wgmma tiles of 64/128 rows, 3–4 pipeline
stages), a smaller FMA set for fp32 without TF32, one fixed small config per kernel
under the interpreter, and ``pruner``: drop the configs whose tiles exceed the problem
or whose pipelined operand buffers exceed the device's shared memory (each would cost a
compile, then fail). Kept apart from the launcher as cut-cross-entropy keeps its
``tl_autotune.py``: the tile lists change with hardware, the launch logic does not.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import triton

__all__ = [
    "FWD_CONFIGS", "FWD_STORE_CONFIGS", "SCORES_CONFIGS", "SCORES_TMA_CONFIGS", "GEMM_CONFIGS", "DW_CONFIGS",
    "STORED_CONFIGS", "PROJECT_CONFIGS", "ROW_CONFIGS",
    "FMA_FWD_CONFIGS", "FMA_SCORES_CONFIGS", "FMA_GEMM_CONFIGS",
    "INTERPRETER_META", "pow2_at_least", "pruner", "shared_memory_limit",
]

#: Shared memory per block on H100/H200 (227 KiB), when the device does not report it.
HOPPER_SHARED_MEMORY_BYTES = 232448
#: The smallest wgmma tile side: problem bounds are rounded up to at least this.
MIN_TILE_SIDE = 64


def _cfg(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# No config here spills registers for sm_90a (Triton 3.9's ptxas; guarded by
# tests/backends/test_triton_compile.py). Pruned for spilling: forward w4s4 B128C128 (48 B of
# stack), scores w4s4 C128K64 (840 B), scores w8s3 C256K64 (712 B), scores w4s4 C64K64 (8 B
# with the modulation; w8s4 instead), dW w8s3 M128N256 (8 B); forward w8s3 B128C256 with STORE.
FWD_CONFIGS = [
    _cfg(8, 3, BLOCK_B=128, BLOCK_C=128, BLOCK_K=64),
    _cfg(8, 3, BLOCK_B=128, BLOCK_C=256, BLOCK_K=64),
    _cfg(8, 4, BLOCK_B=64, BLOCK_C=256, BLOCK_K=64),
    _cfg(8, 3, BLOCK_B=128, BLOCK_C=128, BLOCK_K=128),
    _cfg(4, 4, BLOCK_B=64, BLOCK_C=128, BLOCK_K=64),
]
#: The forward with STORE (memory-budget mode): B128C256 spills 448 B there (its store epilogue).
FWD_STORE_CONFIGS = [c for c in FWD_CONFIGS if (c.kwargs["BLOCK_B"], c.kwargs["BLOCK_C"]) != (128, 256)]
SCORES_CONFIGS = [  # BLOCK_B is the launcher's (it sizes the column-sum buffer)
    _cfg(8, 3, BLOCK_C=128, BLOCK_K=64),
    _cfg(8, 4, BLOCK_C=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_C=128, BLOCK_K=128),
]
#: The scores kernel's TMA tile set (``tuning(tma=True)``): w8s3 C128K64 spills 8 B there with the modulation.
SCORES_TMA_CONFIGS = [c for c in SCORES_CONFIGS if (c.kwargs["BLOCK_C"], c.kwargs["BLOCK_K"]) != (128, 64)]
GEMM_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128),
    _cfg(8, 4, BLOCK_M=64, BLOCK_N=256, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),  # small B or D
]
#: dW's epilogue (the W-row correction) spills 8 B at M128N256: the GEMM set without it. PREFETCH loads
#: the correction's W tile and column sums before the K loop (their latency hidden behind the MMAs, the
#: epilogue 10.5 -> 6.7 SASS/element) at 128 -> ~170 registers, which costs the 2 CTAs per SM the
#: plain M128N128 tile can hold: the autotuner decides, for the three largest tiles.
_DW_PLAIN = [c for c in GEMM_CONFIGS if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (128, 256)]
DW_CONFIGS = _DW_PLAIN + [
    _cfg(c.num_warps, c.num_stages, **c.kwargs, PREFETCH=True)
    for c in _DW_PLAIN
    if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 128
]

# Bandwidth-bound kernels of the memory-budget mode: one fixed config each (launched pinned, so
# through the launcher's cached handles; no autotuning).
STORED_CONFIGS = [_cfg(4, 1, BLOCK_B=32, BLOCK_C=128)]
PROJECT_CONFIGS = [_cfg(4, 1)]  # whole rows: BLOCK_M, BLOCK_D from D (passes.project_tile)
#: Per-row kernels (norms, lse merge, the target column): tiles from the call site, one config,
#: launched pinned so that they too go through cached handles.
ROW_CONFIGS = [_cfg(4, 1)]

# fp32 with torch's default (no TF32): tl.dot runs as FMAs, where big tiles buy nothing and
# take ptxas 5-17 s each to compile (vs 1-3 s for these; measured for sm_90 on the CPU).
FMA_FWD_CONFIGS = [
    _cfg(4, 3, BLOCK_B=64, BLOCK_C=64, BLOCK_K=32),
    _cfg(8, 3, BLOCK_B=128, BLOCK_C=64, BLOCK_K=32),
    _cfg(8, 3, BLOCK_B=64, BLOCK_C=128, BLOCK_K=32),
]
FMA_SCORES_CONFIGS = [
    _cfg(4, 3, BLOCK_C=64, BLOCK_K=32),
    _cfg(8, 3, BLOCK_C=64, BLOCK_K=32),
    _cfg(8, 3, BLOCK_C=128, BLOCK_K=32),
]
FMA_GEMM_CONFIGS = [
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
]

#: One small fixed config per kernel under the interpreter (autotuning there is slow).
INTERPRETER_META = {
    "fwd": dict(BLOCK_B=16, BLOCK_C=32, BLOCK_K=32),
    "scores": dict(BLOCK_C=32, BLOCK_K=32),
    "dx": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
    "dw": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16),
    "stored": dict(BLOCK_B=16, BLOCK_C=32),
    "project": dict(),
}


def pow2_at_least(n: int, low: int = 16) -> int:
    """The smallest power of two ≥ max(n, low), in plain int arithmetic
    (triton.next_power_of_2 is a constexpr function: ~10 µs a host call)."""
    return max(low, 1 << (max(int(n), 1) - 1).bit_length())


def shared_memory_limit(t: torch.Tensor) -> Optional[int]:
    """Shared memory one block may use on ``t``'s device (None off CUDA)."""
    return _cuda_shared_memory(t.device.index if t.device.index is not None else 0) if t.is_cuda else None


@functools.lru_cache(maxsize=None)
def _cuda_shared_memory(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", HOPPER_SHARED_MEMORY_BYTES))


def _pipeline_bytes(config, args, tiles, element_size) -> int:
    """Shared memory of the pipelined operand tiles: stages · (M + N) · K · element size."""
    m, n, k = (config.kwargs.get(name, args.get(name, 0)) for name in tiles)
    return config.num_stages * (m + n) * k * element_size


def pruner(limits: dict[str, Callable[[dict], int]], tiles: tuple[str, str, str]):
    """An ``early_config_prune`` for ``triton.autotune``; always keeps ≥ 1 config.

    ``limits`` maps a meta-parameter to the problem size it must not exceed (rounded up to
    a power of two ≥ ``MIN_TILE_SIDE``); ``tiles`` names the (M, N, K) tile sizes of the
    kernel's main tl.dot. The operand element size is the largest of the kernel's first
    two arguments (fp32 master weights take 4 bytes per W element in shared memory).
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        operands = list(named_args.values())[:2]  # every kernel's first two arguments are GEMM operands
        smem = shared_memory_limit(operands[0])
        element_size = max(t.element_size() for t in operands if isinstance(t, torch.Tensor))
        keep = []
        for config in configs:
            ok = all(
                config.kwargs[name] <= pow2_at_least(bound(args), MIN_TILE_SIDE)
                for name, bound in limits.items()
                if name in config.kwargs
            )
            if smem is not None and _pipeline_bytes(config, args, tiles, element_size) > smem:
                ok = False
            if config.kwargs.get("PREFETCH") and not args.get("NORMALIZE", True):
                ok = False  # dW's prefetch variant is the plain kernel without the projection: not timed twice
            if ok:
                keep.append(config)
        if not keep:
            keep = [min(configs, key=lambda c: math.prod(v for v in c.kwargs.values() if isinstance(v, int)))]
        return keep

    return prune
