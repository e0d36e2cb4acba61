"""The few collectives the partitioned head needs, for NCCL (GPU) and gloo (CPU tests).

Every helper is a no-op without a process group (``group is None``: torch.distributed not
initialised); a one-rank group still runs the collectives. Tensors of any dtype
travel as raw bytes where the payload mixes dtypes or the backend may lack the dtype
(gloo and bfloat16/bool), so one code path serves every input dtype.

Uneven row counts (local batches, class shards) are padded to the largest count (or a
declared maximum), exchanged with one equal-size collective and trimmed with one indexed
copy: NCCL's all-gather and reduce-scatter want equal blocks. (Class shards differ by at
most one row.)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from marginkit.errors import FLOAT_DTYPES, MarginKitTypeError

__all__ = [
    "is_nccl",
    "padded_positions",
    "all_gather_padded",
    "all_gather_rows",
    "to_padded_layout",
    "PendingRows",
    "reduce_scatter_padded",
    "sum_rows_to_owner",
    "all_reduce_",
    "all_gather_small",
    "all_gather_batch",
    "error_kind",
    "raise_first_error",
    "broadcast_rows",
    "to_byte_rows",
    "from_byte_rows",
    "DTYPE_CODES",
    "dtype_mismatch_error",
]

#: Floating dtypes as int64 codes, for exchanging them in a small all-gather.
DTYPE_CODES = {dtype: code for code, dtype in enumerate(FLOAT_DTYPES)}


def dtype_mismatch_error(what: str, codes: Sequence[int]) -> Optional[MarginKitTypeError]:
    """The error for ranks whose ``what`` dtypes (``DTYPE_CODES``, one per rank) differ; None if they agree."""
    if len(set(codes)) == 1:
        return None
    names = {v: k for k, v in DTYPE_CODES.items()}
    return MarginKitTypeError(
        f"{what} dtype differs between ranks: {[str(names.get(c)) for c in codes]}; "
        f"use one dtype (and one autocast setting) on every rank"
    )


# The single-tensor collectives (named *_single since torch 2.13, *_into_tensor /
# *_tensor before). NCCL and gloo (recent torch) run both; where a backend lacks one
# it refuses synchronously on every rank alike, and the list form / all-reduce is used.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_UNSUPPORTED = (RuntimeError, NotImplementedError, ValueError)


def _unsupported(err: Exception, group) -> bool:
    """A backend's refusal of an op it lacks (not a communication failure)."""
    return not is_nccl(group) and "support" in str(err).lower()


def is_nccl(group: Optional[dist.ProcessGroup]) -> bool:
    if group is None:
        return False
    try:
        return "nccl" in str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError):  # pragma: no cover - exotic groups
        return False


def to_byte_rows(t: torch.Tensor) -> torch.Tensor:
    """(n, ...) tensor of any dtype -> (n, bytes_per_row) uint8 view/copy."""
    n = t.shape[0]
    row_bytes = t.element_size()
    for s in t.shape[1:]:
        row_bytes *= s
    if n == 0 or row_bytes == 0:
        return torch.empty((n, row_bytes), dtype=torch.uint8, device=t.device)
    flat = t.detach().contiguous()
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.reshape(-1).view(torch.uint8).reshape(n, row_bytes)


