"""The target column's float64 per-row work on the Triton backend, one launch each way.

``target_rows`` (a custom op, so ``torch.compile`` traces it): the label range check on the
device, cos θ_y, ψ and dψ/dcos for a spec with an additive-angle form (``MarginSpec.angle_form``),
where ``_pipeline.target_terms`` + the label check take ~40 small torch ops. ``apply_target_column``:
the backward's finish of dX and the target share of both gradients (``common.apply_target_gradients``
and the chain rule of x̂ in ~45 ops). Each is one kernel of ``triton_kernels/target_column.py``.
The torch versions stay the reference and serve the torch backend and the partitioned head.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from marginkit.backends.common import NORM_EPS
from marginkit.backends.triton.configs import pow2_at_least
from marginkit.backends.triton.launch import INTERPRETED, cdiv, device_guard
from marginkit.backends.triton.launchers import TARGET_BACKWARD, TARGET_TERMS
from marginkit.cuda_graphs import keep_for_replays, refuse_cold_capture
from marginkit.specs import COS_CLAMP, AngleForm

__all__ = ["target_rows", "apply_target_column"]

#: Rows per program of the forward kernel (a gather-dot of BLOCK_B × D in float64).
TERMS_BLOCK_ROWS = 16

def _constants(device: torch.device, m2: float, m3: float) -> torch.Tensor:
    """``_made_constants``, kept alive past the cache's eviction when a CUDA graph captures it."""
    return keep_for_replays(_made_constants(device, m2, m3))


@functools.lru_cache(maxsize=64)
def _made_constants(device: torch.device, m2: float, m3: float) -> torch.Tensor:
    """The kernel's float64 constants (6,), made once per device and margin, read only. On CUDA the
    copy leaves pinned memory without blocking: a margin schedule (a new m every step) adds no sync."""
    refuse_cold_capture("Making the target column's float64 margin constants")  # a pinned copy: not capturable
    values = [m2, math.cos(m2), math.sin(m2), m3, 1.0 - COS_CLAMP, NORM_EPS]
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.float64, device=device)
    return torch.tensor(values, dtype=torch.float64, pin_memory=True).to(device, non_blocking=True)


