"""Partial FC class sampling for one shard of classes (csrc: ops/partial_fc_sample.h)."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from marginkit.ops._library import (
    Pointers, check_int, check_tensor, compiled_op, entries, launch_args, workspace,
)

# The kernels store a class's position in int32 flags.
_MAX_SHARD_CLASSES = 2**31 - 1


def _check(labels, class_start, class_stop, num_sample, seed):
    check_tensor("labels", labels, "(B,)", 1, (torch.int64,), "int64 (use labels.long())")
    check_int("class_start", class_start, low=0)
    check_int("class_stop", class_stop)
    if class_stop < class_start:
        raise ValueError(f"class_stop = {class_stop} must be >= class_start = {class_start}")
    if class_stop - class_start > _MAX_SHARD_CLASSES:
        raise ValueError(f"a shard holds at most 2**31 - 1 classes, got {class_stop - class_start}")
    check_int("num_sample", num_sample, low=0)
    check_int("seed", seed)


def _fake(labels, class_start, class_stop, num_sample, seed):
    num_index = torch.library.get_ctx().new_dynamic_size()
    return labels.new_empty((num_index,), dtype=torch.int64), labels.new_empty(labels.shape, dtype=torch.int64)


@compiled_op("partial_fc_sample", check=_check, fake=_fake)
def _partial_fc_sample_op(
    labels: Tensor, class_start: int, class_stop: int, num_sample: int, seed: int
) -> Tuple[Tensor, Tensor]:
    dev = labels.device
    n = class_stop - class_start
    B = labels.shape[0]
    lib = entries(dev)
    flags = torch.empty(max(n, 1), dtype=torch.int32, device=dev)
    seed64 = seed % (1 << 64)
    p = Pointers()
    ws = None if dev.type == "cpu" else workspace(lib.partial_fc_workspace_bytes(n), dev)
    tail = () if ws is None else launch_args(dev, ws)
    positives = lib.partial_fc_mark(p(labels), B, class_start, class_stop, p(flags), *tail)
    num_index = max(positives, min(num_sample, n))
    index = torch.empty(num_index, dtype=torch.int64, device=dev)
    local_labels = torch.empty(B, dtype=torch.int64, device=dev)
    lib.partial_fc_select(p(flags), class_start, class_stop, seed64, num_index - positives, p(labels), B, p(index),
                          num_index, p(local_labels), *tail)
    return index, local_labels


def partial_fc_sample(
    labels: Tensor, class_start: int, class_stop: int, num_sample: int, seed: int
) -> Tuple[Tensor, Tensor]:
    """Partial FC class sampling for the shard of global classes [class_start, class_stop).

    Returns ``(index, local_labels)``: ``index`` (S,) int64, sorted local class ids in
    [0, class_stop - class_start): every positive class of the shard (a label of the batch
    falls in it) plus uniformly drawn negatives without replacement, S = max(#positives,
    min(num_sample, class_stop - class_start)); ``local_labels`` (B,) int64: the position in
    ``index`` of each row's class, or -1 when its label is outside the shard (negative
    labels, e.g. ignored rows, are never positives).

    ``seed`` may be any Python int (it is used modulo 2**64). Reproducible: negatives are the non-positive classes with the smallest
    ``splitmix64(global_class_id ^ splitmix64(seed + golden))`` keys, so the same seed gives
    the same sample on CPU and CUDA (bit-identical), on any device, and any rank sharding
    the same classes. Different seeds give independent samples. The op synchronises once
    (the output size depends on the data).
    """
    if isinstance(seed, int) and not isinstance(seed, bool):
        # any Python int: the op's schema holds an int64, the kernels use seed mod 2**64
        seed %= 1 << 64
        if seed >= 1 << 63:
            seed -= 1 << 64
    return _partial_fc_sample_op(labels, class_start, class_stop, num_sample, seed)
