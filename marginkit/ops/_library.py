"""What every compiled op's Python side shares: loading ``marginkit._C``, dtype codes, the
CPU/CUDA entry choice, tensor checks that name the argument, and :func:`compiled_op`, the
custom-op + fake + guarded-wrapper pattern written once.

csrc takes raw pointers: a pointer is only valid while its tensor lives. :class:`Pointers`
keeps every tensor whose pointer it hands out (``t.contiguous().data_ptr()`` on a temporary
would free the copy before the kernel reads it).
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from marginkit.errors import FLOAT_DTYPES, MarginKitTypeError, check_bool, check_int  # noqa: F401 (check_int: the ops import it from here)

try:
    from marginkit import _C
except ImportError as _err:  # pragma: no cover - only without a built extension
    _C = None
    _C_IMPORT_ERROR: Optional[ImportError] = _err
else:
    _C_IMPORT_ERROR = None

DTYPE_CODE = {dtype: code for code, dtype in enumerate(FLOAT_DTYPES)}  # float32 0, float16 1, bfloat16 2, float64 3
FLOAT_NAMES = "float32, float16, bfloat16 or float64"


def available() -> bool:
    """True when ``marginkit._C`` imported."""
    return _C is not None


def cuda_available() -> bool:
    """True when ``marginkit._C`` holds the CUDA kernels (GPU presence not implied)."""
    return _C is not None and hasattr(_C, "cuda")


def build_info() -> dict:
    """``marginkit._C.build_info()``."""
    return lib_module().build_info()


def lib_module():
    """``marginkit._C``, or a RuntimeError saying how to build it."""
    if _C is None:
        raise RuntimeError(
            "marginkit._C is not built; install marginkit with `pip install --no-build-isolation -e .` "
            f"(import error: {_C_IMPORT_ERROR})"
        )
    return _C


def entries(device: torch.device):
    """The raw entry points for ``device``: ``_C.cpu`` or ``_C.cuda`` (driver checked)."""
    C = lib_module()
    if device.type == "cpu":
        return C.cpu
    if device.type == "cuda":
        if not hasattr(C, "cuda"):
            raise RuntimeError(
                "marginkit._C was built without CUDA (no nvcc at build time, or MARGINKIT_NO_CUDA=1), "
                "so its ops run on CPU tensors only; rebuild with nvcc on PATH for CUDA tensors"
            )
        _check_cuda_driver(C)
        return C.cuda
    raise MarginKitTypeError(f"marginkit csrc ops run on cpu or cuda tensors, got device {device}")


_DRIVER_OK: Optional[bool] = None


def _check_cuda_driver(C) -> None:
    """The module links the CUDA runtime statically: it needs a driver at least as new."""
    global _DRIVER_OK
    if _DRIVER_OK is None:
        _DRIVER_OK = C.cuda.driver_version() >= C.cuda.runtime_version()
    if not _DRIVER_OK:
        drv, rt = C.cuda.driver_version(), C.cuda.runtime_version()
        raise RuntimeError(
            f"marginkit._C was built with CUDA {rt // 1000}.{rt % 1000 // 10} (static runtime) but the installed "
            f"driver supports CUDA {drv // 1000}.{drv % 1000 // 10}; update the NVIDIA driver or rebuild marginkit "
            "with an older CUDA toolkit (nvcc) on this machine"
        )


def launch_args(device: torch.device, workspace: Optional[Tensor] = None) -> Tuple[int, int, int]:
    """(workspace pointer or 0, device index, current stream handle): the tail of every CUDA entry."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    ws = 0 if workspace is None else workspace.data_ptr()
    return ws, index, torch.cuda.current_stream(index).cuda_stream


def workspace(nbytes: int, device: torch.device) -> Tensor:
    """A scratch buffer of ``nbytes`` (at least 1) bytes."""
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)


class Pointers:
    """Hands out ``data_ptr()`` of contiguous tensors and keeps each tensor alive while it lives.

    Use one per kernel call, as a local: ``p = Pointers(); lib.f(p(x), p(y.view(torch.uint8)))``.
    """

    def __init__(self) -> None:
        self._alive = []

    def __call__(self, t: Optional[Tensor]) -> int:
        if t is None:
            return 0
        t = t.detach().contiguous()
        self._alive.append(t)
        return t.data_ptr()


