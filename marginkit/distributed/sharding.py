"""Class sharding over the ranks of a process group.

Rank r of W owns the contiguous global classes ``shard_range(C, W, r) = (start, stop)``:
``C // W + (r < C % W)`` classes starting at ``C // W * r + min(r, C % W)`` (API.md). The
first ``C % W`` ranks hold one class more than the others, so no rank is ever more
than one class away from the mean.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch.distributed as dist

from marginkit.errors import MarginKitTypeError

__all__ = ["shard_range", "shard_sizes", "group_size_and_rank"]


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MarginKitTypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    return int(value)


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The global classes ``[start, stop)`` that ``rank`` owns when ``num_classes`` classes
    are split over ``world_size`` ranks.

    Rank r holds ``C // W + (r < C % W)`` classes starting at ``C // W * r + min(r, C % W)``;
    the ranges of ranks 0..W-1 tile [0, C) in order. With C < W the last ``W - C`` ranks
    get empty ranges ``(C, C)``.

    Raises:
        MarginKitTypeError (a TypeError and a ValueError): an argument is not an int (bools
            are refused).
        ValueError: ``num_classes < 0``, ``world_size < 1``, or ``rank`` outside
            ``[0, world_size)``.

    >>> [shard_range(103, 4, r) for r in range(4)]
    [(0, 26), (26, 52), (52, 78), (78, 103)]
    """
    num_classes = _check_int("num_classes", num_classes)
    world_size = _check_int("world_size", world_size)
    rank = _check_int("rank", rank)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_sizes(num_classes: int, world_size: int) -> list[int]:
    """Number of classes of every rank, in rank order."""
    return [stop - start for start, stop in (shard_range(num_classes, world_size, r) for r in range(world_size))]


def group_size_and_rank(process_group: Optional[dist.ProcessGroup]) -> tuple[Optional[dist.ProcessGroup], int, int]:
    """(group, world size, rank) of ``process_group`` (None: the default world).

    Without an initialised default group (plain single-process use) this is (None, 1, 0)
    and no collective is ever issued.
    """
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1, 0
        process_group = dist.group.WORLD
    elif not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("a process_group was given but torch.distributed is not initialised")
    return process_group, dist.get_world_size(process_group), dist.get_rank(process_group)

