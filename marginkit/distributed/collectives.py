"""The few collectives the partitioned head needs, for NCCL (GPU) and gloo (CPU tests).

Every helper is a no-op for a world of one (``group is None``). Tensors of any dtype
travel as raw bytes where the payload mixes dtypes or the backend may lack the dtype
(gloo and bfloat16/bool), so one code path serves every input dtype.

Uneven row counts (local batches, class shards) are padded to the largest count,
exchanged with one equal-size collective and trimmed: NCCL's all-gather and
reduce-scatter want equal blocks. (Class shards differ by at most one row.)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from marginkit.errors import MarginKitTypeError

__all__ = [
    "is_nccl",
    "all_gather_rows",
    "sum_rows_to_owner",
    "all_reduce_",
    "all_gather_small",
    "all_gather_batch",
    "error_kind",
    "raise_first_error",
    "broadcast_rows",
    "to_byte_rows",
    "from_byte_rows",
]


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


def all_gather_rows(
    t: torch.Tensor, sizes: Sequence[int], group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """Concatenate every rank's rows in rank order: (sizes[rank], ...) -> (sum(sizes), ...).

    One all-gather of max(sizes) rows per rank.
    """
    if group is None:
        return t
    world = len(sizes)
    max_rows = max(sizes)
    padded = t.new_zeros((max_rows, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = t.new_empty((world * max_rows, *t.shape[1:]))
    try:
        _all_gather_single(out, padded, group=group)
        blocks = list(out.split(max_rows))
    except _UNSUPPORTED as err:  # pragma: no cover - backends without the single-tensor form
        if not _unsupported(err, group):
            raise
        blocks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(blocks, padded, group=group)
    if all(n == max_rows for n in sizes):
        return torch.cat(blocks)
    return torch.cat([block[:n] for block, n in zip(blocks, sizes)])


def sum_rows_to_owner(
    t: torch.Tensor, sizes: Sequence[int], rank: int, group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """Sum a (sum(sizes), ...) tensor over ranks and return this rank's rows (sizes[rank], ...).

    One reduce-scatter of max(sizes) rows per rank (each rank receives only its rows);
    where the backend has no reduce-scatter, one all-reduce and the slice.
    """
    if group is None:
        return t
    world = len(sizes)
    max_rows = max(sizes)
    if all(n == max_rows for n in sizes):
        padded = t.contiguous()
    else:
        padded = t.new_zeros((world * max_rows, *t.shape[1:]))
        start = 0
        for r, n in enumerate(sizes):
            padded[r * max_rows : r * max_rows + n] = t[start : start + n]
            start += n
    out = t.new_empty((max_rows, *t.shape[1:]))
    try:
        _reduce_scatter_single(out, padded, group=group)
        return out[: sizes[rank]]
    except _UNSUPPORTED as err:  # pragma: no cover - e.g. older gloo had no reduce-scatter
        if not _unsupported(err, group):
            raise
    offset = sum(sizes[:rank])
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t[offset : offset + sizes[rank]]


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
    meta = all_gather_small(torch.tensor([n, d, error_kind(error)], device=embeddings.device), world, group).tolist()
    raise_first_error([k for _, _, k in meta], None if error is None else str(error), group, embeddings.device)
    if len({d for _, d, _ in meta}) != 1:
        raise ValueError(f"embeddings must have the same D on every rank of the group, got {[d for _, d, _ in meta]}")
    sizes = [n for n, _, _ in meta]
    row_bytes = to_byte_rows(embeddings[:0]).shape[1]
    payload = torch.cat([to_byte_rows(embeddings), to_byte_rows(labels.to(torch.int64))], dim=1)
    rows = all_gather_rows(payload, sizes, group)
    return (from_byte_rows(rows[:, :row_bytes], embeddings.dtype, embeddings.shape[1:]),
            from_byte_rows(rows[:, row_bytes:], torch.int64, ()))
