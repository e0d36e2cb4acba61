"""The Triton backend: launchers, grids, dtype rules, autotuning and autograd glue.

The kernels live in ``marginkit.triton_kernels`` (see its module docstring for the
algebra). This module implements the backend two-phase API (v3) of notes/CONTRACTS.md,

    lse_partials(embeddings, weight, labels_local, scale, normalize)
        -> (row_max (B,) f32, row_sumexp (B,) f32)            over the NON-TARGET columns
    grads_from_lse(embeddings, weight, labels_local, lse, grad_rows, scale, normalize)
        -> (grad_embeddings (B, D) f32, grad_weight (C, D) weight.dtype)   non-target share

and the single-device entry ``row_losses``: a ``torch.library`` custom op
(``marginkit::triton_margin_ce_rows``, with a fake implementation and an autograd formula
that calls a second custom op for the backward), so ``torch.compile(fullgraph=True)``
traces through it and ``torch.library.opcheck`` passes. The kernels never see the margin:
the target column is skipped in both passes, and its share (s·ψ in the loss,
g·s·(p_y − 1)·dψ/dcos in the gradients) is combined per row in float64 by
``common.combine_partials`` / ``common.apply_target_gradients``.

Forward
-------
The inverse row norms of X and W are computed first (a bandwidth-bound Triton kernel,
O((B + C)·D) reads, kept as (B,) and (C,) fp32; w_inv is saved for the backward). Then
``lse_partials_kernel`` runs on a grid (row blocks, class splits): each program walks its
own contiguous range of classes tile by tile, one tensor-core dot of the *raw* rows per
tile with the norms applied to the fp32 accumulator as scales, the target column left out,
and an online fp32 (max, Σexp) per row. ``lse_merge_kernel`` merges the splits in a fixed
order. Nothing (B, C) is ever stored; the extra memory is 2·splits·B floats.

Backward (bounded workspace; see DESIGN.md, "the backward's design space")
--------------------------------------------------------------------------
Classes are processed in chunks, with ``B·chunk`` elements of the input dtype as
workspace (WORKSPACE_BYTES = 32 MiB: chunk = 16 384 classes at B = 1024 in bf16).
Per chunk, three launches:

1. ``scores_kernel`` (grid row blocks × class tiles) recomputes the logits tile (1 GEMM),
   dS = g·s·exp(logit − lse) (0 at the target column), and stores E = κ·dS·x_inv·w_inv
   into the workspace (both norms folded in, so the two GEMMs below take the raw X and W),
   plus per-(row block, class) fp32 sums of dS⊙cos for the weight's chain rule.
2. ``dx_gemm_kernel``: G += E·W_chunk (split-K over the chunk's classes).
3. ``dw_gemm_kernel``: dW_chunk = Eᵀ·X − w_inv²·(Σ dS⊙cos)·W_chunk, fp32 accumulation
   over all B rows, written once in W's dtype (no C×D fp32 buffer).
At the end dX = G − x̂ (x̂·G) (the row normalisation's chain rule: Σ_j dS_ij cos_ij equals
x_i·G_i, so the X side needs no extra reduction).

That is 4 GEMMs in all (the 3-GEMM floor plus the recompute), no atomics on the
critical path, memory independent of C. Alternatives rejected (DESIGN.md): dW owned by
class tiles with dX by atomics (≈ C/BLOCK_C·B·D fp32 atomics: ~4 G atomics at C = 1M,
B = 1024, D = 512) and a second recompute pass for dX (5 GEMMs). A fully fused dW
accumulator of BLOCK_C × D fp32 does not fit in registers at D = 512.

Back of the envelope, B = 1024, D = 512, C = 1M, bf16, H100 SXM (~990 TFLOP/s dense
peak; assume ~650 achieved by these Triton GEMMs): each GEMM is 2·B·C·D = 1.07 TFLOP
≈ 1.65 ms. Norms 0.3 ms (one read of W, 1 GiB). Forward ≈ 1.65 ms + exp epilogue
(B·C = 1.07 G exp, ≈ 0.3 ms on the MUFU if not overlapped) ≈ 2 ms. Backward ≈ 3 × 1.65
+ epilogues ≈ 5.3 ms; the workspace round trip is B·C·2 bytes written + read twice =
6 GiB ≈ 1.9 ms of HBM traffic if none of it stays in L2, overlapped with the GEMMs.
Total ≈ 7.5 ms vs ≈ 5.2–5.6 ms for the 3-GEMM floor: ~1.4×, to be measured (owed).
Peak extra memory at that size: workspace 32 MiB + column sums 0.5 MiB + dX accumulator
2 MiB (8 MiB of per-split buffers in deterministic mode) + w_inv 4 MiB (C floats).

``deterministic``
-----------------
Every kernel except the dX split-K accumulation is deterministic by construction
(single-owner stores, fixed-order merges). The default (``deterministic=False``)
accumulates the split-K partials of dX with relaxed fp32 atomics straight into one
(B, D) buffer: no per-split buffer and a free choice of the split count, but the order of
the additions (and so the last bits of dX) can change run to run. ``deterministic=True``
gives each split its own (B, D) fp32 buffer, updated by plain load-add-store (launches
are stream-ordered) and summed in index order at the end: bitwise identical results run
to run, at the cost of splits·B·D·4 bytes (capped at 16 MiB by lowering the split count)
and one extra pass over those buffers, a few microseconds. The split count matters only
when the dX output has fewer tiles than the GPU has SMs (B·D small); dW, the forward and
the float64 target terms are identical in both modes. ``deterministic=True`` also
pins every kernel's launch config (the first Hopper config that fits the shape) instead of
autotuning: tile sizes fix the fp32 summation order, so the bits then match across
processes too (on the same GPU model and software); the float64 target terms run with
torch's deterministic algorithms (index_add_ on CUDA is otherwise atomic).

Dtypes
------
fp32, fp16, bf16 inputs (float64 is accepted and computed in float32 kernels; its loss
is returned in float64 like the torch backend's). Logits, softmax statistics, dS and all
GEMM accumulators are fp32; the workspace E holds the input dtype (the tensor-core
operand type). For fp16, E is scaled by a power of two κ chosen from the data so that its
largest possible entry is 2^14: no overflow, and small probabilities stay normal numbers
instead of flushing to zero. fp32 inputs follow ``torch.backends.cuda.matmul.allow_tf32``
(ieee dots unless allowed). Gradients are never filtered by probability.

Autotuning
----------
On a GPU every GEMM-shaped kernel is ``triton.autotune``d over Hopper-sized configs,
keyed by D, a power-of-two bucket of B, the mode flags and the dtypes. The only kernel
that accumulates into its output (the dX GEMM) declares it in ``restore_value`` so
tuning runs leave it untouched; the others only store. Choices are cached in-process and
on disk (``cache_results=True``). Under TRITON_INTERPRET=1 one small fixed config is used
(autotuning in the interpreter is slow).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Iterator, Optional

import torch
import triton

from marginkit.backends.common import (
    NORM_EPS,
    apply_target_gradients,
    combine_partials,
    compute_dtype,
    owned_labels,
    target_gradient,
)
from marginkit.errors import MarginKitTypeError
from marginkit.triton_kernels import (
    dw_gemm_kernel,
    dx_gemm_kernel,
    lse_merge_kernel,
    lse_partials_kernel,
    row_inv_norm_kernel,
    scores_kernel,
)

__all__ = ["lse_partials", "grads_from_lse", "row_losses", "inverse_norms", "tuning", "WORKSPACE_BYTES"]

#: Budget of the backward's dS workspace (elements of the input dtype × their size).
WORKSPACE_BYTES = 32 << 20
#: Cap on the deterministic mode's per-split dX buffers.
MAX_SPLIT_BUFFER_BYTES = 16 << 20
#: fp16 workspace: the largest |E| after the κ scaling (well inside fp16's 65 504).
FP16_TARGET_MAX = 2.0**14

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Kernels are InterpretedFunction objects when TRITON_INTERPRET=1 was set before import.
INTERPRETED = type(lse_partials_kernel).__name__ == "InterpretedFunction"

# Class granule: splits, chunks and split-K ranges are multiples of the largest class tile.
_GRANULE = 32 if INTERPRETED else 256

# Test/benchmark overrides of launcher choices (see ``tuning``).
_overrides: dict = {}


@contextlib.contextmanager
def tuning(**kwargs) -> Iterator[None]:
    """Temporarily override launcher choices (tests, benchmarks).

    Keys: ``class_splits`` (forward class splits), ``chunk_classes`` (backward chunk),
    ``dx_splits`` (split-K of the dX GEMM), ``direct_launch`` (False: every launch through
    Triton's autotuner, for A/B timing).
    """
    allowed = {"class_splits", "chunk_classes", "dx_splits", "direct_launch"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"unknown tuning keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    saved = dict(_overrides)
    _overrides.update({k: v for k, v in kwargs.items() if v is not None})
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


# ----------------------------------------------------------------------------------------
# Autotuning configs (Hopper: wgmma tiles of 64/128 rows, 3–4 pipeline stages)
# ----------------------------------------------------------------------------------------
def _cfg(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


FWD_CONFIGS = [
    _cfg(8, 3, BLOCK_B=128, BLOCK_C=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_B=128, BLOCK_C=128, BLOCK_K=64),
    _cfg(8, 3, BLOCK_B=128, BLOCK_C=256, BLOCK_K=64),
    _cfg(8, 4, BLOCK_B=64, BLOCK_C=256, BLOCK_K=64),
    _cfg(8, 3, BLOCK_B=128, BLOCK_C=128, BLOCK_K=128),
    _cfg(4, 4, BLOCK_B=64, BLOCK_C=128, BLOCK_K=64),
]
SCORES_CONFIGS = [  # BLOCK_B is the launcher's (it sizes the column-sum buffer)
    _cfg(8, 3, BLOCK_C=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_C=128, BLOCK_K=64),
    _cfg(8, 3, BLOCK_C=256, BLOCK_K=64),
    _cfg(4, 4, BLOCK_C=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_C=128, BLOCK_K=128),
]
GEMM_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128),
    _cfg(8, 4, BLOCK_M=64, BLOCK_N=256, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),  # small B or D
]

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

# One small fixed config per kernel under the interpreter.
_INTERP_META = {
    "fwd": dict(BLOCK_B=16, BLOCK_C=32, BLOCK_K=32),
    "scores": dict(BLOCK_C=32, BLOCK_K=32),
    "dx": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
    "dw": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16),
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function in Triton 3.9: ~10 µs a host call


def _pow2_at_least(n: int, low: int = 16) -> int:
    # Plain int arithmetic: triton.next_power_of_2 is a constexpr function, ~10 µs a call
    # from Python, and this runs several times per launch.
    return max(low, 1 << (max(int(n), 1) - 1).bit_length())


def _shared_memory_limit(t: torch.Tensor) -> Optional[int]:
    """Shared memory one block may use on ``t``'s device (None off CUDA)."""
    return _cuda_shared_memory(t.device.index if t.device.index is not None else 0) if t.is_cuda else None


@functools.lru_cache(maxsize=None)
def _cuda_shared_memory(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 232448))  # 227 KiB on H100/H200


