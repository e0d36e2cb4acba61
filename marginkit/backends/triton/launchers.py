"""Every Triton kernel bound to its launch settings: tile configs (GPU) or the interpreter's fixed
meta, the autotuning key, the pruning limits. One ``KernelLauncher`` per kernel variant; the
passes (passes.py, target_column.py) only call them.
"""

from __future__ import annotations

from marginkit.backends.triton.configs import (
    FMA_FWD_CONFIGS,
    FMA_GEMM_CONFIGS,
    FMA_SCORES_CONFIGS,
    DW_CONFIGS,
    FWD_CONFIGS,
    FWD_STORE_CONFIGS,
    GEMM_CONFIGS,
    INTERPRETER_META,
    PROJECT_CONFIGS,
    ROW_CONFIGS,
    SCORES_CONFIGS,
    SCORES_TMA_CONFIGS,
    STORED_CONFIGS,
)
from marginkit.backends.triton.launch import KernelLauncher
from marginkit.triton_kernels import (
    dw_gemm_kernel,
    dx_gemm_kernel,
    lse_merge_kernel,
    lse_partials_kernel,
    masked_mean_backward_kernel,
    masked_mean_kernel,
    project_weight_rows_kernel,
    row_inv_norm_kernel,
    scores_kernel,
    stored_to_workspace_kernel,
    target_backward_kernel,
    target_terms_kernel,
)

__all__ = [
    "FWD", "FWD_STORE", "SCORES", "DX", "DW", "STORED", "PROJECT", "ROW_NORMS", "MERGE", "TARGET_TERMS",
    "TARGET_BACKWARD", "MASKED_MEAN", "MASKED_MEAN_BACKWARD",
]

#: The tiles of X and W when they come through TMA descriptors (forward and recompute).
_XW_DESCRIPTORS = {"x_desc": ("BLOCK_B", "BLOCK_K"), "w_desc": ("BLOCK_C", "BLOCK_K")}
_FWD_SHAPE = dict(
    interp_meta=INTERPRETER_META["fwd"],
    tiles=("BLOCK_B", "BLOCK_C", "BLOCK_K"),
    limits={"BLOCK_B": lambda a: a["B"], "BLOCK_K": lambda a: a["D"]},
)
FWD = KernelLauncher(
    lse_partials_kernel, FWD_CONFIGS, FMA_FWD_CONFIGS, key=["D", "B_BUCKET", "MODULATE"], descriptors=_XW_DESCRIPTORS,
    **_FWD_SHAPE,
)
#: The same kernel with STORE=True (memory-budget mode): its own tile set and tuning. No TMA set: with
#: descriptors its picked tile's epilogue grows from 16.5 to 26.4 SASS instructions per element (sm_90a).
FWD_STORE = KernelLauncher(
    lse_partials_kernel, FWD_STORE_CONFIGS, FMA_FWD_CONFIGS, key=["D", "B_BUCKET", "MODULATE", "STORE"], **_FWD_SHAPE
)
SCORES = KernelLauncher(
    scores_kernel, SCORES_CONFIGS, FMA_SCORES_CONFIGS,
    key=["D", "B_BUCKET", "MODULATE", "NORMALIZE", "COLSUM_MMA"],  # the two column sums may want different tiles
    interp_meta=INTERPRETER_META["scores"],
    tiles=("BLOCK_B", "BLOCK_C", "BLOCK_K"),
    limits={"BLOCK_K": lambda a: a["D"]},
    descriptors=_XW_DESCRIPTORS,
    tma_configs=SCORES_TMA_CONFIGS,
)
DX = KernelLauncher(
    dx_gemm_kernel, GEMM_CONFIGS, FMA_GEMM_CONFIGS,
    key=["D", "B_BUCKET", "USE_ATOMICS"],
    interp_meta=INTERPRETER_META["dx"],
    tiles=("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    limits={"BLOCK_M": lambda a: a["B"], "BLOCK_N": lambda a: a["D"]},
    restore_value=["out_ptr"],  # accumulates across chunks: tuning runs must not add
    descriptors={"a_desc": ("BLOCK_M", "BLOCK_K"), "b_desc": ("BLOCK_K", "BLOCK_N")},  # E[:, :n_chunk], W
)
# The memory-budget mode's bandwidth kernels: one config each, always launched pinned.
STORED = KernelLauncher(
    stored_to_workspace_kernel, STORED_CONFIGS, STORED_CONFIGS, key=[], interp_meta=INTERPRETER_META["stored"],
    tiles=("BLOCK_B", "BLOCK_C", "BLOCK_C"),
)
PROJECT = KernelLauncher(
    project_weight_rows_kernel, PROJECT_CONFIGS, PROJECT_CONFIGS, key=[], interp_meta=INTERPRETER_META["project"],
    tiles=("BLOCK_M", "BLOCK_D", "BLOCK_D"),
)
#: The per-row kernels: one config, tiles from the call site (cached-handle launches).
ROW_NORMS = KernelLauncher(
    row_inv_norm_kernel, ROW_CONFIGS, ROW_CONFIGS, key=[], interp_meta={}, tiles=("BLOCK_N", "BLOCK_N", "BLOCK_D")
)
MERGE = KernelLauncher(lse_merge_kernel, ROW_CONFIGS, ROW_CONFIGS, key=[], interp_meta={}, tiles=("BLOCK", "BLOCK", "BLOCK"))
DW = KernelLauncher(
    dw_gemm_kernel, DW_CONFIGS, FMA_GEMM_CONFIGS,
    key=["D", "B_BUCKET", "NORMALIZE"],
    interp_meta=INTERPRETER_META["dw"],
    tiles=("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    limits={"BLOCK_K": lambda a: a["B"], "BLOCK_N": lambda a: a["D"]},
    # E[:, :n_chunk] in (K, M) tiles, transposed in shared memory; X in (K, N)
    descriptors={"a_desc": ("BLOCK_K", "BLOCK_M"), "b_desc": ("BLOCK_K", "BLOCK_N")},
)
#: The target column's per-row kernels (target_column.py).
TARGET_TERMS = KernelLauncher(
    target_terms_kernel, ROW_CONFIGS, ROW_CONFIGS, key=[], interp_meta={}, tiles=("BLOCK_B", "BLOCK_B", "BLOCK_D")
)
TARGET_BACKWARD = KernelLauncher(
    target_backward_kernel, ROW_CONFIGS, ROW_CONFIGS, key=[], interp_meta={}, tiles=("BLOCK_D", "BLOCK_D", "BLOCK_D")
)
#: The 'mean' reduction over the rows that take part (reduction.py): one program each.
MASKED_MEAN = KernelLauncher(
    masked_mean_kernel, ROW_CONFIGS, ROW_CONFIGS, key=[], interp_meta={}, tiles=("BLOCK", "BLOCK", "BLOCK")
)
MASKED_MEAN_BACKWARD = KernelLauncher(
    masked_mean_backward_kernel, ROW_CONFIGS, ROW_CONFIGS, key=[], interp_meta={}, tiles=("BLOCK", "BLOCK", "BLOCK")
)
