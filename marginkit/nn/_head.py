"""The base every class-weight head shares: the (C, D) weight, the loss keywords checked at
construction, the batch checks that run before any state moves, and the call of the pipeline."""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from torch import nn

from marginkit._pipeline import margin_loss
from marginkit.backends import BACKENDS
from marginkit.cuda_graphs import refuse_capture
from marginkit.functional import margin_cross_entropy
from marginkit.errors import (
    MarginKitTypeError, check_bool, check_choice, check_float_dtype, check_memory_budget,
)
from marginkit.specs import MarginSpec, NoMargin
from marginkit.validation import REDUCTIONS, check_head_arguments, check_ignore_index, check_labels, validate_inputs

__all__ = [
    "KeepBufferDtypes", "ClassWeightHead", "HEAD_KEYWORDS", "PER_CALL_KEYWORDS", "LOSS_KEYWORD_DEFAULTS",
    "check_loss_keywords", "check_keyword_names", "take_loss_keywords", "resolved_loss_keywords",
    "MARGIN_TENSOR_KEYWORDS", "hold_margin_tensors", "with_margin_tensors", "eager_when_training",
]

#: insightface's heads start from normal(0, 0.01): small, so early cosines are near 0.
WEIGHT_INIT_STD = 0.01
#: keywords of ``margin_cross_entropy`` a head holds as attributes, and those it passes on per call
HEAD_KEYWORDS = ("reduction", "ignore_index", "normalize", "backend", "deterministic", "memory_budget")
PER_CALL_KEYWORDS = ("class_margins", "sample_margins", "interclass_filtering_threshold", "feature_norm_scale")
#: ``margin_cross_entropy``'s default for each of them (what a keyword left out means), from its signature
LOSS_KEYWORD_DEFAULTS = {
    name: inspect.signature(margin_cross_entropy).parameters[name].default
    for name in HEAD_KEYWORDS + PER_CALL_KEYWORDS
}


def check_loss_keywords(reduction, ignore_index, normalize, backend, deterministic) -> None:
    """The loss keywords, checked when a head is built rather than at its first forward."""
    check_choice("reduction", reduction, REDUCTIONS)
    check_ignore_index(ignore_index)
    check_bool("normalize", normalize)
    check_choice("backend", backend, BACKENDS)
    check_bool("deterministic", deterministic)


