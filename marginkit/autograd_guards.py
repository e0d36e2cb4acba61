"""Autograd guards: stateful heads under activation checkpointing, and double backward.

**Checkpointing** (``torch.utils.checkpoint``). A checkpointed function's forward runs again
during the backward to rebuild what it did not save. A head whose training forward moves running
state (IRSoftmax's centers, CurricularFace's t, AdaCos's scale, AdaFace's norm statistics, online
LDAM's counts, FairLoss's statistics, Partial FC's sampler step) would, run again, read the state
it already moved (the recomputed loss differs from the one whose gradient is wanted: measured
8–10 % off for IRSoftmax, 53 % for Partial FC) and, under the reentrant variant, move it a second
time. Such a forward refuses to run inside a backward, with a ``RuntimeError`` that says what to
do; stateless losses recompute exactly and are left alone.

**Double backward.** marginkit's backwards are hand-written and their results carry no graph: a
backward with ``create_graph=True`` through one raises instead of returning a gradient whose
penalty would silently contribute nothing.
"""

from __future__ import annotations

import torch

__all__ = ["recomputing", "refuse_recomputation", "refuse_double_backward"]


def recomputing() -> bool:
    """True while a forward runs inside the autograd engine's backward (a checkpoint recomputation)."""
    # private API (torch 2.11, 2.13); absent, or while dynamo traces, nothing is detected
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and not torch.compiler.is_compiling() and task() != -1


def refuse_recomputation(module: torch.nn.Module, state: str) -> None:
    """Raise ``RuntimeError`` if ``module``, whose training forward moves ``state``, is being recomputed."""
    if recomputing():
        raise RuntimeError(
            f"{type(module).__name__} moves its {state} in each training forward, and "
            "torch.utils.checkpoint ran that forward again during backward, where it would read the moved "
            "state (wrong gradients) and could move it twice. Call the head outside the checkpointed function "
            "(checkpoint the backbone only), or put it in eval mode (module.eval()) there"
        )


def refuse_double_backward() -> None:
    """Called first in every marginkit backward. Autograd runs a backward with grad mode on only under
    ``create_graph=True``, and marginkit's hand-written gradients are not differentiable themselves:
    a penalty on them would silently contribute nothing, so refuse instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "marginkit's losses are differentiable once: a backward with create_graph=True through them "
            "(double backward, a penalty on the loss's gradient) is not supported: leave create_graph off, or "
            "take the second-order term from mk.reference.margin_cross_entropy (it materialises the (B, C) logits)"
        )
