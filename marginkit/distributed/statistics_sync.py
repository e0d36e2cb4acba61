"""Per-class state that must see the global batch under torch.distributed.

IR-Softmax's centers and Fair Loss's window statistics are updated from the batch, not
by gradients, so DDP does not keep them in step: each rank would move them with its own
rows (or DDP's buffer broadcast would keep rank 0's and drop the rest). These helpers
gather the batch over a process group so that every rank applies the same update, in
the same order, with the same deterministic csrc ops: the state stays identical on every
rank and equals a single process's on the global batch.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from marginkit.distributed.agreement import check_agreement, tensor_digest
from marginkit.distributed.collectives import all_gather_batch
from marginkit.distributed.sharding import group_size_and_rank

__all__ = ["check_sync_args", "sync_group", "agree_once", "local_loss", "global_batch", "broadcast_from_first_"]


def check_sync_args(sync_statistics, process_group) -> None:
    if not isinstance(sync_statistics, bool):
        raise TypeError(f"sync_statistics must be a bool, got {sync_statistics!r}")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {process_group!r}")


def sync_group(sync_statistics: bool, process_group) -> Optional[dist.ProcessGroup]:
    """The group to gather over, or None: sync off, torch.distributed not initialised, or one rank."""
    if not sync_statistics:
        return None
    group, world, _ = group_size_and_rank(process_group)
    return group if world > 1 else None


def agree_once(module: torch.nn.Module, group, fields: dict, device: torch.device) -> None:
    """At the first synchronised training forward, the same ValueError on every rank if the ranks
    built ``module`` differently (``fields``: attribute -> value; tensors compared by digest):
    different arguments would otherwise make its state diverge silently, or its collectives hang."""
    if group is None or getattr(module, "_sync_agreed", False):
        return
    text = {name: repr(tensor_digest(v) if torch.is_tensor(v) else v) for name, v in fields.items()}
    check_agreement(text, group, device, type(module).__name__)
    module._sync_agreed = True


def local_loss(compute: Callable[[], torch.Tensor], group) -> tuple[Optional[torch.Tensor], Optional[Exception]]:
    """(loss, None), or with a group (None, the error) when ``compute`` rejects this rank's
    input: ``global_batch`` then raises it on every rank, so none waits in the all-gather."""
    if group is None:
        return compute(), None
    try:
        return compute(), None
    except (TypeError, ValueError) as err:
        return None, err


def global_batch(
    embeddings: torch.Tensor, labels: torch.Tensor, group, error: Optional[Exception] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(all ranks' embeddings, labels) in rank order; the local ones without a group.
    Raises on every rank when any rank's ``error`` is set (see ``local_loss``)."""
    return all_gather_batch(embeddings.detach() if error is None else embeddings, labels, group, error)


@torch.no_grad()
def broadcast_from_first_(tensors: Sequence[torch.Tensor], group) -> None:
    """Overwrite ``tensors`` on every rank with the group's first rank's values."""
    src = dist.get_global_rank(group, 0)
    for t in tensors:
        dist.broadcast(t, src=src, group=group)
