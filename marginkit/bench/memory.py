"""Peak extra memory of one step on the CPU, where torch keeps no allocation high-water mark.

:class:`LiveTensorBytes` is a ``TorchDispatchMode`` that sees every tensor an aten
op returns (forward and backward: autograd runs on the calling thread on the
CPU), counts the bytes of each new storage until the storage is freed (a
``weakref.finalize`` on it), and keeps the maximum. Storages that existed before
the step (the inputs, what a provider preallocated) are excluded, so the peak
is what the step allocated; :func:`peak_extra_bytes` then subtracts the
gradients the step leaves, the same definition as the CUDA column
(``max_memory_allocated`` minus inputs minus gradients).

What it cannot see: scratch memory a single kernel allocates and frees inside
itself (a compiled op's workspace), and code that runs outside the dispatcher
(a ``torch.compile``'d graph under a dispatch mode runs eagerly, so compiled
providers are not measured with it).
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorBytes", "peak_extra_bytes", "CPU_MEMORY_METHOD"]

#: one line for the terminal, the JSON sidecar and the docs
CPU_MEMORY_METHOD = (
    "CPU peak_extra_mib: peak bytes of tensors alive during one step (a TorchDispatchMode that "
    "tracks every storage aten ops create until it is freed), minus the gradients the step leaves; "
    "scratch memory inside a single kernel is not seen"
)


def _storage_key(tensor: torch.Tensor):
    """(data pointer, bytes, storage) of a tensor's storage, or None for tensors without one."""
    if tensor.device.type == "meta" or tensor.is_sparse:
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a real storage
        return None
    nbytes = storage.nbytes()
    if nbytes == 0:
        return None
    return storage.data_ptr(), nbytes, storage


class LiveTensorBytes(TorchDispatchMode):
    """Live bytes of the storages created while the mode is active; ``peak`` is their maximum.

    ``exclude``: tensors whose storages existed before (inputs); an op writing into
    them (``out=``, in-place) allocates nothing.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._known = set()
        for t in exclude:
            key = _storage_key(t) if isinstance(t, torch.Tensor) else None
            if key is not None:
                self._known.add(key[0])
        self._finalizers = {}
        self.live = 0
        self.peak = 0

    def _freed(self, data_ptr: int, nbytes: int) -> None:
        self.live -= nbytes
        self._finalizers.pop(data_ptr, None)

    def _track(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if key is None:
            return
        data_ptr, nbytes, storage = key
        if data_ptr in self._known or data_ptr in self._finalizers:
            return  # an input, a view of something tracked, or an in-place result
        self._finalizers[data_ptr] = weakref.finalize(storage, self._freed, data_ptr, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        for fin in list(self._finalizers.values()):
            fin.detach()  # storages outliving the step (gradients) must not call back later
        self._finalizers.clear()
        return result


def peak_extra_bytes(step: Callable[[], None], params, exclude: Iterable[torch.Tensor]) -> int:
    """Run ``step`` once under :class:`LiveTensorBytes`; its peak minus the gradients it leaves.

    ``params``: the leaves whose ``.grad`` the step fills (reset to None by the caller);
    ``exclude``: tensors that exist before the step (inputs, preallocated buffers).
    """
    tracker = LiveTensorBytes(exclude=list(exclude) + list(params))
    with tracker:
        step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return max(0, tracker.peak - grads)
