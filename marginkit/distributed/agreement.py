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

__all__ = ["FIELDS", "head_config", "config_digest", "field_digests", "mismatch_error", "check_agreement"]

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

# Digests fit in 20 bits where they ride on a float64 all-reduce (sum and sum of squares stay exact).
FLOAT_DIGEST_BITS = 20


def head_config(head) -> dict:
    """Field -> its value as text (repr), for every field of ``FIELDS``."""
    values = {name: getattr(head, name) for name in FIELDS if name != "dtype"}
    values["dtype"] = head.weight.dtype
    return {name: repr(values[name]) for name in FIELDS}


def _digest(text: str) -> int:
    """63-bit digest, the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def field_digests(config: dict) -> list:
    return [_digest(f"{name}={config[name]}") for name in FIELDS]


def config_digest(config: dict, bits: int = 63) -> int:
    """One digest of the whole configuration, ``bits`` wide."""
    return _digest("|".join(f"{name}={config[name]}" for name in FIELDS)) >> (63 - bits)


def mismatch_error(configs: Sequence[dict]) -> Optional[ValueError]:
    """The ValueError for the first field (in ``FIELDS`` order) on which some rank differs from
    rank 0, naming both values; None when all agree."""
    for name in FIELDS:
        for rank, config in enumerate(configs[1:], start=1):
            if config[name] != configs[0][name]:
                return ValueError(
                    f"PartitionedMarginSoftmax ranks disagree on {name}: rank 0 has {configs[0][name]}, "
                    f"rank {rank} has {config[name]}; build the head with the same arguments on every rank "
                    f"of the process group"
                )
    return None


def check_agreement(config: dict, group: Optional[dist.ProcessGroup], device: torch.device) -> None:
    """Raise the same ValueError on every rank when the ranks' configurations differ.

    One all-gather of len(FIELDS) int64 per rank; on a mismatch one all_gather_object of the
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
    raise mismatch_error(configs) or ValueError(
        "PartitionedMarginSoftmax ranks disagree on their configuration (digests differ); "
        "build the head with the same arguments on every rank"
    )
