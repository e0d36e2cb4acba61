"""The margin cross-entropy pipeline, written once.

    validate → (autocast) → owned labels → target cosine → spec.target_terms
             → backend.row_losses → reduce

Every loss in marginkit runs through ``margin_loss`` (``mk.margin_cross_entropy``, the heads
in ``marginkit.nn``); the partitioned head uses the same steps around its collectives. Two
extension points and no others: the margin spec (the target column) and a
``NegativeModulation`` (the non-target columns). The float64 target-column math lives in
``marginkit.backends.common``; the (B, C) work in the backend ``marginkit.backends.resolve``
picks. A backend may also offer ``target_rows`` (label check + target terms of a spec with an
``angle_form``, in one launch) and ``mean_loss`` (reduction='mean'): the Triton backend does, so
a CUDA step is a few launches rather than ~100 small ops on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from marginkit import backends
from marginkit.backends.common import NORM_EPS, compute_dtype, sub_center_target, target_cosine
from marginkit.errors import check_bool, check_memory_budget, check_real
from marginkit.modulation import NegativeModulation, interclass_filter
from marginkit.specs import MarginSpec
from marginkit.validation import check_labels, label_error, skip_value_checks, validate_inputs

__all__ = [
    "margin_loss",
    "per_row_margins",
    "target_terms",
    "reduce_losses",
    "autocast_inputs",
    "no_autocast",
    "check_pending_labels",
]

#: Devices whose label range check runs on the device and is read back without blocking
#: the host (the error surfaces at the next call). Elsewhere the check is eager.
DEFERRED_LABEL_CHECK_DEVICES = ("cuda",)

#: Callback building the non-target modulation from the rows' (ψ (B,), cos θ_y (B,), valid (B,)).
NegativesFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Optional[NegativeModulation]]


# ----------------------------------------------------------------------------------------
# Autocast: one precision for forward and backward
# ----------------------------------------------------------------------------------------
def autocast_inputs(embeddings: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under ``torch.autocast``, the inputs the loss runs on: embeddings in the autocast dtype, and
    the weight kept as it is when float32 (master-weight mode: no (C, D) copy) or already in that
    dtype. Outside autocast, the inputs unchanged. The caller then runs with autocast off, so the
    backward recomputes in the precision the forward used."""
    device_type = embeddings.device.type
    if not torch.is_autocast_enabled(device_type):
        return embeddings, weight
    dtype = torch.get_autocast_dtype(device_type)
    if embeddings.dtype in (torch.float32, torch.float16, torch.bfloat16):
        embeddings = embeddings.to(dtype)
    if weight.dtype in (torch.float16, torch.bfloat16) and weight.dtype != embeddings.dtype:
        weight = weight.to(embeddings.dtype)
    return embeddings, weight


def no_autocast(device: torch.device):
    """A context with autocast off on ``device`` (the loss's own precision rules apply inside)."""
    return torch.autocast(device.type, enabled=False)


# ----------------------------------------------------------------------------------------
# Labels: checked eagerly on the CPU, on the device without a host sync on CUDA
# ----------------------------------------------------------------------------------------
@dataclass
class _PendingCheck:
    flag: torch.Tensor  # on the host (pinned on CUDA), filled by a non-blocking copy
    event: Optional["torch.cuda.Event"]
    error: Callable[[list], Optional[ValueError]]  # the flag's values -> the error to raise, or None


_pending: list[_PendingCheck] = []


