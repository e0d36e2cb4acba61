"""Ranks that must agree: the partitioned head's configuration, checked across the group.

Ranks built with different arguments would silently train differently (scale, margin,
seed...) or make gloo abort the process (D, dtype: the gathered rows have another size).
The first forward all-gathers one 63-bit digest per field (``FIELDS``); afterwards one
digest of the whole configuration rides on a collective the step runs anyway. On a
mismatch every rank gathers the configurations as text (error path only) and raises the
same ``ValueError`` naming the field and both values.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from marginkit.distributed.collectives import all_gather_small

__all__ = [
    "FIELDS", "COMPARED_ONLY", "head_config", "tensor_digest", "config_digest", "field_digests", "mismatch_error", "check_agreement",
]

#: What every rank of a partitioned head must share, in the order errors report them.
FIELDS = (
    "num_classes",
    "embedding_dim",
    "dtype",
    "margin",
    "scale",
    "sample_rate",
    "reduction",
    "ignore_index",
    "seed",
    "normalize",
    "max_local_batch",
    "grad_reduce_dtype",
    "interclass_filtering_threshold",
)
#: Compared across ranks too, but not recorded in checkpoints' ``config`` (checkpoints saved before
#: they were compared lack them, and loading a sharded state dict must not ask for them).
COMPARED_ONLY = ("grad_scale", "class_margins")

# Digests fit in 20 bits where they ride on a float64 all-reduce (sum and sum of squares stay exact).
FLOAT_DIGEST_BITS = 20


def head_config(head) -> dict:
    """Field -> its value as text (repr), for every field of ``FIELDS`` and ``COMPARED_ONLY``.
    ``class_margins``: the digest of the whole (C,) tensor the head was given (each rank keeps
    only its slice)."""
    names = FIELDS + COMPARED_ONLY
    values = {name: getattr(head, name) for name in names if name not in ("dtype", "class_margins")}
    values["dtype"] = head.weight.dtype
    values["class_margins"] = head.class_margins_digest
    return {name: repr(values[name]) for name in names}


def tensor_digest(t: torch.Tensor) -> str:
    """A short digest of a tensor's values (float64 bytes, host copy): equal on every rank iff the values are."""
    values = t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return hashlib.blake2b(values, digest_size=8).hexdigest()


def _digest(text: str) -> int:
    """63-bit digest, the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def field_digests(config: dict) -> list:
    return [_digest(f"{name}={value}") for name, value in config.items()]


def config_digest(config: dict, bits: int = 63) -> int:
    """One digest of the whole configuration, ``bits`` wide."""
    return _digest("|".join(f"{name}={value}" for name, value in config.items())) >> (63 - bits)


def mismatch_error(configs: Sequence[dict], module: str = "PartitionedMarginSoftmax") -> Optional[ValueError]:
    """The ValueError for the first field (in the configs' order, ``FIELDS`` for the head) on which
    some rank differs from rank 0, naming both values; None when all agree."""
    for name in configs[0]:
        for rank, config in enumerate(configs[1:], start=1):
            if config.get(name) != configs[0][name]:
                return ValueError(
                    f"{module} ranks disagree on {name}: rank 0 has {configs[0][name]}, "
                    f"rank {rank} has {config.get(name)}; build the module with the same arguments on every rank "
                    f"of the process group"
                )
    return None


def check_agreement(
    config: dict, group: Optional[dist.ProcessGroup], device: torch.device, module: str = "PartitionedMarginSoftmax"
) -> None:
    """Raise the same ValueError on every rank when the ranks' configurations (field -> text) differ.

    One all-gather of len(config) int64 per rank; on a mismatch one all_gather_object of the
    configurations' text (the error path only), so every rank names the same field and values.
    """
    if group is None:
        return
    world = dist.get_world_size(group)
    mine = torch.tensor(field_digests(config), dtype=torch.int64, device=device)
    table = all_gather_small(mine, world, group)
    if bool((table == table[0]).all()):  # first forward only: one sync, by design
        return
    configs: list = [None] * world
    dist.all_gather_object(configs, config, group=group)
    raise mismatch_error(configs, module) or ValueError(
        f"{module} ranks disagree on their configuration (digests differ); "
        "build the module with the same arguments on every rank"
    )
