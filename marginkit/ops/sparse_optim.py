"""Row-sparse torch.optim.SGD / AdamW steps on the given rows of a (C, D) weight (csrc: ops/sparse_optim.h)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from marginkit.errors import MarginKitTypeError, check_real
from marginkit.ops._library import (
    DTYPE_CODE, FLOAT_DTYPES, FLOAT_NAMES, Pointers, check_contiguous, check_device, check_tensor,
    compiled_op, entries, launch_args,
)


def _check_rows(rows: Tensor, num_rows: int) -> None:
    """rows: in [0, C) and distinct (one sync)."""
    if rows.numel() == 0:
        return
    s = torch.sort(rows).values
    flags = torch.stack([(s[0] < 0), (s[-1] >= num_rows), (s[1:] == s[:-1]).any()]).tolist()
    if flags[0] or flags[1]:
        bad = int(s[0]) if flags[0] else int(s[-1])
        raise ValueError(f"rows contains {bad}, outside [0, C) = [0, {num_rows})")
    if flags[2]:
        dup = s[1:][s[1:] == s[:-1]]
        raise ValueError(
            f"rows contains duplicates (e.g. {int(dup[0])}); each row may be updated at most once per step "
            "(sum the gradients of repeated rows first, e.g. with torch.Tensor.index_add_)"
        )


def _check_rows_common(weight, grad, rows, state):
    check_tensor("weight", weight, "(C, D)", 2, FLOAT_DTYPES, FLOAT_NAMES)
    check_tensor("rows", rows, "(R,)", 1, (torch.int64,), "int64")
    check_tensor("grad", grad, "(R, D)", 2, (weight.dtype,), f"{weight.dtype} (weight's dtype)")
    dev = weight.device
    check_device("grad", grad, dev, "weight")
    check_device("rows", rows, dev, "weight")
    check_contiguous("weight", weight)
    if grad.shape != (rows.shape[0], weight.shape[1]):
        raise ValueError(
            f"grad must have shape (R, D) = ({rows.shape[0]}, {weight.shape[1]}) (one row per entry of rows), "
            f"got {tuple(grad.shape)}"
        )
    for name, t in state:
        check_tensor(name, t, "(C, D)", 2, (weight.dtype,), f"{weight.dtype} (weight's dtype)")
        check_device(name, t, dev, "weight")
        if t.shape != weight.shape:
            raise ValueError(f"{name} must have weight's shape {tuple(weight.shape)}, got {tuple(t.shape)}")
        check_contiguous(name, t)


def _check_sgd(weight, grad, momentum_buffer, rows, lr, momentum, weight_decay, dampening, nesterov, initialized):
    _check_rows_common(weight, grad, rows, [("momentum_buffer", momentum_buffer)])
    check_real("lr", lr, low=0.0)
    check_real("momentum", momentum, low=0.0)
    check_real("weight_decay", weight_decay, low=0.0)
    check_real("dampening", dampening)
    if not isinstance(nesterov, bool):
        raise MarginKitTypeError(f"nesterov must be a bool, got {nesterov!r}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires a momentum > 0 and zero dampening (as torch.optim.SGD)")
    if initialized is not None:
        check_tensor("initialized", initialized, "(C,)", 1, (torch.bool, torch.uint8), "bool or uint8")
        check_device("initialized", initialized, weight.device, "weight")
        if initialized.shape[0] != weight.shape[0]:
            raise ValueError(f"initialized must have shape (C,) = ({weight.shape[0]},), got {tuple(initialized.shape)}")
        check_contiguous("initialized", initialized)


# No defaults in the schema: the dispatcher drops trailing arguments equal to their defaults, and
# torch <= 2.11's version bump then indexes the mutated `initialized` (position 9) past the end.
@compiled_op("sparse_sgd_step_", check=_check_sgd, mutates_args=("weight", "momentum_buffer", "initialized"))
def _sparse_sgd_op(
    weight: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    rows: Tensor,
    lr: float,
    momentum: float,
    weight_decay: float,
    dampening: float,
    nesterov: bool,
    initialized: Optional[Tensor],
) -> None:
    C, D = weight.shape
    _check_rows(rows, C)
    R = rows.shape[0]
    if R == 0 or D == 0:
        return
    init = initialized.view(torch.uint8) if initialized is not None else None
    p = Pointers()
    args = (p(weight), p(grad), p(momentum_buffer), p(init), p(rows), R, C, D, DTYPE_CODE[weight.dtype], float(lr),
            float(momentum), float(weight_decay), float(dampening), bool(nesterov))
    lib = entries(weight.device)
    if weight.device.type == "cpu":
        lib.sparse_sgd_step(*args)
    else:
        lib.sparse_sgd_step(*args, *launch_args(weight.device))


def sparse_sgd_step_(
    weight: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    rows: Tensor,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    initialized: Optional[Tensor] = None,
) -> None:
    """``torch.optim.SGD`` applied in place to ``weight[rows]`` only; other rows and their
    buffers do not move (bit-identical).

    ``grad[j]`` is the gradient of row ``rows[j]``; ``rows`` must be distinct (ValueError).
    Each row behaves as its own parameter: ``d = g + weight_decay * w``; with momentum,
    ``buf = momentum * buf + (1 - dampening) * d`` and ``d = d + momentum * buf`` (nesterov)
    or ``d = buf``; ``w -= lr * d``. ``momentum == 0`` leaves ``momentum_buffer`` untouched.

    First step: torch.optim.SGD sets ``buf = d`` the first time a parameter steps. With
    ``initialized`` ((C,) bool/uint8, e.g. zeros at the start) rows whose flag is 0 take
    ``buf = d`` exactly and get their flag set, which matches torch for any dampening.
    Without it the buffer is taken as already initialised (start it at zeros): with
    ``dampening == 0`` (the default) that is the same as torch's first step exactly.
    """
    _sparse_sgd_op(weight, grad, momentum_buffer, rows, lr, momentum, weight_decay, dampening, nesterov,
                   initialized)


def _check_adamw(weight, grad, exp_avg, exp_avg_sq, step, rows, lr, beta1, beta2, eps, weight_decay):
    _check_rows_common(weight, grad, rows, [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)])
    check_tensor("step", step, "(C,)", 1, (torch.int64,), "int64 (per-row step counts)")
    check_device("step", step, weight.device, "weight")
    if step.shape[0] != weight.shape[0]:
        raise ValueError(f"step must have shape (C,) = ({weight.shape[0]},), got {tuple(step.shape)}")
    check_contiguous("step", step)
    check_real("lr", lr, low=0.0)
    check_real("beta1", beta1, low=0.0, high=1.0, high_inclusive=False)
    check_real("beta2", beta2, low=0.0, high=1.0, high_inclusive=False)
    check_real("eps", eps, low=0.0)
    check_real("weight_decay", weight_decay, low=0.0)


def _check_steps_of_rows(step: Tensor, rows: Tensor) -> None:
    """CUDA only (the C++ CPU entry checks it itself): step[rows] in [0, 2**63 - 1), one sync."""
    s = step[rows]
    lo, hi = torch.stack([s.min(), s.max()]).tolist()
    if lo < 0 or hi >= 2**63 - 1:
        raise ValueError(f"step[rows] holds values in [{lo}, {hi}]; step counts must be in [0, 2**63 - 1)")


@compiled_op("sparse_adamw_step_", check=_check_adamw, mutates_args=("weight", "exp_avg", "exp_avg_sq", "step"))
def _sparse_adamw_op(
    weight: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    rows: Tensor,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> None:
    C, D = weight.shape
    _check_rows(rows, C)
    R = rows.shape[0]
    if R == 0:
        return
    if weight.device.type != "cpu":
        _check_steps_of_rows(step, rows)
    p = Pointers()
    args = (p(weight), p(grad), p(exp_avg), p(exp_avg_sq), p(step), p(rows), R, C, D, DTYPE_CODE[weight.dtype],
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay))
    lib = entries(weight.device)
    if weight.device.type == "cpu":
        lib.sparse_adamw_step(*args)
    else:
        lib.sparse_adamw_step(*args, *launch_args(weight.device))


def sparse_adamw_step_(
    weight: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    rows: Tensor,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> None:
    """``torch.optim.AdamW`` applied in place to ``weight[rows]`` only (amsgrad=False,
    maximize=False); other rows and their state do not move (bit-identical).

    ``step`` (C,) int64 holds per-row step counts (start at zeros, never negative); each
    selected row's count is incremented and its bias corrections use it, so a row that was
    sampled t times is exactly an AdamW parameter after t steps. ``rows`` must be distinct
    (ValueError).
    """
    _sparse_adamw_op(weight, grad, exp_avg, exp_avg_sq, step, rows, lr, beta1, beta2, eps, weight_decay)