def from_byte_rows(b: torch.Tensor, dtype: torch.dtype, row_shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_byte_rows`."""
    n = b.shape[0]
    if b.numel() == 0:
        return torch.empty((n, *row_shape), dtype=dtype, device=b.device)
    b = b.contiguous().reshape(-1)
    if dtype == torch.bool:
        return b.view(torch.bool).reshape(n, *row_shape)
    return b.view(dtype).reshape(n, *row_shape)


def padded_positions(sizes: torch.Tensor, block_rows: int) -> torch.Tensor:
    """Row of each gathered row in the padded layout (vectorised: no per-rank loop).

    ``sizes`` (W,) int64 on the host (callers hold them there already): rows of every rank;
    the padded layout gives rank r the rows ``[r·block_rows, r·block_rows + sizes[r])``.
    Returns (sum(sizes),) int64 on the host; move it to the data's device.
    """
    ends = torch.cumsum(sizes, 0)
    rows = torch.arange(int(ends[-1]))
    rank_of_row = torch.searchsorted(ends, rows, right=True)
    return rank_of_row * block_rows + rows - (ends - sizes).index_select(0, rank_of_row)


def all_gather_padded(t: torch.Tensor, block_rows: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Every rank's (block_rows, ...) tensor in rank order: (W·block_rows, ...), one all-gather.

    The rows of a rank's block past its own batch are whatever it padded them with.
    """
    if group is None:
        return t
    world = dist.get_world_size(group)
    out = t.new_empty((world * block_rows, *t.shape[1:]))
    _all_gather_single(out, t.contiguous(), group=group)
    return out


def all_gather_rows(
    t: torch.Tensor, sizes: Sequence[int], group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """Concatenate every rank's rows in rank order: (sizes[rank], ...) -> (sum(sizes), ...).

    One all-gather of max(sizes) rows per rank (padding only because the collective needs
    equal blocks); uneven blocks are trimmed with one index_select, not a per-rank loop.
    """
    if group is None:
        return t
    max_rows = max(sizes)
    padded = t.new_zeros((max_rows, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = all_gather_padded(padded, max_rows, group)
    if all(n == max_rows for n in sizes):
        return out
    return out.index_select(0, padded_positions(torch.tensor(sizes, dtype=torch.int64), max_rows).to(t.device))


def to_padded_layout(t: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """(sum(sizes), ...) rows in rank order -> (W·max(sizes), ...) with zero rows as padding."""
    max_rows = max(sizes)
    if all(n == max_rows for n in sizes):
        return t.contiguous()
    padded = t.new_zeros((len(sizes) * max_rows, *t.shape[1:]))
    positions = padded_positions(torch.tensor(sizes, dtype=torch.int64), max_rows).to(t.device)
    return padded.index_copy_(0, positions, t)


class PendingRows:
    """This rank's rows of a reduce-scatter in flight: ``wait()`` returns them (rows, ...)."""

    def __init__(self, out: torch.Tensor, rows: int, work=None, fallback=None) -> None:
        self._out, self._rows, self._work, self._fallback = out, rows, work, fallback

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        if self._fallback is not None:
            return self._fallback()
        return self._out[: self._rows]


def reduce_scatter_padded(
    padded: torch.Tensor, rows: int, rank: int, group: Optional[dist.ProcessGroup], async_op: bool = False
) -> PendingRows:
    """Sum a (W·block, ...) padded tensor over ranks; rank r receives block r, trimmed to ``rows``.

    One reduce-scatter (``async_op=True``: started now, finished by ``.wait()``, so the
    caller computes meanwhile); where the backend has none, one all-reduce and the slice.
    """
    if group is None:
        return PendingRows(padded, rows)
    world = dist.get_world_size(group)
    block = padded.shape[0] // world
    out = padded.new_empty((block, *padded.shape[1:]))
    try:
        work = _reduce_scatter_single(out, padded.contiguous(), group=group, async_op=async_op)
        return PendingRows(out, rows, work)
    except _UNSUPPORTED as err:  # pragma: no cover - e.g. older gloo had no reduce-scatter
        if not _unsupported(err, group):
            raise
    full = padded.contiguous()
    work = dist.all_reduce(full, group=group, async_op=async_op)
    return PendingRows(full, rows, work, fallback=lambda: full[rank * block : rank * block + rows])


def sum_rows_to_owner(
    t: torch.Tensor, sizes: Sequence[int], rank: int, group: Optional[dist.ProcessGroup], async_op: bool = False
) -> PendingRows:
    """Sum a (sum(sizes), ...) tensor over ranks; this rank gets its rows (sizes[rank], ...)
    from ``.wait()``. One reduce-scatter of max(sizes) rows per rank."""
    if group is None:
        return PendingRows(t, t.shape[0])
    return reduce_scatter_padded(to_padded_layout(t, sizes), sizes[rank], rank, group, async_op)


def all_reduce_(t: torch.Tensor, op, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def all_gather_small(t: torch.Tensor, world: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """(k,) -> (world, k): a few integers from every rank (sizes, error flags)."""
    if group is None:
        return t[None]
    return all_gather_rows(t[None], [1] * world, group)


def broadcast_rows(
    local: torch.Tensor, src: int, rows: int, group: Optional[dist.ProcessGroup], rank: int
) -> torch.Tensor:
    """Rank ``src`` sends its (rows, ...) tensor to every rank (raw bytes; any dtype).

    ``src`` is the rank within ``group``. Returns the tensor on every rank, on ``local``'s device.
    """
    if group is None:
        return local
    row_shape = local.shape[1:]
    if rank == src:
        buf = to_byte_rows(local).clone()
    else:
        buf = torch.empty((rows, to_byte_rows(local[:0]).shape[1]), dtype=torch.uint8, device=local.device)
    dist.broadcast(buf, src=dist.get_global_rank(group, src), group=group)
    return from_byte_rows(buf, local.dtype, row_shape)


#: Error kinds exchanged between ranks: no error, ValueError, TypeError (MarginKitTypeError).
OK, VALUE_ERROR, TYPE_ERROR = 0, 1, 2


def error_kind(error: Optional[BaseException]) -> int:
    if error is None:
        return OK
    return TYPE_ERROR if isinstance(error, TypeError) else VALUE_ERROR


def raise_first_error(
    kinds: Sequence[int], message: Optional[str], group: dist.ProcessGroup, device: torch.device
) -> None:
    """If any rank's kind is an error, every rank raises the first such rank's error.

    ``kinds`` is every rank's error kind (already gathered), ``message`` this rank's error
    text. The first bad rank broadcasts its text (the error path only), so a rank with
    good input gets the same typed error instead of waiting in the next collective.
    """
    bad = [r for r, k in enumerate(kinds) if k != OK]
    if not bad:
        return
    src, rank = bad[0], dist.get_rank(group)
    box = [message if rank == src else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src), group=group,
                               device=device if device.type == "cuda" else None)
    text = f"rank {src} of {len(kinds)}: {box[0]}"
    raise (ValueError if kinds[src] == VALUE_ERROR else MarginKitTypeError)(text)


def all_gather_batch(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    group: Optional[dist.ProcessGroup],
    error: Optional[BaseException] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (rows, D) embeddings and (rows,) labels, concatenated in rank order.

    Local batches may differ in size (padded for one all-gather, as raw bytes so any
    dtype travels over gloo too). ``error``: this rank's input was rejected (its local
    checks raised it); then, or when the ranks' D differ, every rank raises the same
    typed error instead of leaving the others waiting.
    """
    if group is None:
        if error is not None:
            raise error
        return embeddings, labels
    world = dist.get_world_size(group)
    n, d = (0, 0) if error is not None else embeddings.shape[:2]
    code = DTYPE_CODES.get(embeddings.dtype, -1) if error is None else -1
    meta = all_gather_small(torch.tensor([n, d, error_kind(error), code], device=embeddings.device), world, group)
    meta = meta.tolist()
    raise_first_error([m[2] for m in meta], None if error is None else str(error), group, embeddings.device)
    if len({m[1] for m in meta}) != 1:
        raise ValueError(f"embeddings must have the same D on every rank of the group, got {[m[1] for m in meta]}")
    mismatch = dtype_mismatch_error("embeddings", [m[3] for m in meta])  # rows of other sizes would abort gloo
    if mismatch is not None:
        raise mismatch
    sizes = [m[0] for m in meta]
    row_bytes = to_byte_rows(embeddings[:0]).shape[1]
    payload = torch.cat([to_byte_rows(embeddings), to_byte_rows(labels.to(torch.int64))], dim=1)
    rows = all_gather_rows(payload, sizes, group)
    return (from_byte_rows(rows[:, :row_bytes], embeddings.dtype, embeddings.shape[1:]),
            from_byte_rows(rows[:, row_bytes:], torch.int64, ()))
