"""Python side of the compiled ops in ``marginkit._C`` (csrc/).

csrc is plain C++17/CUDA without torch headers: its entries take raw pointers
(``data_ptr()``), sizes, dtype codes and a CUDA stream handle. This module
validates tensors (typed errors naming the argument, the value and what is
allowed; out-of-range labels raise ``ValueError`` before any kernel runs),
allocates outputs and scratch space with torch, dispatches to the CPU or CUDA
entry by device, and registers every op with ``torch.library.custom_op``
(namespace ``marginkit``) + ``register_fake`` so they work under
``torch.compile`` and pass ``torch.library.opcheck``.

Ops (the ``marginkit::`` name in brackets):

* ``class_center_update_``      [class_center_update_]      IR-Softmax centers, in place
* ``class_statistics_update_``  [class_statistics_update_]  per-class counts / cos / spread
* ``range_loss``                [range_loss_forward, range_loss_backward] with autograd
* ``partial_fc_sample``         [partial_fc_sample]         Partial FC class sampling
* ``sparse_sgd_step_``          [sparse_sgd_step_]          row-sparse torch.optim.SGD
* ``sparse_adamw_step_``        [sparse_adamw_step_]        row-sparse torch.optim.AdamW

Determinism: every op visits rows in a stable label-sorted order and reduces
segments in a fixed order (no floating-point atomics), on CPU and CUDA.
CPU and CUDA results agree to rounding (CPU sums in float64; CUDA sums in
float64 too but in a different order), except ``partial_fc_sample``, whose
output is bit-identical on CPU and CUDA for the same seed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from marginkit.errors import MarginKitTypeError, check_real

try:
    from marginkit import _C
except ImportError as _err:  # pragma: no cover - only without a built extension
    _C = None
    _C_IMPORT_ERROR: Optional[ImportError] = _err
else:
    _C_IMPORT_ERROR = None

__all__ = [
    "available",
    "cuda_available",
    "build_info",
    "class_center_update_",
    "class_statistics_update_",
    "range_loss",
    "partial_fc_sample",
    "sparse_sgd_step_",
    "sparse_adamw_step_",
]

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_FLOAT_DTYPES = tuple(_DTYPE_CODE)
_FLOAT_NAMES = "float32, float16, bfloat16 or float64"


# --------------------------------------------------------------------------- helpers


def available() -> bool:
    """True when ``marginkit._C`` imported."""
    return _C is not None


def cuda_available() -> bool:
    """True when ``marginkit._C`` holds the CUDA kernels (GPU presence not implied)."""
    return _C is not None and hasattr(_C, "cuda")


def build_info() -> dict:
    """``marginkit._C.build_info()``."""
    return _lib_module().build_info()


def _lib_module():
    if _C is None:
        raise RuntimeError(
            "marginkit._C is not built; install marginkit with `pip install --no-build-isolation -e .` "
            f"(import error: {_C_IMPORT_ERROR})"
        )
    return _C


def _lib(device: torch.device):
    C = _lib_module()
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


def _launch(device: torch.device) -> Tuple[int, int]:
    """(device index, current stream handle) for CUDA entries."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def _workspace(nbytes: int, device: torch.device) -> Tensor:
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _check_tensor(name: str, t, shape_hint: str, ndim: int, dtypes, dtype_names: str) -> None:
    if not isinstance(t, Tensor):
        raise MarginKitTypeError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_hint}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise MarginKitTypeError(f"{name} must have dtype {dtype_names}, got {t.dtype}")


def _check_device(name: str, t: Tensor, device: torch.device, ref: str) -> None:
    if t.device != device:
        raise MarginKitTypeError(f"{name} is on {t.device} but {ref} is on {device}; move it with .to({ref}.device)")


def _check_contiguous(name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place); pass {name}.contiguous() and keep that tensor")


