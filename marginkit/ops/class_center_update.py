"""IR-Softmax class-center update, in place (csrc: ops/class_center_update.h)."""

from __future__ import annotations

import torch
from torch import Tensor

from marginkit.errors import check_real
from marginkit.ops._library import (
    DTYPE_CODE, FLOAT_DTYPES, FLOAT_NAMES, Pointers, check_contiguous, check_device, check_int,
    check_labels_in_range, check_tensor, compiled_op, entries, launch_args, stable_sort, workspace,
)


def _check(centers, embeddings, labels, momentum, ignore_index):
    check_tensor("centers", centers, "(C, D)", 2, (torch.float32,), "float32")
    check_tensor("embeddings", embeddings, "(B, D)", 2, FLOAT_DTYPES, FLOAT_NAMES)
    check_tensor("labels", labels, "(B,)", 1, (torch.int64,), "int64 (use labels.long())")
    check_device("embeddings", embeddings, centers.device, "centers")
    check_device("labels", labels, centers.device, "centers")
    if embeddings.shape[1] != centers.shape[1]:
        raise ValueError(
            f"embeddings has D = {embeddings.shape[1]} columns but centers has D = {centers.shape[1]}"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has B = {embeddings.shape[0]} rows")
    check_contiguous("centers", centers)
    check_real("momentum", momentum, low=0.0, high=1.0)
    check_int("ignore_index", ignore_index)


@compiled_op("class_center_update_", check=_check, mutates_args=("centers",))
def _class_center_update_op(
    centers: Tensor, embeddings: Tensor, labels: Tensor, momentum: float, ignore_index: int = -100
) -> None:
    C, D = centers.shape
    check_labels_in_range(labels, C, ignore_index)
    B = embeddings.shape[0]
    if B == 0 or D == 0:
        return
    sorted_labels, order = stable_sort(labels)
    lib = entries(centers.device)
    p = Pointers()
    args = (p(centers), C, D, p(embeddings), DTYPE_CODE[embeddings.dtype], B, p(sorted_labels), p(order),
            float(momentum), int(ignore_index))
    if centers.device.type == "cpu":
        lib.class_center_update(*args)
    else:
        ws = workspace(lib.class_center_update_workspace_bytes(B, D), centers.device)
        lib.class_center_update(*args, *launch_args(centers.device, ws))


def class_center_update_(
    centers: Tensor, embeddings: Tensor, labels: Tensor, momentum: float, ignore_index: int = -100
) -> None:
    """IR-Softmax center update, in place (no autograd).

    For every class c present in the batch (rows whose label is ``ignore_index`` skipped)::

        centers[c] = normalize(momentum * centers[c] + (1 - momentum) * mean_{i: y_i = c} normalize(x_i))

    ``normalize(v) = v / max(||v||, 1e-12)`` (``F.normalize``). Classes absent from the batch
    are untouched. Deterministic: rows are summed per class in label-sorted (stable) order.

    Args: centers (C, D) float32, contiguous; embeddings (B, D) float32/float16/bfloat16/float64;
    labels (B,) int64 in [0, C) or ``ignore_index``; momentum in [0, 1].
    """
    _class_center_update_op(centers, embeddings, labels, momentum, ignore_index)
