"""Checks of the loss's inputs: every mistake gets a typed error naming the argument.

Shapes, dtypes, devices and options are checked on the host without reading tensor
values. Checks of *values* (labels in range, finite margins) need the values: on the CPU
they run here; on CUDA the pipeline checks labels on the device instead of stalling the
host (``marginkit._pipeline``). Under ``torch.compile`` and CUDA-graph capture value checks are
skipped (``skip_value_checks``).
"""

from __future__ import annotations

from typing import Optional

import torch

from marginkit.backends import BACKENDS
from marginkit.cuda_graphs import capturing
from marginkit.errors import (  # FLOAT_DTYPES: float64 too (gradcheck, oracles); the fused GPU path is built for the rest
    FLOAT_DTYPES, HALF_DTYPES, INT64_MIN, MarginKitTypeError, check_bool, check_choice, check_int, check_positive_ints,
    check_real,
)
from marginkit.specs import MarginSpec

__all__ = ["FLOAT_DTYPES", "HALF_DTYPES", "REDUCTIONS", "validate_inputs", "check_labels", "skip_value_checks", "check_head_arguments"]

REDUCTIONS = ("mean", "sum", "none")


def skip_value_checks() -> bool:
    """Value checks read the host: skipped while torch.compile traces (a sync would break a
    fullgraph graph) and while a CUDA graph is captured (a replay runs no host code)."""
    return torch.compiler.is_compiling() or capturing()


def check_tensor(name: str, value, ndim: int, shape_hint: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise MarginKitTypeError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_hint}, got shape {tuple(value.shape)}")


def check_pair_dtypes(embeddings: torch.Tensor, weight: torch.Tensor, weight_name: str = "weight") -> None:
    """Same dtype, or a float32 master weight with half-precision embeddings."""
    if embeddings.dtype not in FLOAT_DTYPES:
        raise MarginKitTypeError(f"embeddings must be float32, float16, bfloat16 (or float64), got {embeddings.dtype}")
    master = weight.dtype == torch.float32 and embeddings.dtype in HALF_DTYPES
    if weight.dtype != embeddings.dtype and not master:
        raise MarginKitTypeError(
            f"{weight_name} dtype {weight.dtype} does not go with embeddings dtype {embeddings.dtype}: use the same "
            "dtype, or a float32 weight with float16/bfloat16 embeddings (fp32 master weights)"
        )


def _check_margin_tensor(
    name: str, value, length: int, length_name: str, device: torch.device, check_values: bool = True
) -> None:
    check_tensor(name, value, 1, f"({length_name},)")
    if value.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length_name},) = ({length},), got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise MarginKitTypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != device:
        raise MarginKitTypeError(f"{name} is on {value.device} but embeddings are on {device}; move it with .to(device)")
    if value.requires_grad and torch.is_grad_enabled():
        # a margin computed from the embeddings (or a learned one) would silently get no gradient
        raise ValueError(
            f"{name} requires grad, but margins are constants to the loss (no gradient flows into them); "
            f"pass {name}.detach() (for MagFace's margin-dependent gradient use mk.MagFace)"
        )
    if not check_values or skip_value_checks() or not value.numel():
        return
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values; margins must be finite and >= 0")
    if bool((value < 0).any()):
        raise ValueError(f"{name} contains negative values (min {float(value.min())}); margins must be >= 0")