def _check_int(name: str, v, low: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise MarginKitTypeError(f"{name} must be an int, got {v!r} of type {type(v).__name__}")
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v


def _check_labels_in_range(labels: Tensor, num_classes: int, ignore_index: int) -> None:
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


def _stable_sort(labels: Tensor) -> Tuple[Tensor, Tensor]:
    sorted_labels, order = torch.sort(labels, stable=True)
    return sorted_labels.contiguous(), order.contiguous()


def _check_rows(rows: Tensor, num_rows: int) -> None:
    """rows: in [0, C) and distinct (one sync)."""
    if rows.numel() == 0:
        return
    s = torch.sort(rows).values
    flags = torch.stack([(s[0] < 0), (s[-1] >= num_rows), (s[1:] == s[:-1]).any()]).tolist()
    if flags[0] or flags[1]:
        bad = int(s[0]) if flags[0] else int(s[-1])
        raise ValueError(f"rows contains {bad}, outside [0, C) = [0, {num_rows})")
    if flags[2]:
        dup = s[1:][s[1:] == s[:-1]]
        raise ValueError(
            f"rows contains duplicates (e.g. {int(dup[0])}); each row may be updated at most once per step "
            "(sum the gradients of repeated rows first, e.g. with torch.Tensor.index_add_)"
        )


# --------------------------------------------------------------------------- 1. class centers


def _meta_class_center_update(centers, embeddings, labels, momentum, ignore_index):
    _check_tensor("centers", centers, "(C, D)", 2, (torch.float32,), "float32")
    _check_tensor("embeddings", embeddings, "(B, D)", 2, _FLOAT_DTYPES, _FLOAT_NAMES)
    _check_tensor("labels", labels, "(B,)", 1, (torch.int64,), "int64 (use labels.long())")
    _check_device("embeddings", embeddings, centers.device, "centers")
    _check_device("labels", labels, centers.device, "centers")
    if embeddings.shape[1] != centers.shape[1]:
        raise ValueError(
            f"embeddings has D = {embeddings.shape[1]} columns but centers has D = {centers.shape[1]}"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has B = {embeddings.shape[0]} rows")
    _check_contiguous("centers", centers)
    check_real("momentum", momentum, low=0.0, high=1.0)
    _check_int("ignore_index", ignore_index)


@torch.library.custom_op("marginkit::class_center_update_", mutates_args=("centers",))
def _class_center_update_op(
    centers: Tensor, embeddings: Tensor, labels: Tensor, momentum: float, ignore_index: int = -100
) -> None:
    _meta_class_center_update(centers, embeddings, labels, momentum, ignore_index)
    C, D = centers.shape
    _check_labels_in_range(labels, C, ignore_index)
    B = embeddings.shape[0]
    if B == 0 or D == 0:
        return
    x = embeddings.contiguous()
    sorted_labels, order = _stable_sort(labels)
    lib = _lib(centers.device)
    args = (centers.data_ptr(), C, D, x.data_ptr(), _DTYPE_CODE[x.dtype], B, sorted_labels.data_ptr(),
            order.data_ptr(), float(momentum), int(ignore_index))
    if centers.device.type == "cpu":
        lib.class_center_update(*args)
    else:
        ws = _workspace(lib.class_center_update_workspace_bytes(B, D), centers.device)
        lib.class_center_update(*args, ws.data_ptr(), *_launch(centers.device))


@_class_center_update_op.register_fake
def _(centers, embeddings, labels, momentum, ignore_index=-100):
    _meta_class_center_update(centers, embeddings, labels, momentum, ignore_index)
    return None


def class_center_update_(
    centers: Tensor, embeddings: Tensor, labels: Tensor, momentum: float, ignore_index: int = -100
) -> None:
    """IR-Softmax center update, in place (no autograd).

    For every class c present in the batch (rows whose label is ``ignore_index`` skipped)::

        centers[c] = normalize(momentum * centers[c] + (1 - momentum) * mean_{i: y_i = c} normalize(x_i))

    ``normalize(v) = v / max(||v||, 1e-12)`` (``F.normalize``). Classes absent from the batch
    are untouched. Deterministic: rows are summed per class in label-sorted (stable) order.

    Args: centers (C, D) float32, contiguous; embeddings (B, D) float32/float16/bfloat16/float64;
    labels (B,) int64 in [0, C) or ``ignore_index``; momentum in [0, 1].
    """
    _class_center_update_op(centers, embeddings, labels, momentum, ignore_index)


# --------------------------------------------------------------------------- 2. class statistics


def _meta_class_statistics(counts, target_cos_sum, sq_dist_sum, embeddings, weight, labels, ignore_index):
    _check_tensor("counts", counts, "(C,)", 1, (torch.int64,), "int64")
    _check_tensor("target_cos_sum", target_cos_sum, "(C,)", 1, (torch.float64,), "float64")
    _check_tensor("sq_dist_sum", sq_dist_sum, "(C,)", 1, (torch.float64,), "float64")
    _check_tensor("embeddings", embeddings, "(B, D)", 2, _FLOAT_DTYPES, _FLOAT_NAMES)
    _check_tensor("weight", weight, "(C, D)", 2, _FLOAT_DTYPES, _FLOAT_NAMES)
    _check_tensor("labels", labels, "(B,)", 1, (torch.int64,), "int64 (use labels.long())")
    dev = weight.device
    for name, t in (("counts", counts), ("target_cos_sum", target_cos_sum), ("sq_dist_sum", sq_dist_sum),
                    ("embeddings", embeddings), ("labels", labels)):
        _check_device(name, t, dev, "weight")
    C, D = weight.shape
    for name, t in (("counts", counts), ("target_cos_sum", target_cos_sum), ("sq_dist_sum", sq_dist_sum)):
        if t.shape[0] != C:
            raise ValueError(f"{name} must have shape (C,) = ({C},) like weight's rows, got {tuple(t.shape)}")
        _check_contiguous(name, t)
    if embeddings.shape[1] != D:
        raise ValueError(f"embeddings has D = {embeddings.shape[1]} columns but weight has D = {D}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has B = {embeddings.shape[0]} rows")
    _check_int("ignore_index", ignore_index)


@torch.library.custom_op(
    "marginkit::class_statistics_update_", mutates_args=("counts", "target_cos_sum", "sq_dist_sum")
)
def _class_statistics_update_op(
    counts: Tensor,
    target_cos_sum: Tensor,
    sq_dist_sum: Tensor,
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
) -> None:
    _meta_class_statistics(counts, target_cos_sum, sq_dist_sum, embeddings, weight, labels, ignore_index)
    C, D = weight.shape
    _check_labels_in_range(labels, C, ignore_index)
    B = embeddings.shape[0]
    if B == 0:
        return
    x = embeddings.detach().contiguous()
    w = weight.detach().contiguous()
    sorted_labels, order = _stable_sort(labels)
    lib = _lib(weight.device)
    args = (counts.data_ptr(), target_cos_sum.data_ptr(), sq_dist_sum.data_ptr(), C, x.data_ptr(),
            _DTYPE_CODE[x.dtype], w.data_ptr(), _DTYPE_CODE[w.dtype], B, D, sorted_labels.data_ptr(),
            order.data_ptr(), int(ignore_index))
    if weight.device.type == "cpu":
        lib.class_statistics_update(*args)
    else:
        ws = _workspace(lib.class_statistics_update_workspace_bytes(B, D), weight.device)
        lib.class_statistics_update(*args, ws.data_ptr(), *_launch(weight.device))


@_class_statistics_update_op.register_fake
def _(counts, target_cos_sum, sq_dist_sum, embeddings, weight, labels, ignore_index=-100):
    _meta_class_statistics(counts, target_cos_sum, sq_dist_sum, embeddings, weight, labels, ignore_index)
    return None


def class_statistics_update_(
    counts: Tensor,
    target_cos_sum: Tensor,
    sq_dist_sum: Tensor,
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
) -> None:
    """Accumulate per-class statistics in place (no autograd), for adaptive margins.

    With ``x^ = normalize(x_i)`` and ``w^ = normalize(weight[c])`` (``F.normalize``), for every
    row i with label c != ``ignore_index``::

        counts[c] += 1;  target_cos_sum[c] += x^ . w^;  sq_dist_sum[c] += ||x^ - w^||^2

    Mean target cosine = target_cos_sum / counts; spread = sq_dist_sum / counts. Sums are
    float64, per class in label-sorted order (deterministic).

    Args: counts (C,) int64; target_cos_sum, sq_dist_sum (C,) float64 (all contiguous);
    embeddings (B, D), weight (C, D) float32/float16/bfloat16/float64; labels (B,) int64.
    """
    _class_statistics_update_op(counts, target_cos_sum, sq_dist_sum, embeddings, weight, labels, ignore_index)


# --------------------------------------------------------------------------- 3. range loss


def _range_k2(k: int, B: int) -> int:
    """Number of selected-pair slots: min(k, max pairs in the batch), at least 1."""
    return max(1, min(int(k), B * (B - 1) // 2))


def _meta_range_loss(embeddings, labels, k, margin, alpha, beta):
    _check_tensor("embeddings", embeddings, "(B, D)", 2, _FLOAT_DTYPES, _FLOAT_NAMES)
    _check_tensor("labels", labels, "(B,)", 1, (torch.int64,), "int64 (use labels.long())")
    _check_device("labels", labels, embeddings.device, "embeddings")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has B = {embeddings.shape[0]} rows")
    _check_int("k", k, low=1)
    check_real("margin", margin)
    check_real("alpha", alpha)
    check_real("beta", beta)
    k2 = _range_k2(k, embeddings.shape[0])
    if embeddings.device.type == "cuda" and cuda_available() and k2 > _C.cuda.range_loss_max_k():
        raise ValueError(f"k = {k} is larger than the CUDA kernel supports ({_C.cuda.range_loss_max_k()})")
    return k2


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("marginkit::range_loss_forward", mutates_args=())
def _range_loss_forward_op(
    embeddings: Tensor, labels: Tensor, k: int, margin: float, alpha: float, beta: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    k2 = _meta_range_loss(embeddings, labels, k, margin, alpha, beta)
    B, D = embeddings.shape
    dev = embeddings.device
    x = embeddings.contiguous()
    loss = torch.zeros((), dtype=_loss_dtype(x.dtype), device=dev)
    row_seg = torch.empty(B, dtype=torch.int64, device=dev)
    sel_pairs = torch.empty(B, k2, 2, dtype=torch.int64, device=dev)
    sel_coef = torch.empty(B, k2, dtype=torch.float64, device=dev)
    closest = torch.empty(4, dtype=torch.int64, device=dev)
    inter_vec = torch.empty(D, dtype=torch.float64, device=dev)
    if B == 0:
        closest.copy_(torch.tensor([-1, -1, 0, 0]))
        inter_vec.zero_()
        return loss, row_seg, sel_pairs, sel_coef, closest, inter_vec
    sorted_labels, order = _stable_sort(labels)
    lib = _lib(dev)
    args = (x.data_ptr(), _DTYPE_CODE[x.dtype], B, D, sorted_labels.data_ptr(), order.data_ptr(), k2,
            float(margin), float(alpha), float(beta), loss.data_ptr(), row_seg.data_ptr(),
            sel_pairs.data_ptr(), sel_coef.data_ptr(), closest.data_ptr(), inter_vec.data_ptr())
    if dev.type == "cpu":
        lib.range_loss_forward(*args)
    else:
        ws = _workspace(lib.range_loss_workspace_bytes(B, D, k2), dev)
        lib.range_loss_forward(*args, ws.data_ptr(), *_launch(dev))
    return loss, row_seg, sel_pairs, sel_coef, closest, inter_vec


@_range_loss_forward_op.register_fake
def _(embeddings, labels, k, margin, alpha, beta):
    k2 = _meta_range_loss(embeddings, labels, k, margin, alpha, beta)
    B, D = embeddings.shape
    e = embeddings
    return (
        e.new_empty((), dtype=_loss_dtype(e.dtype)),
        e.new_empty((B,), dtype=torch.int64),
        e.new_empty((B, k2, 2), dtype=torch.int64),
        e.new_empty((B, k2), dtype=torch.float64),
        e.new_empty((4,), dtype=torch.int64),
        e.new_empty((D,), dtype=torch.float64),
    )


@torch.library.custom_op("marginkit::range_loss_backward", mutates_args=())
def _range_loss_backward_op(
    grad_loss: Tensor,
    embeddings: Tensor,
    row_seg: Tensor,
    sel_pairs: Tensor,
    sel_coef: Tensor,
    closest: Tensor,
    inter_vec: Tensor,
) -> Tensor:
    B, D = embeddings.shape
    dev = embeddings.device
    x = embeddings.contiguous()
    grad = torch.empty_like(x)
    if B == 0:
        return grad
    g = grad_loss.to(dtype=_loss_dtype(x.dtype), device=dev).contiguous()
    k2 = sel_pairs.shape[1]
    lib = _lib(dev)
    args = (g.data_ptr(), x.data_ptr(), _DTYPE_CODE[x.dtype], B, D, k2, row_seg.contiguous().data_ptr(),
            sel_pairs.contiguous().data_ptr(), sel_coef.contiguous().data_ptr(), closest.contiguous().data_ptr(),
            inter_vec.contiguous().data_ptr(), grad.data_ptr())
    if dev.type == "cpu":
        lib.range_loss_backward(*args)
    else:
        lib.range_loss_backward(*args, *_launch(dev))
    return grad


@_range_loss_backward_op.register_fake
def _(grad_loss, embeddings, row_seg, sel_pairs, sel_coef, closest, inter_vec):
    return torch.empty_like(embeddings, memory_format=torch.contiguous_format)


def _range_setup_context(ctx, inputs, output):
    embeddings = inputs[0]
    _, row_seg, sel_pairs, sel_coef, closest, inter_vec = output
    ctx.save_for_backward(embeddings, row_seg, sel_pairs, sel_coef, closest, inter_vec)
    ctx.mark_non_differentiable(sel_coef, inter_vec)


def _range_backward(ctx, grad_loss, *unused):
    embeddings, row_seg, sel_pairs, sel_coef, closest, inter_vec = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _range_loss_backward_op(grad_loss, embeddings, row_seg, sel_pairs, sel_coef, closest, inter_vec)
    return grad, None, None, None, None, None


_range_loss_forward_op.register_autograd(_range_backward, setup_context=_range_setup_context)


def range_loss(
    embeddings: Tensor, labels: Tensor, k: int = 2, margin: float = 1.0, alpha: float = 1.0, beta: float = 1.0
) -> Tensor:
    """Range loss (API.md ``RangeLoss``), differentiable with respect to ``embeddings``.

    Distances are squared Euclidean between the rows as given. For each class with >= 2 rows:
    its k' = min(k, pairs) largest pairwise distances d_1..d_k' (ties: lower row indices
    first); intra = sum over classes of k' / sum_j 1/d_j. Class means x_c of the classes
    present; inter = max(margin - min_{Q != R} ||x_Q - x_R||^2, 0), 0 with fewer than 2
    classes. Returns ``alpha * intra + beta * inter`` as a 0-d float32 tensor (float64 for
    float64 embeddings, so gradcheck works). Labels are group ids: any int64 values.

    Identical rows: if a selected distance is exactly 0, that class's term is its limit, 0,
    with zero gradient (no inf/NaN). The hinge has zero gradient when inactive (margin <= min
    distance); ties between equally close pairs of means: the first pair in label order.
    Backward flows through the selected distances and the closest pair of means.
    """
    return _range_loss_forward_op(embeddings, labels, k, margin, alpha, beta)[0]


# --------------------------------------------------------------------------- 4. Partial FC sampling


def _meta_partial_fc(labels, class_start, class_stop, num_sample, seed):
    _check_tensor("labels", labels, "(B,)", 1, (torch.int64,), "int64 (use labels.long())")
    _check_int("class_start", class_start, low=0)
    _check_int("class_stop", class_stop)
    if class_stop < class_start:
        raise ValueError(f"class_stop = {class_stop} must be >= class_start = {class_start}")
    if class_stop - class_start >= 2**31:
        raise ValueError(f"a shard holds at most 2**31 - 1 classes, got {class_stop - class_start}")
    _check_int("num_sample", num_sample, low=0)
    _check_int("seed", seed)


@torch.library.custom_op("marginkit::partial_fc_sample", mutates_args=())
def _partial_fc_sample_op(
    labels: Tensor, class_start: int, class_stop: int, num_sample: int, seed: int
) -> Tuple[Tensor, Tensor]:
    _meta_partial_fc(labels, class_start, class_stop, num_sample, seed)
    dev = labels.device
    n = class_stop - class_start
    B = labels.shape[0]
    lab = labels.contiguous()
    lib = _lib(dev)
    flags = torch.empty(max(n, 1), dtype=torch.int32, device=dev)
    seed64 = seed % (1 << 64)
    if dev.type == "cpu":
        P = lib.partial_fc_mark(lab.data_ptr(), B, class_start, class_stop, flags.data_ptr())
    else:
        ws = _workspace(lib.partial_fc_workspace_bytes(n), dev)
        P = lib.partial_fc_mark(lab.data_ptr(), B, class_start, class_stop, flags.data_ptr(), ws.data_ptr(),
                                *_launch(dev))
    S = max(P, min(num_sample, n))
    index = torch.empty(S, dtype=torch.int64, device=dev)
    local_labels = torch.empty(B, dtype=torch.int64, device=dev)
    args = (flags.data_ptr(), class_start, class_stop, seed64, S - P, lab.data_ptr(), B, index.data_ptr(),
            local_labels.data_ptr())
    if dev.type == "cpu":
        lib.partial_fc_select(*args)
    else:
        lib.partial_fc_select(*args, ws.data_ptr(), *_launch(dev))
    return index, local_labels


@_partial_fc_sample_op.register_fake
def _(labels, class_start, class_stop, num_sample, seed):
    _meta_partial_fc(labels, class_start, class_stop, num_sample, seed)
    ctx = torch.library.get_ctx()
    S = ctx.new_dynamic_size()
    return labels.new_empty((S,), dtype=torch.int64), labels.new_empty(labels.shape, dtype=torch.int64)


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


# --------------------------------------------------------------------------- 5. row-sparse optimizers


def _meta_rows_common(weight, grad, rows, state):
    _check_tensor("weight", weight, "(C, D)", 2, _FLOAT_DTYPES, _FLOAT_NAMES)
    _check_tensor("rows", rows, "(R,)", 1, (torch.int64,), "int64")
    _check_tensor("grad", grad, "(R, D)", 2, (weight.dtype,), f"{weight.dtype} (weight's dtype)")
    dev = weight.device
    _check_device("grad", grad, dev, "weight")
    _check_device("rows", rows, dev, "weight")
    _check_contiguous("weight", weight)
    if grad.shape != (rows.shape[0], weight.shape[1]):
        raise ValueError(
            f"grad must have shape (R, D) = ({rows.shape[0]}, {weight.shape[1]}) (one row per entry of rows), "
            f"got {tuple(grad.shape)}"
        )
    for name, t in state:
        _check_tensor(name, t, "(C, D)", 2, (weight.dtype,), f"{weight.dtype} (weight's dtype)")
        _check_device(name, t, dev, "weight")
        if t.shape != weight.shape:
            raise ValueError(f"{name} must have weight's shape {tuple(weight.shape)}, got {tuple(t.shape)}")
        _check_contiguous(name, t)


def _meta_sgd(weight, grad, momentum_buffer, rows, lr, momentum, weight_decay, dampening, nesterov, initialized):
    _meta_rows_common(weight, grad, rows, [("momentum_buffer", momentum_buffer)])
    check_real("lr", lr, low=0.0)
    check_real("momentum", momentum, low=0.0)
    check_real("weight_decay", weight_decay, low=0.0)
    check_real("dampening", dampening)
    if not isinstance(nesterov, bool):
        raise MarginKitTypeError(f"nesterov must be a bool, got {nesterov!r}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires a momentum > 0 and zero dampening (as torch.optim.SGD)")
    if initialized is not None:
        _check_tensor("initialized", initialized, "(C,)", 1, (torch.bool, torch.uint8), "bool or uint8")
        _check_device("initialized", initialized, weight.device, "weight")
        if initialized.shape[0] != weight.shape[0]:
            raise ValueError(f"initialized must have shape (C,) = ({weight.shape[0]},), got {tuple(initialized.shape)}")
        _check_contiguous("initialized", initialized)


# No defaults in the schema: the dispatcher drops trailing arguments equal to their defaults, and
# torch <= 2.11's version bump then indexes the mutated `initialized` (position 9) past the end.
@torch.library.custom_op("marginkit::sparse_sgd_step_", mutates_args=("weight", "momentum_buffer", "initialized"))
def _sparse_sgd_op(
    weight: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    rows: Tensor,
    lr: float,
    momentum: float,
    weight_decay: float,
    dampening: float,
    nesterov: bool,
    initialized: Optional[Tensor],
) -> None:
    _meta_sgd(weight, grad, momentum_buffer, rows, lr, momentum, weight_decay, dampening, nesterov, initialized)
    C, D = weight.shape
    _check_rows(rows, C)
    R = rows.shape[0]
    if R == 0 or D == 0:
        return
    g = grad.detach().contiguous()
    r = rows.contiguous()
    init = initialized.view(torch.uint8) if initialized is not None else None
    args = (weight.data_ptr(), g.data_ptr(), momentum_buffer.data_ptr(), _ptr(init), r.data_ptr(), R, D,
            _DTYPE_CODE[weight.dtype], float(lr), float(momentum), float(weight_decay), float(dampening),
            bool(nesterov))
    lib = _lib(weight.device)
    if weight.device.type == "cpu":
        lib.sparse_sgd_step(*args)
    else:
        lib.sparse_sgd_step(*args, *_launch(weight.device))


@_sparse_sgd_op.register_fake
def _(weight, grad, momentum_buffer, rows, lr, momentum, weight_decay, dampening, nesterov, initialized):
    _meta_sgd(weight, grad, momentum_buffer, rows, lr, momentum, weight_decay, dampening, nesterov, initialized)
    return None


def sparse_sgd_step_(
    weight: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    rows: Tensor,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    initialized: Optional[Tensor] = None,
) -> None:
    """``torch.optim.SGD`` applied in place to ``weight[rows]`` only; other rows and their
    buffers do not move (bit-identical).

    ``grad[j]`` is the gradient of row ``rows[j]``; ``rows`` must be distinct (ValueError).
    Each row behaves as its own parameter: ``d = g + weight_decay * w``; with momentum,
    ``buf = momentum * buf + (1 - dampening) * d`` and ``d = d + momentum * buf`` (nesterov)
    or ``d = buf``; ``w -= lr * d``. ``momentum == 0`` leaves ``momentum_buffer`` untouched.

    First step: torch.optim.SGD sets ``buf = d`` the first time a parameter steps. With
    ``initialized`` ((C,) bool/uint8, e.g. zeros at the start) rows whose flag is 0 take
    ``buf = d`` exactly and get their flag set, which matches torch for any dampening.
    Without it the buffer is taken as already initialised (start it at zeros): with
    ``dampening == 0`` (the default) that is the same as torch's first step exactly.
    """
    _sparse_sgd_op(weight, grad, momentum_buffer, rows, lr, momentum, weight_decay, dampening, nesterov,
                   initialized)


def _meta_adamw(weight, grad, exp_avg, exp_avg_sq, step, rows, lr, beta1, beta2, eps, weight_decay):
    _meta_rows_common(weight, grad, rows, [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)])
    _check_tensor("step", step, "(C,)", 1, (torch.int64,), "int64 (per-row step counts)")
    _check_device("step", step, weight.device, "weight")
    if step.shape[0] != weight.shape[0]:
        raise ValueError(f"step must have shape (C,) = ({weight.shape[0]},), got {tuple(step.shape)}")
    _check_contiguous("step", step)
    check_real("lr", lr, low=0.0)
    check_real("beta1", beta1, low=0.0, high=1.0, high_inclusive=False)
    check_real("beta2", beta2, low=0.0, high=1.0, high_inclusive=False)
    check_real("eps", eps, low=0.0)
    check_real("weight_decay", weight_decay, low=0.0)


@torch.library.custom_op(
    "marginkit::sparse_adamw_step_", mutates_args=("weight", "exp_avg", "exp_avg_sq", "step")
)
def _sparse_adamw_op(
    weight: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    rows: Tensor,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> None:
    _meta_adamw(weight, grad, exp_avg, exp_avg_sq, step, rows, lr, beta1, beta2, eps, weight_decay)
    C, D = weight.shape
    _check_rows(rows, C)
    R = rows.shape[0]
    if R == 0:
        return
    g = grad.detach().contiguous()
    r = rows.contiguous()
    args = (weight.data_ptr(), g.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), step.data_ptr(),
            r.data_ptr(), R, D, _DTYPE_CODE[weight.dtype], float(lr), float(beta1), float(beta2), float(eps),
            float(weight_decay))
    lib = _lib(weight.device)
    if weight.device.type == "cpu":
        lib.sparse_adamw_step(*args)
    else:
        lib.sparse_adamw_step(*args, *_launch(weight.device))


@_sparse_adamw_op.register_fake
def _(weight, grad, exp_avg, exp_avg_sq, step, rows, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
    _meta_adamw(weight, grad, exp_avg, exp_avg_sq, step, rows, lr, beta1, beta2, eps, weight_decay)
    return None


def sparse_adamw_step_(
    weight: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    rows: Tensor,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> None:
    """``torch.optim.AdamW`` applied in place to ``weight[rows]`` only (amsgrad=False,
    maximize=False); other rows and their state do not move (bit-identical).

    ``step`` (C,) int64 holds per-row step counts (start at zeros); each selected row's count
    is incremented and its bias corrections use it, so a row that was sampled t times is
    exactly an AdamW parameter after t steps. ``rows`` must be distinct (ValueError).
    """
    _sparse_adamw_op(weight, grad, exp_avg, exp_avg_sq, step, rows, lr, beta1, beta2, eps, weight_decay)
