"""Triton kernels of marginkit, installed as ``marginkit.triton_kernels``.

Kernels only: launch shapes, grids, dtype rules and autotuning live in
``marginkit.backends.triton``.
"""

from .margin_ce import (
    dw_gemm_kernel,
    dx_gemm_kernel,
    lse_merge_kernel,
    lse_partials_kernel,
    row_inv_norm_kernel,
    scores_kernel,
)
from .stored_logits import project_weight_rows_kernel, stored_to_workspace_kernel
from .row_reduction import masked_mean_backward_kernel, masked_mean_kernel
from .target_column import target_backward_kernel, target_terms_kernel

__all__ = [
    "row_inv_norm_kernel",
    "lse_partials_kernel",
    "lse_merge_kernel",
    "scores_kernel",
    "dx_gemm_kernel",
    "dw_gemm_kernel",
    "stored_to_workspace_kernel",
    "project_weight_rows_kernel",
    "target_terms_kernel",
    "target_backward_kernel",
    "masked_mean_kernel",
    "masked_mean_backward_kernel",
]
