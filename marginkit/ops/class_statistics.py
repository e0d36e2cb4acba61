"""Per-class statistics for adaptive margins, accumulated in place (csrc: ops/class_statistics_update.h)."""

from __future__ import annotations

import torch
from torch import Tensor

from marginkit.ops._library import (
    DTYPE_CODE, FLOAT_DTYPES, FLOAT_NAMES, Pointers, check_contiguous, check_device, check_int,
    check_labels_in_range, check_tensor, compiled_op, entries, launch_args, stable_sort, workspace,
)


def _check(counts, target_cos_sum, sq_dist_sum, embeddings, weight, labels, ignore_index):
    check_tensor("counts", counts, "(C,)", 1, (torch.int64,), "int64")
    check_tensor("target_cos_sum", target_cos_sum, "(C,)", 1, (torch.float64,), "float64")
    check_tensor("sq_dist_sum", sq_dist_sum, "(C,)", 1, (torch.float64,), "float64")
    check_tensor("embeddings", embeddings, "(B, D)", 2, FLOAT_DTYPES, FLOAT_NAMES)
    check_tensor("weight", weight, "(C, D)", 2, FLOAT_DTYPES, FLOAT_NAMES)
    check_tensor("labels", labels, "(B,)", 1, (torch.int64,), "int64 (use labels.long())")
    dev = weight.device
    for name, t in (("counts", counts), ("target_cos_sum", target_cos_sum), ("sq_dist_sum", sq_dist_sum),
                    ("embeddings", embeddings), ("labels", labels)):
        check_device(name, t, dev, "weight")
    C, D = weight.shape
    for name, t in (("counts", counts), ("target_cos_sum", target_cos_sum), ("sq_dist_sum", sq_dist_sum)):
        if t.shape[0] != C:
            raise ValueError(f"{name} must have shape (C,) = ({C},) like weight's rows, got {tuple(t.shape)}")
        check_contiguous(name, t)
    if embeddings.shape[1] != D:
        raise ValueError(f"embeddings has D = {embeddings.shape[1]} columns but weight has D = {D}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has B = {embeddings.shape[0]} rows")
    check_int("ignore_index", ignore_index)


@compiled_op(
    "class_statistics_update_", check=_check, mutates_args=("counts", "target_cos_sum", "sq_dist_sum")
)
def _class_statistics_update_op(
    counts: Tensor,
    target_cos_sum: Tensor,
    sq_dist_sum: Tensor,
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
) -> None:
    C, D = weight.shape
    check_labels_in_range(labels, C, ignore_index)
    B = embeddings.shape[0]
    if B == 0:
        return
    sorted_labels, order = stable_sort(labels)
    lib = entries(weight.device)
    p = Pointers()
    args = (p(counts), p(target_cos_sum), p(sq_dist_sum), C, p(embeddings), DTYPE_CODE[embeddings.dtype],
            p(weight), DTYPE_CODE[weight.dtype], B, D, p(sorted_labels), p(order), int(ignore_index))
    if weight.device.type == "cpu":
        lib.class_statistics_update(*args)
    else:
        ws = workspace(lib.class_statistics_update_workspace_bytes(B, D), weight.device)
        lib.class_statistics_update(*args, *launch_args(weight.device, ws))


def class_statistics_update_(
    counts: Tensor,
    target_cos_sum: Tensor,
    sq_dist_sum: Tensor,
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
) -> None:
    """Accumulate per-class statistics in place (no autograd), for adaptive margins.

    With ``x^ = normalize(x_i)`` and ``w^ = normalize(weight[c])`` (``F.normalize``), for every
    row i with label c != ``ignore_index``::

        counts[c] += 1;  target_cos_sum[c] += x^ . w^;  sq_dist_sum[c] += ||x^ - w^||^2

    Mean target cosine = target_cos_sum / counts; spread = sq_dist_sum / counts. Sums are
    float64, per class in label-sorted order (deterministic).

    Args: counts (C,) int64; target_cos_sum, sq_dist_sum (C,) float64 (all contiguous);
    embeddings (B, D), weight (C, D) float32/float16/bfloat16/float64; labels (B,) int64.
    """
    _class_statistics_update_op(counts, target_cos_sum, sq_dist_sum, embeddings, weight, labels, ignore_index)
