"""Checkpoints of a :class:`PartitionedMarginSoftmax` that reshard to any world size.

Two routes, both carrying every per-class tensor (``weight``, ``class_margins``, the
row-sparse optimizers' ``momentum_buffer``/``momentum_initialized``/``exp_avg``/
``exp_avg_sq``/``adam_step``) plus the Partial FC ``sample_step`` and ``seed`` (so a head
built with another seed resumes the same sampling stream) and, in DCP checkpoints, the
head's configuration as text (``head.config()``):

* **Full** (small heads; files any tool can read): ``head.full_state_dict()`` gives the
  global tensors on every rank (one broadcast per rank and tensor, so the head's device
  holds at most one extra shard; pass ``device="cpu"`` to collect in host memory);
  ``head.load_full_state_dict(sd)`` takes the local rows at any world size without
  communication.
* **Sharded** (any size; nothing is ever gathered on one rank):
  ``save_sharded(head, path)`` / ``load_sharded(head, path)`` through
  ``torch.distributed.checkpoint`` (DCP). Each per-class tensor is described to DCP as a
  row-sharded tensor with *global* row offsets (``shard_range``), so DCP's planner reads
  exactly the overlapping row ranges when the world size changes. ``head.sharded_state_dict()``
  is the same state for a user's own ``dcp.save``/``dcp.load`` call next to the backbone's.

The sharded route uses ``torch.distributed._shard.ShardedTensor`` as the carrier:
DCP handles its arbitrary per-rank offsets natively, while DTensor's ``Shard(0)``
placement assumes ``torch.chunk`` boundaries, which differ from ``shard_range``'s
(e.g. C = 10, W = 4: chunk gives 3, 3, 3, 1 and shard_range 3, 3, 2, 2). Torch marks
ShardedTensor as deprecated; the warning is silenced inside these helpers.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Union

import torch
import torch.distributed as dist

from marginkit.distributed import collectives as coll
from marginkit.distributed.agreement import FIELDS, tensor_digest
from marginkit.distributed.sharding import PER_CLASS_STATE, shard_range

__all__ = ["gather_full_state", "load_full_state", "sharded_state", "save_sharded", "load_sharded"]

_PLAIN_STATE = ("sample_step", "seed", "config")


@contextlib.contextmanager
def _quiet_sharded_tensor():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShardedTensor.*")
        warnings.filterwarnings("ignore", message=".*_shard.*deprecat.*")
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


@torch.no_grad()
def gather_full_state(head, device: Optional[Union[torch.device, str]] = None) -> dict:
    """See :meth:`PartitionedMarginSoftmax.full_state_dict`."""
    device = torch.device(device) if device is not None else head.weight.device
    group, world, rank = head._group, head.world_size, head.rank
    out = {}
    for name in head.per_class_names():
        local = getattr(head, name).detach()
        if group is None:
            out[name] = local.to(device, copy=True)
            continue
        pieces = []
        for r in range(world):
            start, stop = shard_range(head.num_classes, world, r)
            if stop == start:
                continue
            piece = coll.broadcast_rows(local, r, stop - start, group, rank)
            pieces.append(piece.to(device, copy=piece is local))
        out[name] = torch.cat(pieces) if pieces else local.to(device, copy=True)
    if head.sample_rate < 1.0:  # the Partial FC step counter, so sampling resumes where it was
        out["sample_step"] = head.sample_step.detach().to(device, copy=True)
        out["seed"] = torch.tensor(head.seed, dtype=torch.int64, device=device)
    return out


@torch.no_grad()
def load_full_state(head, state_dict: dict, strict: bool = True) -> None:
    """See :meth:`PartitionedMarginSoftmax.load_full_state_dict`."""
    per_class = PER_CLASS_STATE
    if strict:
        unknown = sorted(set(state_dict) - set(per_class) - set(_PLAIN_STATE))
        if unknown:
            raise ValueError(f"unexpected keys in the full state dict: {unknown}")
        missing = [n for n in head.per_class_names() if n not in state_dict]
        if missing:
            raise ValueError(f"missing keys in the full state dict: {missing}")
    if "weight" not in state_dict:
        raise ValueError("the full state dict has no 'weight'")
    start, stop = head.class_start, head.class_stop
    for name, value in state_dict.items():
        if name in per_class:
            if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[0] != head.num_classes:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} must hold all C = {head.num_classes} classes along dim 0, got {shape}")
            if name == "weight" and value.shape[1:] != head.weight.shape[1:]:
                raise ValueError(f"weight must have shape (C, D) = ({head.num_classes}, {head.embedding_dim}), "
                                 f"got {tuple(value.shape)}")
            rows = value[start:stop]
            if name == "class_margins":  # the ranks compare the whole tensor's digest
                head.class_margins_digest = tensor_digest(value)
            current = getattr(head, name, None)
            if current is None:
                head.register_per_class_buffer(name, rows.to(head.weight.device, copy=True))
            else:
                if current.shape != rows.shape:
                    raise ValueError(f"{name}: expected rows of shape {tuple(current.shape[1:])}, got {tuple(rows.shape[1:])}")
                current.copy_(rows)
        elif name == "seed":
            head.seed = int(value)
        elif name == "config":
            continue
        elif name in _PLAIN_STATE:
            getattr(head, name).copy_(value)


def _as_sharded(local: torch.Tensor, head):
    from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards

    global_size = [head.num_classes, *local.shape[1:]]
    shards = []
    if local.shape[0]:
        meta = ShardMetadata(
            shard_offsets=[head.class_start] + [0] * (local.dim() - 1),
            shard_sizes=list(local.shape),
            # the global rank: a subgroup's rank r is not global rank r unless it is ranks 0..n-1
            placement=f"rank:{head.rank if head._group is None else dist.get_global_rank(head._group, head.rank)}"
                      f"/{local.device}",
        )
        shards.append(Shard(local, meta))
    return init_from_local_shards(shards, global_size, process_group=head._group)


def sharded_state(head) -> dict:
    """See :meth:`PartitionedMarginSoftmax.sharded_state_dict`."""
    out = {}
    with _quiet_sharded_tensor():
        for name in head.per_class_names():
            local = getattr(head, name).detach()
            out[name] = local if head._group is None else _as_sharded(local, head)
    out["sample_step"] = head.sample_step
    out["seed"] = torch.tensor(head.seed, dtype=torch.int64)
    out["config"] = {name: value for name, value in head.config().items() if name in FIELDS}
    return out


def _dcp_kwargs(head) -> dict:
    if head._group is None:
        return {"no_dist": True}
    return {"process_group": head._group}


def save_sharded(head, checkpoint_id) -> None:
    """Save the head with ``torch.distributed.checkpoint`` (every rank calls it; each rank
    writes its own rows with their global offsets; nothing is gathered)."""
    import torch.distributed.checkpoint as dcp

    with _quiet_sharded_tensor():
        dcp.save(sharded_state(head), checkpoint_id=checkpoint_id, **_dcp_kwargs(head))


@torch.no_grad()
def load_sharded(head, checkpoint_id) -> None:
    """Load a checkpoint written by :func:`save_sharded` at any world size, in place.

    Each rank reads only the row ranges of the saved shards that overlap its own classes.
    Per-class optimizer state present in the checkpoint but not yet in the head is
    created (so a row-sparse optimizer built afterwards picks it up).
    """
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    if "weight" not in metadata:
        raise ValueError(f"{checkpoint_id} holds no 'weight'")
    for name in PER_CLASS_STATE:
        if name not in metadata:
            continue
        md = metadata[name]
        size = tuple(md.size)
        if size[0] != head.num_classes:
            raise ValueError(f"{name} in {checkpoint_id} has {size[0]} classes, the head has {head.num_classes}")
        current = getattr(head, name, None)
        if current is not None and (size[1:] != tuple(current.shape[1:]) or md.properties.dtype != current.dtype):
            # checked here: DCP would raise a CheckpointException (a BaseException) with the cause buried
            raise ValueError(
                f"{name} in {checkpoint_id} has shape {size} and dtype {md.properties.dtype}; the head's is "
                f"{(head.num_classes, *current.shape[1:])} {current.dtype} (built with another embedding_dim or dtype?)"
            )
        if getattr(head, name, None) is None:
            head.register_per_class_buffer(
                name, torch.zeros((head.num_local, *size[1:]), dtype=md.properties.dtype, device=head.weight.device)
            )
    state = {k: v for k, v in sharded_state(head).items() if k in metadata}
    missing = [k for k in head.per_class_names() if k not in metadata]
    if missing:
        raise ValueError(f"{checkpoint_id} lacks {missing}, which this head holds")
    seed = state.get("seed")
    if seed is not None:
        state["seed"] = seed = torch.zeros((), dtype=torch.int64)
    if "config" in state:
        state["config"] = dict(state["config"])
    with _quiet_sharded_tensor():
        dcp.load(state, checkpoint_id=checkpoint_id, **_dcp_kwargs(head))
    if seed is not None:
        head.seed = int(state["seed"])
    if "class_margins" in state:  # every rank read the same checkpoint (whatever path it was given)
        head.class_margins_digest = "from a sharded checkpoint"
    if head._group is None:  # plain tensors may have been replaced rather than filled
        for name, value in state.items():
            if name in ("seed", "config"):
                continue
            current = getattr(head, name)
            if value is not current and isinstance(value, torch.Tensor):
                current.copy_(value)
