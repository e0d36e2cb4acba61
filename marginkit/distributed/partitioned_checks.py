"""Input checks of the partitioned head that every rank must answer alike.

A rank's bad input must raise the same typed error on every rank, never leave the others
waiting in a collective. Two ways, chosen by the head's ``max_local_batch``:

* sizes exchanged (default): one all-gather of a few int64 per rank (local batch size,
  error kind, configuration digest, embedding dtype code, first out-of-range label), read on the host: the error
  is raised at once on every rank. One host sync per step.
* declared maximum M: nothing is read on the host during the step. A rank that rejects its
  own input sends poison labels in its rows and raises at once; out-of-range labels are
  found in the gathered labels on the device and their rows ignored; a digest mismatch is
  found in the all-reduce. The step's device-side record is copied to pinned host memory
  without blocking and read at the *next* call, where every rank raises the same error
  (the event was recorded a whole step earlier, so waiting on it costs nothing). A step
  with a rejected input or a digest mismatch has zero loss and gradients on every rank (an
  optimizer step the other ranks take on it still applies momentum and weight decay).
"""

from __future__ import annotations

from typing import Optional

import torch

from marginkit.distributed import collectives as coll
from marginkit.distributed.agreement import check_agreement
from marginkit.distributed.partitioned_step import LOWEST_SENT_LABEL, POISON, RECORD_FIELDS
from marginkit.errors import MarginKitTypeError, check_memory_budget
from marginkit.validation import HALF_DTYPES, label_error, out_of_range

__all__ = ["local_problem", "exchange_sizes", "DeferredRecord", "raise_kind", "raise_recorded", "POISON"]

OK, VALUE_ERROR, TYPE_ERROR = coll.OK, coll.VALUE_ERROR, coll.TYPE_ERROR


def raise_kind(kind: int, message: str):
    raise (ValueError if kind == VALUE_ERROR else MarginKitTypeError)(message)


def local_problem(head, x, labels, input_dtype: Optional[torch.dtype]) -> tuple[int, int, str]:
    """(local batch size, error kind, message) from shapes, dtypes and devices only (no values),
    and the head's ``memory_budget`` (settable after construction; ranks may differ in it).

    ``input_dtype``: the embeddings' dtype the ranks agreed on at the first call (None before).
    """
    w = head.weight
    if not isinstance(x, torch.Tensor):
        return 0, TYPE_ERROR, f"local_embeddings must be a torch.Tensor of shape (B, D), got {type(x).__name__}"
    b = x.shape[0] if x.dim() >= 1 else 0
    if x.dim() != 2:
        return b, VALUE_ERROR, f"local_embeddings must have shape (B, D), got shape {tuple(x.shape)}"
    if x.shape[1] != head.embedding_dim:
        return b, VALUE_ERROR, (
            f"embedding_dim mismatch: local_embeddings have D = {x.shape[1]} but the head has D = {head.embedding_dim}"
        )
    master = w.dtype == torch.float32 and x.dtype in HALF_DTYPES  # fp32 master weights, half compute
    if x.dtype != w.dtype and not master:
        return b, TYPE_ERROR, (
            f"local_embeddings dtype {x.dtype} differs from the head's weight dtype {w.dtype} (allowed: the same "
            f"dtype, or float16/bfloat16 embeddings with a float32 weight); cast one to match"
        )
    if input_dtype is not None and x.dtype != input_dtype:
        return b, TYPE_ERROR, (
            f"local_embeddings dtype {x.dtype} differs from {input_dtype}, the dtype every rank used at the first "
            f"call (max_local_batch is set: the rows on the wire have a fixed size)"
        )
    if x.device != w.device:
        return b, TYPE_ERROR, f"local_embeddings are on {x.device} but the head's weight is on {w.device}"
    if not isinstance(labels, torch.Tensor):
        return b, TYPE_ERROR, f"local_labels must be a torch.Tensor of shape (B,), got {type(labels).__name__}"
    if labels.dim() != 1 or labels.shape[0] != b:
        return b, VALUE_ERROR, f"local_labels must have shape (B,) = ({b},), got shape {tuple(labels.shape)}"
    if labels.dtype != torch.int64:
        return b, TYPE_ERROR, f"local_labels must be int64 (torch.long), got {labels.dtype}; use labels.long()"
    if labels.device != w.device:
        return b, TYPE_ERROR, f"local_labels are on {labels.device} but the head's weight is on {w.device}"
    if head.max_local_batch is not None and b > head.max_local_batch:
        return b, VALUE_ERROR, (
            f"local batch of {b} rows exceeds max_local_batch = {head.max_local_batch}; raise max_local_batch "
            f"or split the batch"
        )
    try:
        check_memory_budget(head.memory_budget)
    except (TypeError, ValueError) as err:  # MarginKitTypeError is both: TypeError first
        return b, TYPE_ERROR if isinstance(err, TypeError) else VALUE_ERROR, str(err)
    return b, OK, ""