@torch.library.custom_op("marginkit::triton_target_rows", mutates_args=())
def _target_rows(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    row_margins: Optional[torch.Tensor],
    ignore_index: int,
    normalize: bool,
    m2: float,
    m3: float,
    angle: bool,
    fallback: int,
    row_margin_slot: int,
    straight_through: bool,
    check_labels: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_rows, dim = embeddings.shape
    device = embeddings.device
    labels_local = torch.empty(num_rows, dtype=torch.int64, device=device)
    psi = torch.empty(num_rows, dtype=torch.float64, device=device)
    dpsi = torch.empty(num_rows, dtype=torch.float64, device=device)
    cos = torch.empty(num_rows, dtype=torch.float64, device=device)
    flag = torch.full((2,), ignore_index, dtype=torch.int64, device=device)
    if num_rows == 0:
        return labels_local, psi, dpsi, cos, flag
    slot = row_margin_slot if row_margins is not None else 0
    labels = labels.contiguous()  # the kernel reads (B,) vectors at unit stride (no op when they are)
    row_margins = row_margins.contiguous() if slot else psi
    with device_guard(embeddings):
        TARGET_TERMS(
            (cdiv(num_rows, TERMS_BLOCK_ROWS),),
            embeddings, weight, labels, row_margins, labels_local, psi, dpsi, cos, flag,
            num_rows, weight.shape[0], dim, ignore_index,
            embeddings.stride(0), embeddings.stride(1), weight.stride(0), weight.stride(1),
            _constants(device, float(m2), float(m3)),
            BLOCK_B=TERMS_BLOCK_ROWS, BLOCK_D=min(pow2_at_least(dim), 64 if INTERPRETED else 128),
            NORMALIZE=bool(normalize), ANGLE=bool(angle), FALLBACK=int(fallback), ROW_MARGIN=slot,
            STRAIGHT_THROUGH=bool(straight_through), CHECK_LABELS=bool(check_labels), pinned=True,
        )
    return labels_local, psi, dpsi, cos, flag


@_target_rows.register_fake
def _target_rows_fake(embeddings, weight, labels, row_margins, ignore_index, normalize, m2, m3, angle, fallback,
                      row_margin_slot, straight_through, check_labels):
    num_rows = embeddings.shape[0]
    f64 = dict(dtype=torch.float64)
    return (labels.new_empty((num_rows,), dtype=torch.int64), embeddings.new_empty((num_rows,), **f64),
            embeddings.new_empty((num_rows,), **f64), embeddings.new_empty((num_rows,), **f64),
            labels.new_empty((2,), dtype=torch.int64))


def target_rows(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    form: AngleForm,
    row_margins: Optional[torch.Tensor],
    normalize: bool,
    check_labels: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels_local (B,) int64, ψ, dψ/dcos, cos θ_y (B,) float64, flag (2,) int64), one launch.

    embeddings (B, D), weight (C, D) as ``row_losses`` takes them; labels (B,) raw, with
    ``ignore_index``. labels_local is the label where it lies in [0, C), else −1 (ignored, or out
    of range: such a row is left out like an ignored one); ψ, dψ, cos are 0 there. row_margins (B,)
    replace the form's ``row_margin_slot`` term. With ``check_labels``, flag holds the (min, max)
    over ignore_index and the out-of-range labels (both ignore_index when none is), else
    [ignore_index, ignore_index].
    """
    with torch.no_grad():  # constants of the loss (dψ enters the backward by hand): no autograd record
        return torch.ops.marginkit.triton_target_rows(
            embeddings, weight, labels, row_margins, int(ignore_index), bool(normalize), form.m2, form.m3, form.angle,
            form.fallback, form.row_margin_slot, form.straight_through, bool(check_labels),
        )


def apply_target_column(
    grad_raw: torch.Tensor,
    kappa: torch.Tensor,
    grad_weight: Optional[torch.Tensor],
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    losses: torch.Tensor,
    dtarget: torch.Tensor,
    grad_rows: torch.Tensor,
    scale: float,
    normalize: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The finished embedding gradient (B, D) in ``out_dtype``; the target share added into ``grad_weight``.

    grad_raw (B, D) fp32: the kernels' κ-scaled dX before the chain rule of x̂ (``passes.backward``
    with ``finish_grad_x=False``); kappa (1,) fp32. losses, dtarget (B,) float64: the forward's loss
    and dψ/dcos; grad_rows (B,): d(output)/d loss, 0 on rows not here. Per row in float64:
    dx = (G/κ − x̂ (x̂·G/κ)) + g·s·expm1(−loss)·dψ·(ŵ − x̂ cos)/‖x‖; each class's rows summed in
    float64 and added to its dW row once (rows grouped by a stable sort: no atomics, deterministic).
    """
    num_rows, dim = embeddings.shape
    grad_x = torch.empty((num_rows, dim), dtype=out_dtype, device=embeddings.device)
    if num_rows == 0:
        return grad_x
    classes, order = torch.sort(labels_local, stable=True)
    dw = grad_weight if grad_weight is not None else grad_x
    with device_guard(embeddings):
        TARGET_BACKWARD(
            (num_rows,),
            embeddings, weight, grad_raw, kappa, classes, order, losses, dtarget, grad_rows, grad_x, dw,
            num_rows, weight.shape[0], dim, float(scale), NORM_EPS,
            embeddings.stride(0), embeddings.stride(1), weight.stride(0), weight.stride(1),
            grad_raw.stride(0), grad_x.stride(0), dw.stride(0),
            BLOCK_D=pow2_at_least(dim), NORMALIZE=bool(normalize), WEIGHT_GRAD=grad_weight is not None, pinned=True,
        )
    return grad_x
