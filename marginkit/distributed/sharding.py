"""Class sharding over the ranks of a process group.

Rank r of W owns the contiguous global classes ``shard_range(C, W, r) = (start, stop)``:
``C // W + (r < C % W)`` classes starting at ``C // W * r + min(r, C % W)`` (API.md). The
first ``C % W`` ranks hold one class more than the others, so no rank is ever more
than one class away from the mean.

Also here: the names of the per-class tensors that shard with the weight
(``PER_CLASS_STATE``) and the seeded initialisation that draws the same global weight at
any world size (``seeded_normal_rows``), so the head, its optimizers and its checkpoints
share them without importing each other.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.distributed as dist

from marginkit.errors import MarginKitTypeError

__all__ = [
    "PER_CLASS_STATE",
    "INIT_BLOCK_ROWS",
    "shard_range",
    "shard_sizes",
    "group_size_and_rank",
    "seeded_normal_rows",
]

# Per-class tensors a head may hold besides ``weight`` (first dimension = its classes).
# They reshard with the weight (full_state_dict / load_full_state_dict / DCP).
PER_CLASS_STATE = (
    "weight",
    "class_margins",
    "momentum_buffer",
    "momentum_initialized",
    "exp_avg",
    "exp_avg_sq",
    "adam_step",
)

# Rows of the seeded initialisation are drawn in blocks of this many global classes,
# each block from its own generator, so any shard draws the same values for its rows.
INIT_BLOCK_ROWS = 4096


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



def _mix(seed: int, k: int) -> int:
    """A 63-bit generator seed for block k (splitmix64-style mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + k * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


@torch.no_grad()
def seeded_normal_rows(
    start: int, stop: int, num_classes: int, dim: int, seed: int, std: float, device, dtype
) -> torch.Tensor:
    """Rows [start, stop) of a (num_classes, dim) normal(0, std) matrix defined by ``seed``.

    The matrix is drawn in blocks of ``INIT_BLOCK_ROWS`` global rows, block k from a
    generator seeded by (seed, k) on ``device``'s type, so the rows do not depend on how
    the classes are sharded: any world size builds the same global weight (for a given
    device type; CPU and CUDA generators give different streams). Returns (stop - start, dim).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.empty(stop - start, dim, dtype=dtype, device=device)
    if stop <= start or device.type == "meta":
        return out
    gen = torch.Generator(device=device)
    first, last = start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS
    for k in range(first, last + 1):
        b0 = k * INIT_BLOCK_ROWS
        b1 = min(b0 + INIT_BLOCK_ROWS, num_classes)
        gen.manual_seed(_mix(seed, k))
        block = torch.empty(b1 - b0, dim, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
        lo, hi = max(start, b0), min(stop, b1)
        out[lo - start : hi - start] = block[lo - b0 : hi - b0].to(dtype)
    return out
