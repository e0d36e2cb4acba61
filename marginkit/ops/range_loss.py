"""Range loss (API.md ``RangeLoss``) as two custom ops with autograd (csrc: ops/range_loss.h).

``range_loss_forward`` returns the loss and what backward needs (row segments, selected pairs
and their coefficients, the closest pair of class means); ``range_loss_backward`` validates
those like any input, because it can be called by name.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from marginkit.autograd_guards import refuse_double_backward
from marginkit.errors import check_real
from marginkit.ops._library import (
    DTYPE_CODE, FLOAT_DTYPES, FLOAT_NAMES, Pointers, check_device, check_int, check_shape, check_tensor,
    compiled_op, cuda_available, entries, launch_args, lib_module, stable_sort, workspace,
)


def _selected_pair_slots(k: int, B: int) -> int:
    """Number of selected-pair slots: min(k, max pairs in the batch), at least 1."""
    return max(1, min(int(k), B * (B - 1) // 2))


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_forward(embeddings, labels, k, margin, alpha, beta) -> None:
    check_tensor("embeddings", embeddings, "(B, D)", 2, FLOAT_DTYPES, FLOAT_NAMES)
    check_tensor("labels", labels, "(B,)", 1, (torch.int64,), "int64 (use labels.long())")
    check_device("labels", labels, embeddings.device, "embeddings")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has B = {embeddings.shape[0]} rows")
    if embeddings.shape[1] == 0 and embeddings.shape[0]:
        raise ValueError(f"embeddings has shape {tuple(embeddings.shape)}: rows need D >= 1 features")
    check_int("k", k, low=1)
    check_real("margin", margin)
    check_real("alpha", alpha)
    check_real("beta", beta)
    k2 = _selected_pair_slots(k, embeddings.shape[0])
    if embeddings.device.type == "cuda" and cuda_available() and k2 > lib_module().cuda.range_loss_max_k():
        raise ValueError(f"k = {k} is larger than the CUDA kernel supports ({lib_module().cuda.range_loss_max_k()})")


def _fake_forward(embeddings, labels, k, margin, alpha, beta):
    B, D = embeddings.shape
    k2 = _selected_pair_slots(k, B)
    e = embeddings
    return (
        e.new_empty((), dtype=_loss_dtype(e.dtype)),
        e.new_empty((B,), dtype=torch.int64),
        e.new_empty((B, k2, 2), dtype=torch.int64),
        e.new_empty((B, k2), dtype=torch.float64),
        e.new_empty((4,), dtype=torch.int64),
        e.new_empty((D,), dtype=torch.float64),
    )


@compiled_op("range_loss_forward", check=_check_forward, fake=_fake_forward)
def _range_loss_forward_op(
    embeddings: Tensor, labels: Tensor, k: int, margin: float, alpha: float, beta: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, D = embeddings.shape
    k2 = _selected_pair_slots(k, B)
    dev = embeddings.device
    loss = torch.zeros((), dtype=_loss_dtype(embeddings.dtype), device=dev)
    row_seg = torch.empty(B, dtype=torch.int64, device=dev)
    sel_pairs = torch.empty(B, k2, 2, dtype=torch.int64, device=dev)
    sel_coef = torch.empty(B, k2, dtype=torch.float64, device=dev)
    closest = torch.empty(4, dtype=torch.int64, device=dev)
    inter_vec = torch.empty(D, dtype=torch.float64, device=dev)
    if B == 0:
        closest.copy_(torch.tensor([-1, -1, 0, 0]))
        inter_vec.zero_()
        return loss, row_seg, sel_pairs, sel_coef, closest, inter_vec
    sorted_labels, order = stable_sort(labels)
    lib = entries(dev)
    p = Pointers()
    args = (p(embeddings), DTYPE_CODE[embeddings.dtype], B, D, p(sorted_labels), p(order), k2, float(margin),
            float(alpha), float(beta), p(loss), p(row_seg), p(sel_pairs), p(sel_coef), p(closest), p(inter_vec))
    if dev.type == "cpu":
        lib.range_loss_forward(*args)
    else:
        ws = workspace(lib.range_loss_workspace_bytes(B, D, k2), dev)
        lib.range_loss_forward(*args, *launch_args(dev, ws))
    return loss, row_seg, sel_pairs, sel_coef, closest, inter_vec


def _check_backward(grad_loss, embeddings, row_seg, sel_pairs, sel_coef, closest, inter_vec) -> None:
    check_tensor("embeddings", embeddings, "(B, D)", 2, FLOAT_DTYPES, FLOAT_NAMES)
    B, D = embeddings.shape
    loss_dtype = _loss_dtype(embeddings.dtype)
    check_tensor("grad_loss", grad_loss, "()", 0, (loss_dtype,), f"{loss_dtype} (the loss's dtype)")
    check_tensor("row_seg", row_seg, "(B,)", 1, (torch.int64,), "int64")
    check_tensor("sel_pairs", sel_pairs, "(B, k2, 2)", 3, (torch.int64,), "int64")
    check_tensor("sel_coef", sel_coef, "(B, k2)", 2, (torch.float64,), "float64")
    check_tensor("closest", closest, "(4,)", 1, (torch.int64,), "int64")
    check_tensor("inter_vec", inter_vec, "(D,)", 1, (torch.float64,), "float64")
    k2 = sel_pairs.shape[1]
    if k2 < 1:
        raise ValueError(f"sel_pairs must have shape (B, k2, 2) with k2 >= 1, got {tuple(sel_pairs.shape)}")
    check_shape("row_seg", row_seg, (B,), "(B,)")
    check_shape("sel_pairs", sel_pairs, (B, k2, 2), "(B, k2, 2)")
    check_shape("sel_coef", sel_coef, (B, k2), "(B, k2)")
    check_shape("closest", closest, (4,), "(4,)")
    check_shape("inter_vec", inter_vec, (D,), "(D,)")
    for name, t in (("grad_loss", grad_loss), ("row_seg", row_seg), ("sel_pairs", sel_pairs),
                    ("sel_coef", sel_coef), ("closest", closest), ("inter_vec", inter_vec)):
        check_device(name, t, embeddings.device, "embeddings")
    if embeddings.device.type == "cuda" and cuda_available() and k2 > lib_module().cuda.range_loss_max_k():
        raise ValueError(f"sel_pairs has k2 = {k2} slots, more than the CUDA kernel supports")


def _check_saved_indices_on_device(row_seg: Tensor, sel_pairs: Tensor, closest: Tensor) -> None:
    """CUDA only (the C++ CPU entry checks these itself): index values in range, one sync."""
    B = row_seg.shape[0]
    ends = torch.stack([row_seg.min(), row_seg.max(), sel_pairs.min(), sel_pairs.max(),
                        closest[:2].min(), closest[:2].max()]).tolist()
    for name, (lo, hi), low in (("row_seg", ends[0:2], 0), ("sel_pairs", ends[2:4], -1), ("closest[:2]", ends[4:6], -1)):
        if lo < low or hi >= B:
            raise ValueError(f"{name} holds values in [{lo}, {hi}], outside [{low}, B) = [{low}, {B})")


@compiled_op("range_loss_backward", check=_check_backward,
             fake=lambda grad_loss, embeddings, *rest: torch.empty_like(embeddings, memory_format=torch.contiguous_format))
def _range_loss_backward_op(
    grad_loss: Tensor,
    embeddings: Tensor,
    row_seg: Tensor,
    sel_pairs: Tensor,
    sel_coef: Tensor,
    closest: Tensor,
    inter_vec: Tensor,
) -> Tensor:
    B, D = embeddings.shape
    dev = embeddings.device
    grad = torch.empty_like(embeddings, memory_format=torch.contiguous_format)
    if B == 0:
        return grad
    if dev.type != "cpu":
        _check_saved_indices_on_device(row_seg, sel_pairs, closest)
    k2 = sel_pairs.shape[1]
    lib = entries(dev)
    p = Pointers()  # keeps the contiguous copies of non-contiguous saved tensors alive
    args = (p(grad_loss), p(embeddings), DTYPE_CODE[embeddings.dtype], B, D, k2, p(row_seg), p(sel_pairs),
            p(sel_coef), p(closest), p(inter_vec), p(grad))
    if dev.type == "cpu":
        lib.range_loss_backward(*args)
    else:
        lib.range_loss_backward(*args, *launch_args(dev))
    return grad


def _setup_context(ctx, inputs, output):
    embeddings = inputs[0]
    _, row_seg, sel_pairs, sel_coef, closest, inter_vec = output
    ctx.save_for_backward(embeddings, row_seg, sel_pairs, sel_coef, closest, inter_vec)
    ctx.mark_non_differentiable(sel_coef, inter_vec)


def _backward(ctx, grad_loss, *unused):
    refuse_double_backward()
    embeddings, row_seg, sel_pairs, sel_coef, closest, inter_vec = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _range_loss_backward_op(grad_loss, embeddings, row_seg, sel_pairs, sel_coef, closest, inter_vec)
    return grad, None, None, None, None, None


_range_loss_forward_op.op.register_autograd(_backward, setup_context=_setup_context)


def range_loss(
    embeddings: Tensor, labels: Tensor, k: int = 2, margin: float = 1.0, alpha: float = 1.0, beta: float = 1.0
) -> Tensor:
    """Range loss (API.md ``RangeLoss``), differentiable with respect to ``embeddings``.

    Distances are squared Euclidean between the rows as given. For each class with >= 2 rows:
    its k' = min(k, pairs) largest pairwise distances d_1..d_k' (ties: lower row indices
    first); intra = sum over classes of k' / sum_j 1/d_j. Class means x_c of the classes
    present; inter = max(margin - min_{Q != R} ||x_Q - x_R||^2, 0), 0 with fewer than 2
    classes. Returns ``alpha * intra + beta * inter`` as a 0-d float32 tensor (float64 for
    float64 embeddings, so gradcheck works). Labels are group ids: any int64 values.

    Identical rows: if a selected distance is exactly 0, that class's term is its limit, 0,
    with zero gradient (no inf/NaN). The hinge has zero gradient when inactive (margin <= min
    distance); ties between equally close pairs of means: the first pair in label order.
    Backward flows through the selected distances and the closest pair of means. A NaN or inf in
    ``embeddings`` makes the loss and every gradient NaN, as torch's losses do.
    """
    loss = _range_loss_forward_op(embeddings, labels, k, margin, alpha, beta)[0]
    # The selection of the k largest distances skips NaN comparisons, which would drop a NaN row
    # silently. The factor is exactly 1 for finite input and NaN otherwise: NaN/inf propagate to
    # the loss and every gradient, without a host sync. Zeros are summed, not the rows, and the
    # factor is detached: a half sum of finite rows overflows (65504), and so does the loss cast to
    # half as the factor's gradient; either made a finite batch's loss or gradient NaN.
    if isinstance(embeddings, Tensor) and embeddings.is_floating_point() and embeddings.numel():
        loss = loss * (1.0 + (0.0 * embeddings.detach()).sum(dtype=loss.dtype))
    return loss
