"""Stateful heads under activation checkpointing (``torch.utils.checkpoint``).

A checkpointed function's forward runs again during the backward to rebuild what it did not
save. A head whose training forward moves running state (IRSoftmax's centers, CurricularFace's
t, AdaCos's scale, AdaFace's norm statistics, online LDAM's counts, FairLoss's statistics, Partial
FC's sampler step) would, run again, read the state it already moved (the recomputed loss differs
from the one whose gradient is wanted: measured 8–10 % off for IRSoftmax, 53 % for Partial FC) and,
under the reentrant variant, move it a second time. Such a forward refuses to run inside a
backward, with a ``RuntimeError`` that says what to do; stateless losses recompute exactly and
are left alone.
"""

from __future__ import annotations

import torch

__all__ = ["recomputing", "refuse_recomputation"]


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