def _defer(info: torch.Tensor, error: Callable[[list], Optional[ValueError]]) -> None:
    """Copy a small device flag to the host without blocking; ``check_pending_labels`` reads it later.
    Not under torch.compile or CUDA-graph capture: the flagged rows are left out all the same, unreported."""
    if skip_value_checks():
        return
    if info.is_cuda:
        flag = torch.empty(info.shape, dtype=info.dtype, pin_memory=True)
        flag.copy_(info, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:  # the CPU twin of the CUDA path (tests): arrived at once
        flag, event = info, None
    _pending.append(_PendingCheck(flag, event, error))


def check_pending_labels(wait: bool = False) -> None:
    """Raise the ``ValueError`` of an out-of-range label (or a bad class/sample margin) that an
    earlier call on CUDA found on the device.

    Every call of the loss runs this first without waiting; ``wait=True`` (e.g. at the end of an
    epoch, or in tests) waits for the flags still in flight. Nothing is read under torch.compile or
    during CUDA-graph capture (no event query there): the next eager call reads it.
    """
    if skip_value_checks():
        return
    while _pending:
        check = _pending[0]
        if check.event is not None and not (wait or check.event.query()):
            return
        if check.event is not None and wait:
            check.event.synchronize()
        _pending.pop(0)
        error = check.error(check.flag.tolist())  # host memory: no device read
        if error is not None:
            _pending.clear()
            raise error


def _deferred_label_check(
    labels: torch.Tensor, valid: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """Flag out-of-range labels on the device and copy the flag to the host without blocking.

    ``valid`` (B,) bool: labels != ignore_index. Returns (B,) bool: the rows that take part
    (valid, label in range); rows with a bad label are left out like ignored ones, so they never
    change a weight. The flag is the (min, max) of the labels with every good row replaced by
    ignore_index: both equal ignore_index exactly when no label is bad, else one of them is a bad
    label (the error names it). Seven small ops and one non-blocking copy, no host read.
    """
    keep = valid & in_range(labels, num_classes)
    if not skip_value_checks():  # nothing can be reported under compile or capture: no flag ops either
        _defer(torch.stack(torch.aminmax(torch.where(keep, ignore_index, labels))),
               _label_flag_error(num_classes, ignore_index))
    return keep


def in_range(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) bool: the label is in [0, C) (a clamped label equals itself only there); no host read."""
    return labels.clamp(0, num_classes - 1) == labels


def _label_flag_error(num_classes: int, ignore_index: int) -> Callable[[list], Optional[ValueError]]:
    """The label check flag's reader: (min, max) over ignore_index and the bad labels -> the error or None."""

    def error(flag: list) -> Optional[ValueError]:
        low, high = flag
        if low == ignore_index and high == ignore_index:
            return None
        return label_error(low if low != ignore_index else high, num_classes, ignore_index)

    return error


def _deferred_margin_check(
    row_margins: torch.Tensor, valid: torch.Tensor, margin: MarginSpec, name: str
) -> torch.Tensor:
    """The margins' value check on the device, for the rows that take part: returns (B,) bool, the
    valid rows whose margin is usable (finite, >= 0, below the spec's limit). Rows with a bad margin
    are left out like ignored ones; the ``ValueError`` naming ``name`` is raised by the next call
    (nothing is reported under torch.compile or CUDA-graph capture)."""
    usable, report = _margin_check(row_margins, valid, margin, name)
    if report is not None:
        _defer(*report)
    return usable


def _margin_check(row_margins, valid, margin: MarginSpec, name: str):
    """(usable rows (B,) bool, and (the device flag (2,) float64, its reader), or None where nothing
    can be reported) of the margins' value check."""
    limit = float("inf") if margin.margin_limit is None else margin.margin_limit
    bad = valid & ~(torch.isfinite(row_margins) & (row_margins >= 0) & (row_margins < limit))
    if skip_value_checks():
        return valid & ~bad, None
    first_bad = row_margins.to(torch.float64).gather(0, bad.to(torch.int32).argmax().reshape(1)).reshape(())
    info = torch.stack([bad.any().to(torch.float64), first_bad])
    bound = "finite, >= 0" + ("" if margin.margin_limit is None else f" and < {limit:.6g}")

    def error(flag: list) -> Optional[ValueError]:
        if not flag[0]:
            return None
        return ValueError(f"{name} contains {flag[1]} (used by a row of an earlier batch); {type(margin).__name__} "
                          f"margins must be {bound}")

    return valid & ~bad, (info, error)


def valid_rows(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(B,) bool rows that take part in the loss, after the label range check."""
    valid = labels != ignore_index
    if not labels.numel():
        return valid
    if labels.device.type in DEFERRED_LABEL_CHECK_DEVICES:
        return _deferred_label_check(labels, valid, num_classes, ignore_index)
    if skip_value_checks():  # the eager check reads the host: rows with a bad label are left out, unreported
        return valid & in_range(labels, num_classes)
    check_labels(labels, num_classes, ignore_index)
    return valid


# ----------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------
def per_row_margins(labels, ignore_index, class_margins, sample_margins) -> Optional[torch.Tensor]:
    """The per-row margin (B,) that replaces the spec's m, or None to use the spec's own."""
    if sample_margins is not None:
        return sample_margins
    if class_margins is not None:
        safe = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
        safe = safe.clamp(0, class_margins.shape[0] - 1)  # rows with a bad label are ignored anyway
        return class_margins.index_select(0, safe)
    return None


def target_terms(
    embeddings, weight, labels_local, margin: MarginSpec, row_margins, normalize, *, sub_centers: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ψ, dψ/dcos, cos θ_y, target weight row) per row: float64, float64, float64, int64.

    Zero (and row -1) on rows whose ``labels_local`` is -1. With sub-centers the target is
    the closest of the class's K rows.
    """
    if sub_centers > 1:
        cos, rows = sub_center_target(embeddings, weight, labels_local, sub_centers, normalize)
    else:
        cos, rows = target_cosine(embeddings, weight, labels_local, normalize), labels_local
    psi, dpsi = margin.target_terms(cos, row_margins)
    owned = labels_local >= 0
    return torch.where(owned, psi, 0.0), torch.where(owned, dpsi, 0.0), cos, rows


def reduce_losses(losses: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply the reduction to per-row losses (B,); 'mean' is over the valid rows."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1)


def margin_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: MarginSpec,
    scale: float,
    *,
    class_margins: Optional[torch.Tensor] = None,
    sample_margins: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    normalize: bool = True,
    backend: str = "auto",
    deterministic: bool = False,
    interclass_filtering_threshold: float = 0.0,
    feature_norm_scale: bool = False,
    negatives: Optional[NegativesFn] = None,
    sub_centers: int = 1,
    memory_budget: Optional[float] = 0,
) -> torch.Tensor:
    """The whole pipeline; arguments as ``mk.margin_cross_entropy``.

    ``negatives``: builds the non-target modulation from the target terms (CurricularFace).
    ``interclass_filtering_threshold`` > 0: insightface's filter, the other user of that hook.
    ``sub_centers``: weight is (C·K, D), K rows per class.
    ``memory_budget``: bytes the backend may keep from forward to backward (None: unlimited).
    """
    check_real("interclass_filtering_threshold", interclass_filtering_threshold, low=0.0, high=1.0)
    check_bool("feature_norm_scale", feature_norm_scale)
    if feature_norm_scale and (not normalize or sub_centers > 1 or negatives is not None
                               or interclass_filtering_threshold > 0.0):
        raise ValueError("feature_norm_scale=True scales unit-weight cosines by ‖x‖: it needs normalize=True, "
                         "one weight row per class, and no negative modulation (inter-class filtering, CurricularFace)")
    if interclass_filtering_threshold > 0.0:
        if negatives is not None:
            raise ValueError("interclass_filtering_threshold cannot be combined with another negative modulation")
        threshold = float(interclass_filtering_threshold)
        negatives = lambda psi, cos, valid: interclass_filter(  # noqa: E731
            valid, threshold, compute_dtype(embeddings)
        )
    num_classes = weight.shape[0] // sub_centers if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0
    class_view = weight[::sub_centers] if sub_centers > 1 and isinstance(weight, torch.Tensor) else weight
    deferred = isinstance(embeddings, torch.Tensor) and embeddings.device.type in DEFERRED_LABEL_CHECK_DEVICES
    validate_inputs(
        embeddings, class_view, labels, margin, scale, class_margins, sample_margins, reduction, ignore_index,
        backend, normalize, deterministic, check_values=not deferred,
    )
    check_memory_budget(memory_budget)
    check_pending_labels()
    engine = backends.resolve(backend, embeddings.device, sub_centers=sub_centers)
    embeddings, weight = autocast_inputs(embeddings, weight)
    with no_autocast(embeddings.device):
        row_margins = per_row_margins(labels, ignore_index, class_margins, sample_margins)
        margin_name = "sample_margins" if sample_margins is not None else "class_margins"
        form = margin.angle_form() if sub_centers == 1 and hasattr(engine, "target_rows") else None
        if form is not None:  # one kernel: label check, cos θ_y, ψ, dψ (the fused twin of the branch below)
            labels_local, psi, dpsi, cos = _fused_target_terms(
                engine, embeddings, weight, labels, num_classes, ignore_index, margin, form, row_margins, margin_name,
                normalize, deferred,
            )
            valid, rows = None, labels_local  # valid = labels_local >= 0, formed only where it is used
        else:
            valid = valid_rows(labels, num_classes, ignore_index)
            if row_margins is not None and (deferred or skip_value_checks()):  # eager off CUDA: checked above
                valid = _deferred_margin_check(row_margins, valid, margin, margin_name)
            labels_local = torch.where(valid, labels, -1)
            psi, dpsi, cos, rows = target_terms(
                embeddings, weight, labels_local, margin, row_margins, normalize, sub_centers=sub_centers,
            )
        fused_mean = reduction == "mean" and hasattr(engine, "mean_loss")  # one launch each way, not ~7 small ops
        if valid is None and (negatives is not None or reduction == "mean" and not fused_mean):
            valid = labels_local >= 0
        modulation = negatives(psi, cos, valid) if negatives is not None else None
        options = {"modulation": modulation, "deterministic": deterministic}
        if sub_centers > 1:
            options.update(sub_centers=sub_centers, target_rows=rows)
        # nothing to keep for a backward that will not run (no_grad, inference, everything frozen)
        backward_runs = torch.is_grad_enabled() and (embeddings.requires_grad or weight.requires_grad)
        options["memory_budget"] = memory_budget if backward_runs else 0
        if feature_norm_scale:
            losses = _norm_scaled_row_losses(engine, embeddings, weight, labels_local, psi, dpsi, cos, scale, options)
        else:
            losses = engine.row_losses(embeddings, weight, labels_local, psi, dpsi, float(scale), normalize, **options)
        if fused_mean:
            return engine.mean_loss(losses, labels_local)
        return reduce_losses(losses, valid, reduction)


def _fused_target_terms(
    engine, embeddings, weight, labels, num_classes, ignore_index, margin, form, row_margins, margin_name, normalize,
    deferred,
):
    """(labels_local, ψ, dψ, cos θ_y) from the backend's one-launch ``target_rows``, with the label
    check as on the unfused path: eager off CUDA, flagged on the device and deferred on CUDA (rows
    with a bad label or margin left out even where nothing can be reported: compile, capture)."""
    checking = labels.numel() > 0
    if checking and not deferred:
        check_labels(labels, num_classes, ignore_index)  # skipped under torch.compile: the kernel leaves them out
    margin_report = None
    if checking and row_margins is not None and (deferred or skip_value_checks()):  # eager off CUDA: checked above
        taking_part = (labels != ignore_index) & in_range(labels, num_classes)
        usable, margin_report = _margin_check(row_margins, taking_part, margin, margin_name)
        labels = torch.where(usable | ~taking_part, labels, ignore_index)  # rows with a bad margin go in as ignored;
        # bad labels stay: the kernel flags them
    labels_local, psi, dpsi, cos, flag = engine.target_rows(
        embeddings, weight, labels, ignore_index, form, row_margins, normalize, check_labels=checking and deferred
    )
    if checking and deferred:  # the label error first, as on the unfused path
        _defer(flag, _label_flag_error(num_classes, ignore_index))
    if margin_report is not None:
        _defer(*margin_report)
    return labels_local, psi, dpsi, cos


def _norm_scaled_row_losses(engine, x, w, labels_local, psi, dpsi, cos, scale, options) -> torch.Tensor:
    """Row losses with logits s·‖x_i‖·cos θ_ij (s·‖x_i‖·ψ_i on the target): SphereFace, L-Softmax and
    pytorch-metric-learning's convention, with the radial part of the gradient.

    The backend runs un-normalised rows against unit weights (x·ŵ_j = ‖x‖·cos θ_j) with the target
    logit T = ‖x‖·ψ and dT/d(x·ŵ_y) = ψ'. That form leaves out T's radial derivative x̂·(ψ − ψ'·cos),
    which a zero-valued surrogate term adds (as MagFace adds its margin's derivative). The unit
    weights are a (C, D) copy: this mode only.
    """
    w_unit = torch.nn.functional.normalize(w, dim=1, eps=NORM_EPS)
    norms = torch.linalg.vector_norm(x.to(compute_dtype(x)), dim=1)
    owned = labels_local >= 0
    target_logit = torch.where(owned, norms.detach().to(torch.float64) * psi, torch.zeros_like(psi))
    losses = engine.row_losses(x, w_unit, labels_local, target_logit, dpsi, float(scale), False, **options)
    with torch.no_grad():
        radial = float(scale) * torch.expm1(-losses.to(torch.float64)) * (psi - dpsi * cos)
        radial = torch.where(owned, radial, torch.zeros_like(radial)).to(losses.dtype)
    return losses + (norms - norms.detach()).to(losses.dtype) * radial