def validate_inputs(
    embeddings,
    weight,
    labels,
    margin,
    scale,
    class_margins,
    sample_margins,
    reduction,
    ignore_index,
    backend,
    normalize=True,
    deterministic=False,
    check_values=True,
) -> None:
    """Raise a typed error naming the argument for anything API.md does not allow.

    Label values are not checked here (``check_labels``); margin values only with ``check_values``
    (the CUDA path checks them on the device instead).
    """
    check_tensor("embeddings", embeddings, 2, "(B, D)")
    check_tensor("weight", weight, 2, "(C, D)")
    check_tensor("labels", labels, 1, "(B,)")
    check_pair_dtypes(embeddings, weight)
    if labels.dtype != torch.int64:
        raise MarginKitTypeError(f"labels must be int64 (torch.long), got {labels.dtype}; use labels.long()")
    for name, t in (("weight", weight), ("labels", labels)):
        if t.device != embeddings.device:
            raise MarginKitTypeError(
                f"{name} is on {t.device} but embeddings are on {embeddings.device}; put all inputs on one device"
            )
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"embedding_dim mismatch: embeddings have D = {embeddings.shape[1]} but weight has D = {weight.shape[1]}"
        )
    if embeddings.shape[1] < 1:
        raise ValueError("embeddings have D = 0 features; the embedding dimension must be >= 1")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} rows but embeddings have B = {embeddings.shape[0]}")
    if weight.shape[0] < 1:
        raise ValueError("weight must hold at least one class (C >= 1)")
    if not isinstance(margin, MarginSpec):
        raise MarginKitTypeError(
            f"margin must be a marginkit margin spec (mk.ArcFace(), mk.CosFace(), ...), got {margin!r}"
        )
    check_real("scale", scale, low=0.0, low_inclusive=False)
    check_ignore_index(ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    check_bool("normalize", normalize)
    check_bool("deterministic", deterministic)
    if class_margins is not None and sample_margins is not None:
        raise ValueError("give class_margins or sample_margins, not both")
    if (class_margins is not None or sample_margins is not None) and not margin.has_single_margin:
        raise ValueError(
            f"{type(margin).__name__} has no single margin m to replace; class_margins/sample_margins "
            "work with CosFace, ArcFace and CombinedMargin (m2)"
        )
    if class_margins is not None:
        _check_margin_tensor("class_margins", class_margins, weight.shape[0], "C", embeddings.device, check_values)
        if check_values and not skip_value_checks():
            margin.check_margin_values("class_margins", class_margins)
    if sample_margins is not None:
        _check_margin_tensor("sample_margins", sample_margins, embeddings.shape[0], "B", embeddings.device, check_values)
        if check_values and not skip_value_checks():
            margin.check_margin_values("sample_margins", sample_margins)


def check_ignore_index(ignore_index, lowest: int = INT64_MIN, why: str = "") -> None:
    """``ignore_index``: an int within int64 (labels are int64) and >= ``lowest`` (``why``: the reason)."""
    check_int("ignore_index", ignore_index)
    if ignore_index < lowest:
        raise ValueError(f"ignore_index must be >= {lowest}{why}, got {ignore_index}")


def out_of_range(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(B,) bool: labels outside [0, C) that are not ``ignore_index``."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))


def label_error(value: int, num_classes: int, ignore_index: int, shown: Optional[str] = None) -> ValueError:
    """The API's error for an out-of-range label (``shown``: how to print the value, if not as is)."""
    return ValueError(
        f"labels contains {value if shown is None else shown}, outside [0, C) = [0, {num_classes}) and not ignore_index "
        f"({ignore_index}); fix the labels or the number of classes"
    )


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Eager label check (one host sync): raise the API's ValueError naming the first bad label."""
    if not labels.numel() or skip_value_checks():
        return
    bad = out_of_range(labels, num_classes, ignore_index)
    if bool(bad.any()):
        raise label_error(int(labels[bad][0]), num_classes, ignore_index)


def check_head_arguments(num_classes, embedding_dim, margin, scale) -> None:
    """Typed errors for the constructor arguments every margin-softmax head shares
    (``margin`` or ``scale`` None: the head has none of its own)."""
    check_positive_ints(num_classes=num_classes, embedding_dim=embedding_dim)
    if margin is not None and not isinstance(margin, MarginSpec):
        raise MarginKitTypeError(f"margin must be a marginkit margin spec (mk.ArcFace(), ...), got {margin!r}")
    if scale is not None:
        check_real("scale", scale, low=0.0, low_inclusive=False)
