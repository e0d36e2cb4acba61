"""The Triton backend: fused margin cross-entropy kernels for CUDA (and the interpreter).

Protocol (``marginkit.backends``): ``lse_partials`` and ``grads_from_lse`` (passes.py: the
non-target share over one weight), ``row_losses`` (ops.py: custom ops with autograd; the
target column in float64), and the optional ``target_rows`` (target_column.py: the label check
and the target terms of a spec with an ``angle_form`` in one launch), and the optional ``mean_loss``
(reduction.py: reduction='mean' over the rows that take part, one launch each way). Also ``inverse_norms`` and ``tuning`` (launch overrides for tests
and benchmarks). Files: configs.py (autotuning tiles and pruning), launch.py (launcher,
cached compiled handles, launch-shape rules), launchers.py (each kernel with its configs), passes.py,
target_column.py, budget.py, ops.py; kernels in
``marginkit.triton_kernels``. fp32, fp16, bf16, and fp32 master weights with fp16/bf16
embeddings; float64 inputs are computed in float32 kernels. The design and its trade-offs:
docs/triton_backend.md; measured numbers: notes/PERF.md.
"""

from marginkit.backends.triton.launch import INTERPRETED, WORKSPACE_BYTES, tuning
from marginkit.backends.triton.ops import row_losses
from marginkit.backends.triton.passes import grads_from_lse, inverse_norms, lse_partials
from marginkit.backends.triton.reduction import mean_loss
from marginkit.backends.triton.target_column import target_rows

#: the backward turns the stored exp-scaled logits into dS in place: a second backward must recompute
STORE_SURVIVES_BACKWARD = False

__all__ = [
    "lse_partials", "grads_from_lse", "row_losses", "target_rows", "mean_loss", "inverse_norms", "tuning", "INTERPRETED",
    "WORKSPACE_BYTES", "STORE_SURVIVES_BACKWARD",
]