def _pipeline_bytes(config, args, tiles, element_size) -> int:
    """Shared memory of the pipelined operand tiles: stages · (M + N) · K · element size."""
    m, n, k = (config.kwargs.get(name, args.get(name, 0)) for name in tiles)
    return config.num_stages * (m + n) * k * element_size


def _pruner(limits, tiles):
    """early_config_prune dropping configs whose tiles exceed the problem or whose pipeline
    buffers exceed the device's shared memory (each would cost a compile, then fail); keeps ≥ 1.

    Bounds are rounded up to a power of two ≥ 64 (the smallest wgmma tile side). ``tiles``
    names the (M, N, K) tile sizes of the kernel's main tl.dot.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        operand = next(iter(named_args.values()))  # every kernel's first argument is a GEMM operand
        smem = _shared_memory_limit(operand)
        keep = []
        for config in configs:
            ok = True
            for meta_name, bound in limits.items():
                if meta_name in config.kwargs and config.kwargs[meta_name] > _pow2_at_least(bound(args), 64):
                    ok = False
            if smem is not None and _pipeline_bytes(config, args, tiles, operand.element_size()) > smem:
                ok = False
            if ok:
                keep.append(config)
        if not keep:
            keep = [min(configs, key=lambda c: math.prod(v for v in c.kwargs.values() if isinstance(v, int)))]
        return keep

    return prune


class _Launcher:
    """A kernel with its autotuner (GPU) or its fixed interpreter config.

    ``pinned=True`` (deterministic mode) skips the autotuner and launches the first config
    that fits the shape: the tile sizes fix the fp32 summation order, so pinning them makes
    results identical across processes, not only within one.

    Otherwise the first launch of each tuning key goes through Triton's autotuner; later
    ones launch its pick directly, skipping the autotuner's per-call work (≈ 26 µs a launch
    on this project's CPU machine, measured with the kernel stubbed; the backward launches
    three kernels per class chunk, 186 per step at C = 1M). ``tuning(direct_launch=False)``
    sends every launch through the autotuner.
    """

    def __init__(self, fn, configs, fma_configs, key, interp_meta, tiles, limits=None, restore_value=()):
        self.fn = fn
        self.interp_meta = interp_meta
        self.configs = {False: configs, True: fma_configs}  # keyed by "fp32 without TF32"
        self.prune = _pruner(limits or {}, tiles)
        self.key_positions = [(name, fn.arg_names.index(name)) for name in key]
        self.picked = {}  # (fma, operand dtype, key values) -> the autotuner's config
        self.tuned = None
        if not INTERPRETED:
            kwargs = dict(key=key, restore_value=list(restore_value), prune_configs_by={"early_config_prune": self.prune})
            if "cache_results" in inspect.signature(triton.autotune).parameters:
                kwargs["cache_results"] = True
            self.tuned = {fma: triton.autotune(configs=c, **kwargs)(fn) for fma, c in self.configs.items()}

    @staticmethod
    def uses_fma(args, kwargs) -> bool:
        """fp32 operands with an IEEE dot: no tensor cores, so the FMA tile set."""
        return kwargs.get("DOT_PRECISION") == "ieee" and args[0].dtype == torch.float32

    def tuning_key(self, fma, args, kwargs) -> tuple:
        """What the autotuner keys on (its key arguments, the operands' dtype) and the tile set."""
        values = tuple(args[i] if i < len(args) else kwargs[name] for name, i in self.key_positions)
        return (fma, args[0].dtype) + values

    def __call__(self, grid, *args, pinned=False, **kwargs):
        fma = self.uses_fma(args, kwargs)
        if self.tuned is None:
            meta = {**self.interp_meta, **kwargs}
            self.fn[grid(meta) if callable(grid) else grid](*args, **meta)
        elif not pinned:
            key = self.tuning_key(fma, args, kwargs)
            config = self.picked.get(key) if _overrides.get("direct_launch", True) else None
            if config is None:
                tuner = self.tuned[fma]
                tuner[grid](*args, **kwargs)
                self.picked[key] = tuner.best_config
            else:
                meta = {**kwargs, **config.all_kwargs()}
                self.fn[grid(meta) if callable(grid) else grid](*args, **meta)
        else:
            config = self.prune(self.configs[fma], dict(zip(self.fn.arg_names, args)), **kwargs)[0]
            meta = {**kwargs, **config.kwargs}
            self.fn[grid(meta) if callable(grid) else grid](
                *args, **meta, num_warps=config.num_warps, num_stages=config.num_stages
            )


_FWD = _Launcher(
    lse_partials_kernel,
    FWD_CONFIGS,
    FMA_FWD_CONFIGS,
    key=["D", "B_BUCKET", "HOOK"],
    interp_meta=_INTERP_META["fwd"],
    tiles=("BLOCK_B", "BLOCK_C", "BLOCK_K"),
    limits={"BLOCK_B": lambda a: a["B"], "BLOCK_K": lambda a: a["D"]},
)
_SCORES = _Launcher(
    scores_kernel,
    SCORES_CONFIGS,
    FMA_SCORES_CONFIGS,
    key=["D", "B_BUCKET", "HOOK", "NORMALIZE"],
    interp_meta=_INTERP_META["scores"],
    tiles=("BLOCK_B", "BLOCK_C", "BLOCK_K"),
    limits={"BLOCK_K": lambda a: a["D"]},
)
_DX = _Launcher(
    dx_gemm_kernel,
    GEMM_CONFIGS,
    FMA_GEMM_CONFIGS,
    key=["D", "B_BUCKET", "USE_ATOMICS"],
    interp_meta=_INTERP_META["dx"],
    tiles=("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    limits={"BLOCK_M": lambda a: a["B"], "BLOCK_N": lambda a: a["D"]},
    restore_value=["out_ptr"],  # accumulates across chunks: tuning runs must not add
)
_DW = _Launcher(
    dw_gemm_kernel,
    GEMM_CONFIGS,
    FMA_GEMM_CONFIGS,
    key=["D", "B_BUCKET", "NORMALIZE"],
    interp_meta=_INTERP_META["dw"],
    tiles=("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    limits={"BLOCK_K": lambda a: a["B"], "BLOCK_N": lambda a: a["D"]},
)


# ----------------------------------------------------------------------------------------
# Launch-shape rules
# ----------------------------------------------------------------------------------------
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@contextlib.contextmanager
def _torch_deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic torch kernels for the float64 target terms (index_add_ on CUDA is
    otherwise atomic). warn_only: ops without a deterministic version only warn."""
    if not enabled or torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _b_bucket(num_rows: int) -> int:
    return min(_pow2_at_least(num_rows), 1 << 16)


def _class_splits(num_rows: int, num_classes: int, device: torch.device) -> tuple[int, int]:
    """(number of class splits, classes per split) of the forward grid."""
    if "class_splits" in _overrides:
        wanted = int(_overrides["class_splits"])
    elif INTERPRETED:
        wanted = 2
    else:  # about two programs per SM, each over a long contiguous class range
        wanted = max(1, -(-2 * _num_sms(device) // -(-num_rows // 128)))
    per_split = _round_up(-(-num_classes // max(wanted, 1)), _GRANULE)
    return -(-num_classes // per_split), per_split


def _chunk_classes(num_rows: int, num_classes: int, elem_size: int) -> int:
    if "chunk_classes" in _overrides:
        chunk = int(_overrides["chunk_classes"])
    else:
        chunk = (WORKSPACE_BYTES // max(num_rows * elem_size, 1)) // _GRANULE * _GRANULE
        chunk = max(chunk, _GRANULE)
    return max(1, min(chunk, _round_up(num_classes, _GRANULE)))


def _scores_block_b(num_rows: int) -> int:
    if INTERPRETED:
        return 16
    return min(128, _pow2_at_least(num_rows))


def _dx_splits(num_rows: int, dim: int, chunk: int, deterministic: bool, device: torch.device) -> int:
    if "dx_splits" in _overrides:
        splits = int(_overrides["dx_splits"])
    elif INTERPRETED:
        splits = 1
    else:  # split K until the (B/128)·(D/128) output tiles fill the SMs
        tiles = -(-num_rows // 128) * -(-dim // 128)
        splits = max(1, min(8, round(_num_sms(device) / tiles)))
    splits = max(1, min(splits, -(-chunk // _GRANULE)))
    if deterministic:
        while splits > 1 and splits * num_rows * dim * 4 > MAX_SPLIT_BUFFER_BYTES:
            splits -= 1
    return splits


def _dot_meta(dtype: torch.dtype) -> dict:
    """The GEMM kernels' dtype-dependent constexprs."""
    # The interpreter multiplies bf16 tiles as raw bits: widen them there (see _mma).
    return dict(DOT_PRECISION=_dot_precision(dtype), UPCAST=INTERPRETED and dtype == torch.bfloat16)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    if getattr(matmul, "fp32_precision", "none") == "tf32" or matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_inputs(embeddings: torch.Tensor, weight: torch.Tensor) -> None:
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings (B, D) and weight (C, D) must share D; got {tuple(embeddings.shape)} and {tuple(weight.shape)}"
        )
    if embeddings.dtype not in SUPPORTED_DTYPES or weight.dtype != embeddings.dtype:
        raise MarginKitTypeError(
            f"the Triton backend takes float32, float16 or bfloat16 embeddings and weight of the same dtype; "
            f"got {embeddings.dtype} and {weight.dtype}"
        )
    if weight.device != embeddings.device:
        raise MarginKitTypeError(f"weight is on {weight.device}, embeddings on {embeddings.device}")
    if not embeddings.is_cuda and not INTERPRETED:
        raise ValueError(
            "the Triton backend needs CUDA tensors; on the CPU it runs only under TRITON_INTERPRET=1 "
            "(set before triton is imported)"
        )


def _compute_operands(embeddings: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 runs in float32 (as the torch backend does); other dtypes as they are."""
    if embeddings.dtype == torch.float64:
        return embeddings.float(), weight.float()
    return embeddings, weight


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
def inverse_norms(rows: torch.Tensor, normalize: bool) -> torch.Tensor:
    """1/max(‖row‖, 1e-12) in fp32 for each row of (N, D) (ones when normalize=False)."""
    num = rows.shape[0]
    if not normalize:
        return torch.ones(num, dtype=torch.float32, device=rows.device)
    out = torch.empty(num, dtype=torch.float32, device=rows.device)
    if num == 0:
        return out
    if rows.shape[1] == 0:
        return out.fill_(1.0 / NORM_EPS)
    block_n = 16 if INTERPRETED else 32
    block_d = min(_pow2_at_least(rows.shape[1]), 64 if INTERPRETED else 128)
    with _device_guard(rows):
        row_inv_norm_kernel[(_cdiv(num, block_n),)](
            rows, out, num, rows.shape[1], rows.stride(0), rows.stride(1), NORM_EPS,
            BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
        )
    return out


def _hook_args(hard_negatives, fallback: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """(threshold (B,) fp32, t, HOOK) kernel arguments; ``fallback`` fills the unused pointer."""
    if hard_negatives is None:
        return fallback, 0.0, False
    threshold, t = hard_negatives
    return threshold.to(device=fallback.device, dtype=torch.float32).contiguous(), float(t), True


def _forward(x, w, x_inv, w_inv, labels_local, scale, deterministic=False, hard_negatives=None):
    """(row_max, row_sumexp) over the non-target classes of w; x, w in the compute dtype.

    hard_negatives: None, or (threshold (B,), t): CurricularFace's modulation of the
    negatives with cos > threshold_i into cos·(t + cos)."""
    num_rows, dim = x.shape
    num_classes = w.shape[0]
    device = x.device
    row_max = torch.full((num_rows,), float("-inf"), dtype=torch.float32, device=device)
    row_sumexp = torch.zeros(num_rows, dtype=torch.float32, device=device)
    if num_rows == 0 or num_classes == 0:
        return row_max, row_sumexp
    labels = labels_local.to(torch.int64).contiguous()
    n_splits, per_split = _class_splits(num_rows, num_classes, device)
    part_max = torch.empty((n_splits, num_rows), dtype=torch.float32, device=device)
    part_sum = torch.empty((n_splits, num_rows), dtype=torch.float32, device=device)
    threshold, t, hook = _hook_args(hard_negatives, x_inv)
    with _device_guard(x):
        _FWD(
            lambda meta: (_cdiv(num_rows, meta["BLOCK_B"]), n_splits),
            x, w, x_inv, w_inv, labels, part_max, part_sum, threshold,
            num_rows, num_classes, dim, per_split,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            float(scale), t, _b_bucket(num_rows), HOOK=hook,
            **_dot_meta(x.dtype),
            pinned=deterministic,
        )
        block = 128
        lse_merge_kernel[(_cdiv(num_rows, block),)](
            part_max, part_sum, row_max, row_sumexp, num_rows, n_splits, BLOCK=block
        )
    return row_max, row_sumexp


def _kappa(dtype, grad_scaled, x_inv, w_inv, slope_bound: float = 1.0) -> torch.Tensor:
    """Power-of-two scale of the workspace: 1, except for fp16 (largest |E| → 2^14)."""
    device = x_inv.device
    if dtype != torch.float16 or grad_scaled.numel() == 0 or w_inv.numel() == 0:
        return torch.ones(1, dtype=torch.float32, device=device)
    # |dS| ≤ |g|·s·slope since p ≤ 1 (slope: |t| + 2 with the CurricularFace hook, else 1)
    row_bound = (grad_scaled.abs() * x_inv).amax() * slope_bound
    bound = (row_bound.double() * w_inv.amax().double()).reshape(1)
    kappa = torch.exp2(torch.floor(torch.log2(FP16_TARGET_MAX / bound)))
    kappa = torch.nan_to_num(kappa, nan=1.0, posinf=2.0**60).clamp(2.0**-60, 2.0**60)
    return kappa.to(torch.float32)


def _backward(x, w, x_inv, w_inv, labels_local, lse, grad_rows, scale, normalize, deterministic, hard_negatives=None):
    """Non-target share: (grad_x fp32 (B, D), grad_w (C, D) in w's dtype); x, w in the compute dtype.

    hard_negatives: as ``_forward``."""
    num_rows, dim = x.shape
    num_classes = w.shape[0]
    device = x.device
    grad_x = torch.zeros((num_rows, dim), dtype=torch.float32, device=device)
    grad_w = torch.empty((num_classes, dim), dtype=w.dtype, device=device)
    if num_classes == 0 or dim == 0:
        return grad_x, grad_w.zero_()
    if num_rows == 0:
        return grad_x, grad_w.zero_()

    labels = labels_local.to(torch.int64).contiguous()
    lse32 = lse.to(torch.float32).contiguous()
    grad_scaled = (grad_rows.to(torch.float32) * scale).contiguous()
    threshold, t, hook = _hook_args(hard_negatives, x_inv)
    kappa = _kappa(x.dtype, grad_scaled, x_inv, w_inv, abs(t) + 2.0 if hook else 1.0)
    dot_meta = _dot_meta(x.dtype)
    bucket = _b_bucket(num_rows)

    chunk = _chunk_classes(num_rows, num_classes, x.element_size())
    block_b = _scores_block_b(num_rows)
    n_q = _cdiv(num_rows, block_b)
    workspace = torch.empty((num_rows, chunk), dtype=x.dtype, device=device)
    colsum = torch.empty((n_q, chunk) if normalize else (1, 1), dtype=torch.float32, device=device)

    splits = _dx_splits(num_rows, dim, chunk, deterministic, device)
    k_per_split = _round_up(-(-chunk // splits), _GRANULE)
    use_atomics = (not deterministic) and splits > 1
    if deterministic and splits > 1:
        dx_acc = torch.zeros((splits, num_rows, dim), dtype=torch.float32, device=device)
    else:
        dx_acc = grad_x.unsqueeze(0)

    with _device_guard(x):
        for start in range(0, num_classes, chunk):
            n_chunk = min(chunk, num_classes - start)
            n_splits_here = _cdiv(n_chunk, k_per_split)
            _SCORES(
                lambda meta: (n_q, _cdiv(n_chunk, meta["BLOCK_C"])),
                x, w, x_inv, w_inv, labels, lse32, grad_scaled, kappa,
                workspace, colsum, threshold,
                num_rows, dim, start, n_chunk,
                x.stride(0), x.stride(1), w.stride(0), w.stride(1), workspace.stride(0), colsum.stride(0),
                float(scale), t, bucket,
                HOOK=hook, NORMALIZE=bool(normalize), BLOCK_B=block_b, **dot_meta, pinned=deterministic,
            )
            _DX(
                lambda meta: (_cdiv(num_rows, meta["BLOCK_M"]), _cdiv(dim, meta["BLOCK_N"]), n_splits_here),
                workspace, w, dx_acc,
                num_rows, dim, start, n_chunk, k_per_split,
                workspace.stride(0), w.stride(0), w.stride(1),
                dx_acc.stride(1), dx_acc.stride(2), dx_acc.stride(0),
                bucket,
                USE_ATOMICS=use_atomics, **dot_meta, pinned=deterministic,
            )
            _DW(
                lambda meta: (_cdiv(n_chunk, meta["BLOCK_M"]), _cdiv(dim, meta["BLOCK_N"])),
                workspace, x, w, w_inv, colsum, kappa, grad_w,
                num_rows, dim, start, n_chunk, n_q,
                workspace.stride(0), x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                colsum.stride(0), grad_w.stride(0), grad_w.stride(1),
                bucket,
                NORMALIZE=bool(normalize), **dot_meta, pinned=deterministic,
            )

    if deterministic and splits > 1:
        grad_x = dx_acc[0].clone()
        for s in range(1, splits):  # fixed order
            grad_x += dx_acc[s]
    grad_x.mul_(1.0 / kappa)  # κ is a power of two: exact
    if normalize:  # dx = G − x̂ (x̂·G): the chain rule of x̂ = x/‖x‖ (G already carries 1/‖x‖)
        x_unit = x.to(torch.float32) * x_inv[:, None]
        grad_x -= x_unit * (x_unit * grad_x).sum(dim=1, keepdim=True)
    return grad_x, grad_w


# ----------------------------------------------------------------------------------------
# The two-phase API (notes/CONTRACTS.md, v3: the kernels skip the target column)
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def lse_partials(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    scale: float,
    normalize: bool,
    *,
    deterministic: bool = False,
    hard_negatives: Optional[tuple[torch.Tensor, float]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (max, Σ exp(logit − max)) over this weight's NON-TARGET classes, (B,) float32.

    logit_ij = scale·cos_ij for j ≠ labels_local[i]; a row with no such class gets (−inf, 0).
    Combine with the target logit in float64 via ``common.combine_partials``. The forward
    is deterministic either way; ``deterministic=True`` also pins the launch config.
    hard_negatives: optional (threshold (B,), t): negatives with cos > threshold_i enter as
    cos·(t + cos) (CurricularFace, the kernels' negative hook).
    """
    _check_inputs(embeddings, weight)
    x, w = _compute_operands(embeddings, weight)
    return _forward(
        x, w, inverse_norms(x, normalize), inverse_norms(w, normalize), labels_local, scale, deterministic,
        hard_negatives,
    )


@torch.no_grad()
def grads_from_lse(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    scale: float,
    normalize: bool,
    *,
    deterministic: bool = False,
    hard_negatives: Optional[tuple[torch.Tensor, float]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-target share of the gradients of Σ_i grad_rows_i·loss_i given the global ``lse`` (B,).

    d loss/d cos_ij = grad_rows_i·scale·exp(scale·cos_ij − lse_i) for j ≠ labels_local[i]
    (0 on the target column), then the chain rule through both normalisations. Returns
    (grad_embeddings (B, D) float32, grad_weight (C, D) weight.dtype); the embedding
    gradient is this weight's share (sum it over shards). Rows with grad_rows == 0
    contribute nothing. See the module docstring for ``deterministic``.
    """
    _check_inputs(embeddings, weight)
    x, w = _compute_operands(embeddings, weight)
    grad_x, grad_w = _backward(
        x, w, inverse_norms(x, normalize), inverse_norms(w, normalize), labels_local,
        lse, grad_rows, scale, normalize, deterministic, hard_negatives,
    )
    return grad_x, grad_w.to(weight.dtype)


# ----------------------------------------------------------------------------------------
# Single device: custom op + fake + autograd
# ----------------------------------------------------------------------------------------
def _hard_negatives(threshold: Optional[torch.Tensor], t: float):
    return None if threshold is None else (threshold, t)


def _owned(labels_local: torch.Tensor, num_classes: int) -> torch.Tensor:
    return (labels_local >= 0) & (labels_local < num_classes)


@torch.library.custom_op("marginkit::triton_margin_ce_rows", mutates_args=())
def _margin_ce_rows(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    target_logit: torch.Tensor,
    dtarget: torch.Tensor,
    scale: float,
    normalize: bool,
    deterministic: bool,
    hard_threshold: Optional[torch.Tensor] = None,
    curriculum_t: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses (B,) f64, lse (B,) f64, w_inv (C,) f32); losses are 0 on rows not owned.

    The loss of each row is combined in float64 from the fp32 non-target partials and
    s·ψ (``common.combine_partials``), so a 1e-7 loss is not rounded away.
    """
    _check_inputs(embeddings, weight)
    x, w = _compute_operands(embeddings, weight)
    w_inv = inverse_norms(w, normalize)
    row_max, row_sumexp = _forward(
        x, w, inverse_norms(x, normalize), w_inv, labels_local, scale, deterministic,
        _hard_negatives(hard_threshold, curriculum_t),
    )
    losses, lse = combine_partials(row_max, row_sumexp, target_logit, scale)
    owned = _owned(labels_local, weight.shape[0])
    return torch.where(owned, losses, torch.zeros_like(losses)), lse, w_inv


@_margin_ce_rows.register_fake
def _margin_ce_rows_fake(
    embeddings, weight, labels_local, target_logit, dtarget, scale, normalize, deterministic,
    hard_threshold=None, curriculum_t=0.0,
):
    num_rows, num_classes = embeddings.shape[0], weight.shape[0]
    return (
        embeddings.new_empty((num_rows,), dtype=torch.float64),
        embeddings.new_empty((num_rows,), dtype=torch.float64),
        weight.new_empty((num_classes,), dtype=torch.float32),
    )


@torch.library.custom_op("marginkit::triton_margin_ce_rows_backward", mutates_args=())
def _margin_ce_rows_backward(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    dtarget: torch.Tensor,
    losses: torch.Tensor,
    lse: torch.Tensor,
    w_inv: torch.Tensor,
    grad_rows: torch.Tensor,
    scale: float,
    normalize: bool,
    deterministic: bool,
    hard_threshold: Optional[torch.Tensor] = None,
    curriculum_t: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_embeddings in embeddings.dtype, grad_weight in weight.dtype) of Σ grad_rows·losses.

    Kernels: the non-target share. Then the target column's share per row in float64
    (g·s·(p_y − 1)·dψ, p_y − 1 = expm1(−loss)), added to the K distinct target rows of dW.
    """
    x, w = _compute_operands(embeddings, weight)
    grad_x, grad_w = _backward(
        x, w, inverse_norms(x, normalize), w_inv, labels_local, lse, grad_rows, scale, normalize, deterministic,
        _hard_negatives(hard_threshold, curriculum_t),
    )
    grad_w = grad_w.to(weight.dtype)
    with _torch_deterministic(deterministic):
        target_grad = target_gradient(losses, dtarget, grad_rows, scale)
        grad_x = apply_target_gradients(
            grad_x, grad_w, embeddings, weight, labels_local, target_grad, normalize, embeddings.dtype
        )
    return grad_x, grad_w


@_margin_ce_rows_backward.register_fake
def _margin_ce_rows_backward_fake(
    embeddings, weight, labels_local, dtarget, losses, lse, w_inv, grad_rows, scale, normalize, deterministic,
    hard_threshold=None, curriculum_t=0.0,
):
    return torch.empty_like(embeddings), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    embeddings, weight, labels_local, target_logit, dtarget, scale, normalize, deterministic, *hook = inputs
    losses, lse, w_inv = output
    ctx.save_for_backward(embeddings, weight, labels_local, dtarget, losses, lse, w_inv)
    ctx.scale, ctx.normalize, ctx.deterministic = scale, normalize, deterministic
    ctx.hook = hook  # [hard_threshold, curriculum_t] when given


def _autograd_backward(ctx, grad_losses, grad_lse, grad_w_inv):
    # lse and w_inv are saved auxiliaries of the loss layer, not differentiated through.
    embeddings, weight, labels_local, dtarget, losses, lse, w_inv = ctx.saved_tensors
    if grad_losses is None:
        grad_losses = torch.zeros_like(losses)
    owned = _owned(labels_local, weight.shape[0])
    grad_rows = torch.where(owned, grad_losses.to(torch.float32), torch.zeros_like(losses, dtype=torch.float32))
    grad_x, grad_w = _margin_ce_rows_backward(
        embeddings, weight, labels_local, dtarget, losses, lse, w_inv, grad_rows,
        ctx.scale, ctx.normalize, ctx.deterministic, *ctx.hook,
    )
    return (grad_x, grad_w) + (None,) * (6 + len(ctx.hook))


_margin_ce_rows.register_autograd(_autograd_backward, setup_context=_setup_context)


def row_losses(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target_logit: torch.Tensor,
    dtarget: torch.Tensor,
    scale: float,
    ignore_index: int,
    normalize: bool,
    deterministic: bool = False,
    *,
    hard_negatives: Optional[tuple[torch.Tensor, float]] = None,
) -> torch.Tensor:
    """Per-row margin cross-entropy (B,), 0 on ignored rows; differentiable in ``embeddings``
    and ``weight``. float32 (float64 for float64 inputs, like the torch backend).

    target_logit / dtarget (B,): ψ(cos θ_y) and dψ/dcos θ_y from the margin spec
    (non-differentiable; the target column's gradient g·s·(p_y − 1)·dψ is applied in the
    backward, in float64). Runs the ``marginkit::triton_margin_ce_rows`` custom op, so it
    traces under ``torch.compile(fullgraph=True)`` (tested on CPU with backend="aot_eager"
    under the interpreter; on CUDA the inductor backend calls the op as an opaque kernel).
    ``deterministic=True``: bitwise-reproducible gradients (see the module docstring).
    ``hard_negatives=(threshold (B,), t)``: CurricularFace's negative hook (see ``lse_partials``).
    """
    labels_local = owned_labels(labels, ignore_index)
    hook = () if hard_negatives is None else (hard_negatives[0].detach(), float(hard_negatives[1]))
    losses, _, _ = torch.ops.marginkit.triton_margin_ce_rows(
        embeddings, weight, labels_local, target_logit.detach(), dtarget.detach(),
        float(scale), bool(normalize), bool(deterministic), *hook,
    )
    return losses.to(compute_dtype(embeddings))
