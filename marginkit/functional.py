"""``margin_cross_entropy``: input validation, per-row margin terms, backend dispatch."""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from marginkit.backends.common import owned_labels, target_cosine
from marginkit.errors import MarginKitTypeError, check_choice, check_real
from marginkit.specs import ArcFace, MarginSpec

__all__ = ["margin_cross_entropy", "validate_inputs", "rows_margins", "reduce_losses", "resolve_backend", "BACKENDS"]

# float64 is accepted too (gradcheck, oracles); the fused GPU path is built for the first three.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BACKENDS = ("auto", "triton", "torch")
REDUCTIONS = ("mean", "sum", "none")


def _check_tensor(name: str, value, ndim: int, shape_hint: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise MarginKitTypeError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_hint}, got shape {tuple(value.shape)}")


def _skip_value_checks() -> bool:
    """Checks of tensor *values* (label range, NaN margins) need a host sync, which would
    break a torch.compile(fullgraph=True) graph: they run eagerly only. Shapes, dtypes and
    devices are checked always."""
    return torch.compiler.is_compiling()


def _check_margin_tensor(name: str, value, length: int, length_name: str, device: torch.device) -> None:
    _check_tensor(name, value, 1, f"({length_name},)")
    if value.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length_name},) = ({length},), got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise MarginKitTypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != device:
        raise MarginKitTypeError(f"{name} is on {value.device} but embeddings are on {device}; move it with .to(device)")
    if _skip_value_checks():
        return
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values; margins must be finite and >= 0")
    if value.numel() and bool((value < 0).any()):
        raise ValueError(f"{name} contains negative values (min {float(value.min())}); margins must be >= 0")


def validate_inputs(
    embeddings, weight, labels, margin, scale, class_margins, sample_margins, reduction, ignore_index, backend
) -> None:
    """Raise a typed error naming the argument for anything API.md does not allow."""
    _check_tensor("embeddings", embeddings, 2, "(B, D)")
    _check_tensor("weight", weight, 2, "(C, D)")
    _check_tensor("labels", labels, 1, "(B,)")
    if embeddings.dtype not in FLOAT_DTYPES:
        raise MarginKitTypeError(
            f"embeddings must be float32, float16, bfloat16 (or float64), got {embeddings.dtype}"
        )
    if weight.dtype != embeddings.dtype:
        raise MarginKitTypeError(
            f"weight dtype {weight.dtype} differs from embeddings dtype {embeddings.dtype}; cast one to match"
        )
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
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} rows but embeddings have B = {embeddings.shape[0]}")
    if weight.shape[0] < 1:
        raise ValueError("weight must hold at least one class (C >= 1)")
    if not isinstance(margin, MarginSpec):
        raise MarginKitTypeError(
            f"margin must be a marginkit margin spec (mk.ArcFace(), mk.CosFace(), ...), got {margin!r}"
        )
    check_real("scale", scale, low=0.0, low_inclusive=False)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise MarginKitTypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    if class_margins is not None and sample_margins is not None:
        raise ValueError("give class_margins or sample_margins, not both")
    if (class_margins is not None or sample_margins is not None) and not margin.has_single_margin:
        raise ValueError(
            f"{type(margin).__name__} has no single margin m to replace; class_margins/sample_margins "
            "work with CosFace, ArcFace and CombinedMargin (m2)"
        )
    if class_margins is not None:
        _check_margin_tensor("class_margins", class_margins, weight.shape[0], "C", embeddings.device)
    if sample_margins is not None:
        _check_margin_tensor("sample_margins", sample_margins, embeddings.shape[0], "B", embeddings.device)
    if labels.numel() and not _skip_value_checks():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(
                f"labels contains {value}, outside [0, C) = [0, {weight.shape[0]}) and not ignore_index "
                f"({ignore_index}); fix the labels or the number of classes"
            )


def rows_margins(labels, ignore_index, class_margins, sample_margins) -> Optional[torch.Tensor]:
    """The per-row margin (B,) that replaces the spec's m, or None to use the spec's own."""
    if sample_margins is not None:
        return sample_margins
    if class_margins is not None:
        safe = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
        return class_margins.index_select(0, safe)
    return None


def reduce_losses(losses: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """Apply the reduction to per-row losses (B,) float32; 'mean' is over non-ignored rows."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum().clamp_min(1)
    return total / count


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere; check that 'triton' can run here."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors; on the CPU it runs only under the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing triton), or use backend='torch'"
        )
    return backend


def backend_module(backend: str):
    """The module of a resolved backend name; Triton is imported only when asked for."""
    if backend == "triton":
        from marginkit.backends import triton as triton_backend

        return triton_backend
    from marginkit.backends import torch_chunked

    return torch_chunked


def _row_losses_fn(backend: str, deterministic: bool):
    row_losses = backend_module(backend).row_losses
    return functools.partial(row_losses, deterministic=deterministic) if backend == "triton" else row_losses


def margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: MarginSpec = ArcFace(),
    scale: float = 64.0,
    *,
    class_margins: Optional[torch.Tensor] = None,
    sample_margins: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    normalize: bool = True,
    backend: str = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """Margin softmax cross-entropy over all C classes without materialising (B, C) logits.

    Args:
        embeddings: (B, D) float32/float16/bfloat16 features.
        weight: (C, D) class weights, same dtype and device as ``embeddings``.
        labels: (B,) int64 class ids in [0, C), or ``ignore_index``.
        margin: a margin spec (``mk.ArcFace()``, ``mk.CosFace()``, ...) giving the target logit.
        scale: s > 0; logits are s·ψ(cos θ_y) on the target column and s·cos θ_j elsewhere.
        class_margins: optional (C,) per-class margins replacing the spec's m.
        sample_margins: optional (B,) per-row margins replacing the spec's m.
        reduction: "mean" (over non-ignored rows), "sum" or "none" ((B,) float32, 0 on ignored rows).
        ignore_index: label value of rows that take no part in the loss.
        normalize: L2-normalise the rows of both inputs inside (gradients flow through it).
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        deterministic: Triton only: bitwise run-to-run identical gradients (per-split dX
            buffers summed in a fixed order instead of fp32 atomics; a few MiB more and a
            little slower, see marginkit.backends.triton). The torch backend on the CPU is
            deterministic anyway.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or (B,) for reduction="none".
    """
    validate_inputs(
        embeddings, weight, labels, margin, scale, class_margins, sample_margins, reduction, ignore_index, backend
    )
    backend = resolve_backend(backend, embeddings.device)
    labels_local = owned_labels(labels, ignore_index)
    cos_target = target_cosine(embeddings, weight, labels_local, normalize)
    psi, dpsi = margin.target_terms(cos_target, rows_margins(labels, ignore_index, class_margins, sample_margins))
    losses = _row_losses_fn(backend, deterministic)(
        embeddings, weight, labels, psi, dpsi, float(scale), ignore_index, normalize
    )
    return reduce_losses(losses, labels, ignore_index, reduction)