def exchange_sizes(head, x, labels, problem: tuple[int, int, str], digest: int, config: dict) -> list:
    """Every rank's local batch size (host list); raises the same error on every rank when any
    rank's input is bad, the ranks' configuration digests differ, or their embedding dtypes do.

    One all-gather of 6 int64 per rank, read on the host (one sync); on the error path one
    broadcast of the message (``coll.raise_first_error``) or one all_gather_object (configs).
    """
    b, kind, msg = problem
    device = head.weight.device
    first_bad = torch.zeros(2, dtype=torch.int64, device=device)
    if kind == OK and b:
        bad = out_of_range(labels, head.num_classes, head.ignore_index)
        first = labels.gather(0, bad.to(torch.int8).argmax().reshape(1))
        first_bad = torch.cat([bad.any().to(torch.int64).reshape(1), first])
    dtype_code = coll.DTYPE_CODES.get(x.dtype, -1) if kind == OK else -1
    meta = torch.cat([torch.tensor([b, kind, digest, dtype_code], dtype=torch.int64, device=device), first_bad])
    if head._group is None:
        table = meta[None].cpu()
    else:
        table = coll.all_gather_small(meta, head.world_size, head._group).cpu()
    rows = table.tolist()
    if head._group is None:
        if kind != OK:
            raise_kind(kind, msg)
    else:
        coll.raise_first_error([r[1] for r in rows], msg, head._group, device)
        if len({r[2] for r in rows}) != 1:
            check_agreement(config, head._group, device)
        mismatch = coll.dtype_mismatch_error("local_embeddings", [r[3] for r in rows])
        if mismatch is not None:
            raise mismatch
    for rank, r in enumerate(rows):
        if r[4]:
            error = label_error(r[5], head.num_classes, head.ignore_index)
            raise error if head._group is None else ValueError(f"rank {rank} of {len(rows)}: {error}")
    return [r[0] for r in rows]


class DeferredRecord:
    """A step's device-side record (``RECORD_FIELDS``), read by the host one call later."""

    def __init__(self) -> None:
        self._host: Optional[torch.Tensor] = None
        self._event = None

    def put(self, record: torch.Tensor) -> None:
        if record.is_cuda:
            host = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
            host.copy_(record, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._host = host
        else:  # the CPU twin of the CUDA path: the values are on the host already
            self._host, self._event = record.detach(), None

    def take(self) -> Optional[dict]:
        """The last record as a dict (None when there is none), and forget it."""
        if self._host is None:
            return None
        if self._event is not None:
            self._event.synchronize()  # recorded a step ago: complete, waits for nothing
        values = self._host.numpy().tolist()  # a host array: no device read
        self._host = self._event = None
        return dict(zip(RECORD_FIELDS, values))


def raise_recorded(head, record: Optional[dict]) -> None:
    """Raise (on every rank alike: the record comes from gathered data) what the previous
    step found: a rejected input, a configuration mismatch, or an out-of-range label."""
    if record is None:
        return
    world = head.world_size
    if record["poisoned"]:
        kind = record["poison_kind"]
        raise_kind(kind, (
            f"rank {record['poison_rank']} of {world} rejected its input at the previous call "
            f"({'ValueError' if kind == VALUE_ERROR else 'TypeError'}; that rank raised it at once); that step's "
            f"loss and gradients were zero on every rank, but an optimizer step the other ranks took on it (they "
            f"learn of it only now) applied momentum and weight decay to the rows it reached, as torch.optim does "
            f"on a zero gradient"
        ))
    if record["digest_mismatch"]:
        check_agreement(head.config(), head._group, head.weight.device)
        raise ValueError("PartitionedMarginSoftmax ranks disagreed on their configuration at the previous call")
    if record["bad_label"]:
        value = record["bad_value"]
        shown = f"{value} or less (a NaN or inf cast to int64 is {POISON})" if value == LOWEST_SENT_LABEL else None
        error = label_error(value, head.num_classes, head.ignore_index, shown)
        raise ValueError(f"{error} (found at the previous call; its rows were ignored)")
