"""Per-class state that must see the global batch under torch.distributed.

IR-Softmax's centers and Fair Loss's window statistics are updated from the batch, not
by gradients, so DDP does not keep them in step: each rank would move them with its own
rows (or DDP's buffer broadcast would keep rank 0's and drop the rest). These helpers
gather the batch over a process group so that every rank applies the same update, in
the same order, with the same deterministic csrc ops: the state stays identical on every
rank and equals a single process's on the global batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from marginkit.distributed.collectives import all_gather_batch
from marginkit.distributed.sharding import group_size_and_rank

__all__ = ["check_sync_args", "sync_group", "global_batch", "broadcast_from_first_"]


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


def global_batch(embeddings: torch.Tensor, labels: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(all ranks' embeddings, labels) in rank order; the local ones without a group."""
    return all_gather_batch(embeddings.detach(), labels, group)


@torch.no_grad()
def broadcast_from_first_(tensors: Sequence[torch.Tensor], group) -> None:
    """Overwrite ``tensors`` on every rank with the group's first rank's values."""
    src = dist.get_global_rank(group, 0)
    for t in tensors:
        dist.broadcast(t, src=src, group=group)
