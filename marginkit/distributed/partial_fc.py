"""Row-sparse optimizers for a Partial FC head (``PartitionedMarginSoftmax(sample_rate < 1)``).

With Partial FC only the sampled rows of ``.weight`` take part in a step, and only they
must move: a dense ``torch.optim.SGD`` would still decay every row (weight decay) and
keep pushing rows along their old momentum. These optimizers update exactly the rows
the head's backward touched since the last step (every row after a dense step), with
the csrc ops ``sparse_sgd_step_`` / ``sparse_adamw_step_``; the other rows and their
optimizer state stay bit-for-bit as they were. Each row behaves as its own
``torch.optim.SGD`` / ``AdamW`` parameter that is stepped only when sampled.

Wiring::

    head = mk.PartitionedMarginSoftmax(C, D, mk.ArcFace(), 64.0, sample_rate=0.1)
    opt_backbone = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_head = mk.distributed.PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in loader:
        loss = head(backbone(x), y)
        loss.backward()
        opt_backbone.step(); opt_head.step()
        opt_backbone.zero_grad(); opt_head.zero_grad()

Do not also give ``head.weight`` to another optimizer. Both are ``torch.optim.Optimizer``
subclasses (LR schedulers work on them). Their per-row state lives in the head as
per-class buffers (``momentum_buffer`` + ``momentum_initialized``; ``exp_avg``,
``exp_avg_sq``, ``adam_step``), so it is saved and resharded with the weight by
``full_state_dict`` / ``save_sharded``; the optimizer's own ``state_dict()`` holds only
the hyper-parameters.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from marginkit.distributed.partitioned import PartitionedMarginSoftmax
from marginkit.errors import check_real
from marginkit.ops import sparse_adamw_step_, sparse_sgd_step_

__all__ = ["PartialFCSGD", "PartialFCAdamW"]


def _check_head(head) -> None:
    if not isinstance(head, PartitionedMarginSoftmax):
        raise TypeError(f"expected a PartitionedMarginSoftmax, got {type(head).__name__}")


class _RowSparseOptimizer(torch.optim.Optimizer):
    def __init__(self, head, defaults: dict) -> None:
        _check_head(head)
        super().__init__([head.weight], defaults)
        if len(self.param_groups) != 1:  # pragma: no cover - defensive
            raise ValueError("a row-sparse optimizer takes exactly one head")
        self.head = head

    # torch.optim.Optimizer pickles only defaults, state and param_groups: keep the head too,
    # so copy.deepcopy / pickle give an optimizer that steps (its copy of the head).
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["head"] = self.head
        return state

    def __setstate__(self, state: dict) -> None:
        # torch's load_state_dict also goes through here, with no head in the state: keep ours.
        head = state.pop("head", None) or getattr(self, "head", None)
        super().__setstate__(state)
        self.head = head

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.head.take_updated_rows()

    def _rows_and_grad(self):
        weight = self.head.weight
        rows = self.head.take_updated_rows()
        grad = weight.grad
        if grad is None or rows.numel() == 0:
            return None, None
        if grad.is_sparse:  # sparse_grad=True: the gradient's own rows (summed if repeated)
            grad = grad.coalesce()
            rows = grad.indices()[0].contiguous()
            return rows, grad.values().to(weight.dtype).contiguous()
        return rows, grad.index_select(0, rows).to(weight.dtype).contiguous()

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rows, grad = self._rows_and_grad()
        if rows is not None:
            self._update_rows(rows, grad, self.param_groups[0])
        return loss

    def _update_rows(self, rows: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        """Apply the update to ``head.weight[rows]`` given their gradient rows (R, D)."""
        raise NotImplementedError


class PartialFCSGD(_RowSparseOptimizer):
    """``torch.optim.SGD`` on the rows of ``head.weight`` that the last backward(s) reached.

    Args as ``torch.optim.SGD`` (``lr``, ``momentum``, ``dampening``, ``weight_decay``,
    ``nesterov``). With every row sampled (``sample_rate=1``) it is SGD on the whole
    weight.
    """

    def __init__(
        self,
        head,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        check_real("lr", lr, low=0.0)
        check_real("momentum", momentum, low=0.0)
        check_real("weight_decay", weight_decay, low=0.0)
        check_real("dampening", dampening)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires a momentum > 0 and zero dampening")
        super().__init__(
            head, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        )
        self._ensure_state()

    def _ensure_state(self) -> None:
        if self.param_groups[0]["momentum"] > 0:
            w = self.head.weight
            self.head.register_per_class_buffer("momentum_buffer", torch.zeros_like(w, memory_format=torch.contiguous_format))
            self.head.register_per_class_buffer(
                "momentum_initialized", torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
            )

    def _update_rows(self, rows, grad, g):
        weight = self.head.weight.detach()
        if g["momentum"] > 0:
            self._ensure_state()
            sparse_sgd_step_(
                weight, grad, self.head.momentum_buffer, rows, float(g["lr"]), float(g["momentum"]),
                float(g["weight_decay"]), float(g["dampening"]), bool(g["nesterov"]),
                initialized=self.head.momentum_initialized,
            )
        else:  # no state: the same element-wise ops as torch.optim.SGD, on the rows only
            p = weight.index_select(0, rows)
            d = grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else grad
            p.add_(d, alpha=-g["lr"])
            weight.index_copy_(0, rows, p)


class PartialFCAdamW(_RowSparseOptimizer):
    """``torch.optim.AdamW`` (amsgrad=False) on the rows the last backward(s) reached.

    Per-row step counts (``head.adam_step``) drive the bias corrections, so a row sampled
    t times is exactly an AdamW parameter after t steps.
    """

    def __init__(self, head, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        check_real("lr", lr, low=0.0)
        check_real("eps", eps, low=0.0)
        check_real("weight_decay", weight_decay, low=0.0)
        for b in betas:
            check_real("betas", b, low=0.0, high=1.0, high_inclusive=False)
        super().__init__(head, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        w = head.weight
        head.register_per_class_buffer("exp_avg", torch.zeros_like(w, memory_format=torch.contiguous_format))
        head.register_per_class_buffer("exp_avg_sq", torch.zeros_like(w, memory_format=torch.contiguous_format))
        head.register_per_class_buffer("adam_step", torch.zeros(w.shape[0], dtype=torch.int64, device=w.device))

    def _update_rows(self, rows, grad, g):
        h = self.head
        sparse_adamw_step_(
            h.weight.detach(), grad, h.exp_avg, h.exp_avg_sq, h.adam_step, rows, float(g["lr"]),
            float(g["betas"][0]), float(g["betas"][1]), float(g["eps"]), float(g["weight_decay"]),
        )