def check_keyword_names(head: str, given, allowed, also: str = "") -> None:
    """``MarginKitTypeError`` naming the unknown ones among ``given`` and listing ``allowed`` (+ ``also``)."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise MarginKitTypeError(
            f"{head} got unknown keyword(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}{also}"
        )


def take_loss_keywords(head: str, loss_kwargs: dict, allowed) -> Optional[float]:
    """For heads that pass ``**loss_kwargs`` on to the loss themselves (IRSoftmax, FairLoss): check
    their names and values now, not at the first forward, and pop ``memory_budget`` (returned,
    checked; default 0) so that it can live as the ``head.memory_budget`` attribute."""
    check_keyword_names(head, loss_kwargs, allowed)
    check_loss_keywords(**{k: loss_kwargs.get(k, LOSS_KEYWORD_DEFAULTS[k])
                           for k in HEAD_KEYWORDS if k != "memory_budget"})
    memory_budget = loss_kwargs.pop("memory_budget", 0)
    check_memory_budget(memory_budget)
    return memory_budget


def check_class_margins_now(weight: torch.Tensor, margin, scale, loss_kwargs: dict) -> None:
    """A head's fixed ``class_margins`` (and the rest of its loss keywords) checked against its (C, D)
    weight when it is built, not at its first forward."""
    probe = weight.detach()[:1]
    validate_inputs(
        probe, weight.detach(), torch.zeros(1, dtype=torch.int64, device=probe.device), margin, scale,
        loss_kwargs.get("class_margins"), None, loss_kwargs.get("reduction", LOSS_KEYWORD_DEFAULTS["reduction"]),
        loss_kwargs.get("ignore_index", LOSS_KEYWORD_DEFAULTS["ignore_index"]),
        loss_kwargs.get("backend", LOSS_KEYWORD_DEFAULTS["backend"]),
    )


#: the per-call keywords that are tensors: a head given them at construction holds them as buffers
MARGIN_TENSOR_KEYWORDS = ("class_margins", "sample_margins")


def hold_margin_tensors(module: nn.Module, loss_kwargs: dict) -> None:
    """Move a head's fixed ``class_margins`` / ``sample_margins`` out of ``loss_kwargs`` into
    non-persistent buffers, so that they follow ``.to(device)`` with the head (constructor
    arguments, so not in the state_dict, as before). List them in ``_keep_dtype_buffers``."""
    for name in MARGIN_TENSOR_KEYWORDS:
        value = loss_kwargs.pop(name, None)
        if value is None:
            continue
        if not torch.is_tensor(value):
            raise MarginKitTypeError(f"{name} must be a 1-D float tensor or None, got {type(value).__name__}")
        module.register_buffer(name, value, persistent=False)


def with_margin_tensors(module: nn.Module, loss_kwargs: dict) -> dict:
    """``loss_kwargs`` plus the margin tensors ``hold_margin_tensors`` took out of it."""
    held = {name: module._buffers[name] for name in MARGIN_TENSOR_KEYWORDS if module._buffers.get(name) is not None}
    return loss_kwargs | held


def resolved_loss_keywords(loss_kwargs: dict, allowed) -> dict:
    """Every allowed keyword but ``memory_budget`` (a rank's own choice) with its value, the default where
    left out: the same keys on every rank, however each spelled its arguments (``agree_once``)."""
    return {k: loss_kwargs.get(k, LOSS_KEYWORD_DEFAULTS[k]) for k in allowed if k != "memory_budget"}


_DISABLE_TAKES_REASON = "reason" in inspect.signature(torch.compiler.disable).parameters


def eager_when_training(forward):
    """A head's ``forward`` that, in training mode inside ``torch.compile``, runs outside the graph
    (a graph break; ``fullgraph=True`` refuses it): compiled code drops in-place writes to 0-d
    float64 buffers (torch 2.11 and 2.13, CPU), so a running t/scale/norm statistic never moved
    while every loss used the freshly computed one. Eagerly the state moves, the batch's values
    are checked, and no guard is installed on the state's value (a recompile per step)."""
    reason = ("a marginkit head's training forward runs outside the compiled graph: compiled code drops writes to "
              "its 0-d float64 running state (compile without fullgraph=True, or compile the backbone only)")
    eager = (torch.compiler.disable(forward, reason=reason) if _DISABLE_TAKES_REASON  # older torch: no reason=
             else torch.compiler.disable(forward))

    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        if self.training and torch.compiler.is_compiling():
            return eager(self, *args, **kwargs)
        return forward(self, *args, **kwargs)

    return run


class KeepBufferDtypes(nn.Module):
    """A module whose state buffers keep their dtype under ``.to(dtype)``, ``.half()``,
    ``.bfloat16()``...: running statistics, scales and margins stay float32/float64 while
    parameters follow the requested dtype. Device moves still apply to every buffer."""

    _keep_dtype_buffers: tuple = ()

    def _apply(self, fn, recurse=True):
        saved = {n: self._buffers[n] for n in self._keep_dtype_buffers if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return out


class ClassWeightHead(KeepBufferDtypes):
    """A (rows, D) weight (rows = C, or C·K with sub-centers) plus the shared loss keywords.

    Stateful subclasses follow one rule: ``check_batch`` first, then compute the loss with the
    proposed new state, and write the state only after the loss succeeded.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: Optional[MarginSpec],
        scale: Optional[float],
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        normalize: bool = True,
        backend: str = "auto",
        deterministic: bool = False,
        memory_budget: Optional[float] = 0,
        weight_rows: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        super().__init__()
        check_head_arguments(num_classes, embedding_dim, margin, scale)
        check_loss_keywords(reduction, ignore_index, normalize, backend, deterministic)
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.margin = margin
        if scale is not None:
            self.scale = float(scale)
        self.reduction, self.ignore_index, self.normalize = reduction, ignore_index, normalize
        self.backend, self.deterministic = backend, deterministic
        check_memory_budget(memory_budget)
        # bytes the backend may keep from forward to backward (0: none, None: unlimited);
        # every head has it: set ``head.memory_budget`` where a head's constructor does not take it
        self.memory_budget = memory_budget
        rows = weight_rows or num_classes
        check_float_dtype("dtype", dtype)
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=WEIGHT_INIT_STD)

    def check_batch(self, embeddings, labels, *, refuse_non_finite: bool = False,
                    why: str = "keeps running state and refuses a non-finite batch (its state is unchanged)") -> None:
        """Every check of (embeddings, labels) before any state changes: shapes, dtypes, label
        range (one host sync), and with ``refuse_non_finite`` finite embeddings, so that a bad
        batch is refused with the state untouched (``why``: the head's reason, for the error). With
        ``refuse_non_finite`` a CUDA-graph capture is refused: a replay would skip that host read."""
        if refuse_non_finite:
            refuse_capture(self, "checks each batch on the host (finite embeddings) before it may change its state",
                           " (or capture a stateless loss: mk.margin_cross_entropy, MarginSoftmax)")
        weight = self.weight[:: self.weight.shape[0] // self.num_classes]
        validate_inputs(
            embeddings, weight, labels, self.margin or NoMargin(), 1.0, None, None,
            self.reduction, self.ignore_index, self.backend, self.normalize, self.deterministic,
        )
        check_labels(labels, self.num_classes, self.ignore_index)
        if refuse_non_finite and embeddings.numel() and not bool(torch.isfinite(embeddings).all()):
            raise ValueError(
                f"embeddings contain NaN or infinite values; {type(self).__name__} {why}; "
                "check the backbone's output or lower the learning rate"
            )

    def loss(self, embeddings, labels, margin=None, scale=None, **overrides) -> torch.Tensor:
        """``margin_loss`` with this head's weight and keywords; ``overrides`` replace them."""
        kwargs = dict(
            reduction=self.reduction, ignore_index=self.ignore_index, normalize=self.normalize,
            backend=self.backend, deterministic=self.deterministic,
            memory_budget=getattr(self, "memory_budget", 0),
        )
        kwargs.update(overrides)
        return margin_loss(
            embeddings, self.weight, labels, margin or self.margin, self.scale if scale is None else scale, **kwargs
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, margin={self.margin}, "
            f"scale={getattr(self, 'scale', None)}"
        )