# --------------------------------------------------------------------------- checks


def check_tensor(name: str, t, shape_hint: str, ndim: int, dtypes, dtype_names: str) -> None:
    """Type, rank and dtype of ``t``, each mistake a typed error naming ``name``."""
    if not isinstance(t, Tensor):
        raise MarginKitTypeError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_hint}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise MarginKitTypeError(f"{name} must have dtype {dtype_names}, got {t.dtype}")


def check_shape(name: str, t: Tensor, shape: Tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got {tuple(t.shape)}")


def check_device(name: str, t: Tensor, device: torch.device, ref: str) -> None:
    if t.device != device:
        raise MarginKitTypeError(f"{name} is on {t.device} but {ref} is on {device}; move it with .to({ref}.device)")


def check_contiguous(name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place); pass {name}.contiguous() and keep that tensor")


def check_labels_in_range(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """ValueError naming the first label outside [0, C) that is not ignore_index (one sync)."""
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{i}] = {int(labels[i])} is outside [0, C) = [0, {num_classes}) and is not "
            f"ignore_index = {ignore_index}"
        )


def stable_sort(labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Values and indices of a stable sort, both contiguous int64."""
    sorted_labels, order = torch.sort(labels, stable=True)
    return sorted_labels.contiguous(), order.contiguous()


# --------------------------------------------------------------------------- the op pattern


def _guard_python_scalars(signature: inspect.Signature, bound: inspect.BoundArguments) -> None:
    """Before the dispatcher converts them (True into 1 or 1.0, 1 into True) or refuses them with its
    own message: an ``int`` parameter takes an int within int64, a ``float`` one a real number (no
    bool), a ``bool`` one a bool, a ``Tensor`` one a tensor (``Optional[Tensor]``: or None)."""
    for name, value in bound.arguments.items():
        annotation = str(signature.parameters[name].annotation)
        if annotation == "int":
            check_int(name, value)
        elif annotation == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise MarginKitTypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
        elif annotation == "bool":
            check_bool(name, value)
        elif annotation in ("Tensor", "Optional[Tensor]") and not isinstance(value, Tensor):
            if value is None and annotation == "Optional[Tensor]":
                continue
            raise MarginKitTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


class CompiledOp:
    """``torch.ops.marginkit.<name>`` plus a call that guards Python scalars first.

    ``op`` is the ``torch.library.CustomOpDef`` (for ``register_autograd``); calling the
    ``CompiledOp`` checks int arguments, then dispatches.
    """

    def __init__(self, op, impl: Callable) -> None:
        self.op = op
        self._signature = inspect.signature(impl)
        functools.update_wrapper(self, impl)

    def __call__(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        _guard_python_scalars(self._signature, bound)
        return self.op(*args, **kwargs)


def compiled_op(
    name: str,
    *,
    check: Callable,
    mutates_args: Sequence[str] = (),
    fake: Optional[Callable] = None,
) -> Callable[[Callable], CompiledOp]:
    """Register ``impl`` as ``torch.ops.marginkit.<name>``.

    ``check(*args)`` validates the arguments (shapes, dtypes, devices, Python values; no device
    sync) and runs in the real op and in its fake, so the op is safe when called by name and
    under ``torch.compile``. ``fake(*args)`` returns the outputs' metadata (default: None, for
    in-place ops). ``impl`` is called after ``check`` with the same arguments.
    """

    def register(impl: Callable) -> CompiledOp:
        signature = inspect.signature(impl)

        def bound_args(args, kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return bound.args

        @functools.wraps(impl)
        def checked(*args, **kwargs):
            args = bound_args(args, kwargs)
            check(*args)
            return impl(*args)

        def fake_impl(*args, **kwargs):
            args = bound_args(args, kwargs)
            check(*args)
            return None if fake is None else fake(*args)

        schema = torch.library.infer_schema(impl, mutates_args=mutates_args)
        op = torch.library.custom_op(f"marginkit::{name}", checked, mutates_args=mutates_args, schema=schema)
        op.register_fake(fake_impl)
        return CompiledOp(op, impl)

    return register
