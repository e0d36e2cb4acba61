"""Partial FC class sampling with a fixed output size, on the device, without a host sync.

The csrc op ``partial_fc_sample`` keeps S = max(#positives, min(num_sample, C_r)) classes:
S depends on the data, so the op reads the positive count back (one sync per step). With a
declared maximum local batch M the positives of a step are at most min(W·M, C_r), so a fixed
S = min(C_r, max(num_sample, W·M)) holds them all; this module draws that many classes with
the same keys as the csrc op (``csrc/common.h``: key = splitmix64(global class ^ salt(seed))),
positives first, then the smallest keys. When S equals the op's size the sample is the same
set (tested); the seed is a device tensor, so the step counter never leaves the device.
"""

from __future__ import annotations

import torch

__all__ = ["fixed_sample_size", "sample_classes"]

_U64 = 1 << 64


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch's int64 arithmetic wraps)."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)
_SIGN = _signed(1 << 63)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (>> on int64 is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors holding uint64 bits (as csrc/common.h mix64)."""
    z = z ^ _shift_right(z, 30)
    z = z * _MUL1
    z = z ^ _shift_right(z, 27)
    z = z * _MUL2
    return z ^ _shift_right(z, 31)


def fixed_sample_size(num_local: int, num_sample: int, max_global_batch: int) -> int:
    """S = min(C_r, max(num_sample, W·M)): room for every positive of any step."""
    return min(num_local, max(num_sample, max_global_batch))


def sample_classes(
    labels: torch.Tensor, class_start: int, class_stop: int, size: int, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (size,), labels_local (B,)) as ``partial_fc_sample`` with a fixed size.

    ``labels`` (B,) global ids, negative for rows that are not positives; ``seed`` 0-d int64
    tensor on the labels' device (the csrc op's seed, as its int64 bits). ``index``: sorted
    local class ids, every positive of the shard plus the non-positives with the smallest
    keys; ``labels_local``: each row's position in ``index``, -1 when its class is elsewhere.
    Needs #positives <= size (``fixed_sample_size`` guarantees it).
    """
    device = labels.device
    num_local = class_stop - class_start
    classes = torch.arange(class_start, class_stop, dtype=torch.int64, device=device)
    keys = _mix64(classes ^ _mix64(seed + _GOLDEN)) ^ _SIGN  # ^ sign bit: int64 order = uint64 order
    owned = (labels >= class_start) & (labels < class_stop)
    local = torch.where(owned, labels - class_start, torch.zeros_like(labels))
    positive = torch.zeros(num_local, dtype=torch.bool, device=device).index_put_((local,), owned, accumulate=True)
    keys = torch.where(positive, torch.full_like(keys, -(1 << 63)), keys)  # positives first
    index = torch.topk(keys, size, largest=False, sorted=False).indices.sort().values
    position = torch.searchsorted(index, local).clamp_max(max(size - 1, 0))
    found = owned & (index.gather(0, position) == local) if size else torch.zeros_like(owned)
    return index, torch.where(found, position, torch.full_like(position, -1))
