"""LDAM-style per-class margins (Cao et al., NeurIPS 2019) on the fused loss."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from marginkit._pipeline import in_range
from marginkit.autograd_guards import refuse_recomputation
from marginkit.distributed.statistics_sync import agree_once, check_sync_args, global_batch, sync_group
from marginkit.errors import check_real
from marginkit.nn._head import ClassWeightHead
from marginkit.specs import ArcFace, CosFace, MarginSpec

__all__ = ["LDAMSoftmax", "ldam_margins"]

def ldam_margins(class_counts: torch.Tensor, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM per-class margins (Cao et al., NeurIPS 2019): m_c = max_margin · n_c^(−1/4) / max_j n_j^(−1/4).

    The rarest class gets ``max_margin``. Counts below 1 (unseen classes) count as 1.
    Returns float32 (C,).
    """
    n = class_counts.detach().to(torch.float64).clamp_min(1.0)
    r = n.pow(-0.25)
    return (max_margin * r / r.max()).to(torch.float32)


class LDAMSoftmax(ClassWeightHead):
    """Margin softmax with LDAM-style per-class margins m_c ∝ n_c^(−1/4) (``class_margins``).

    Args:
        num_classes, embedding_dim: C and D.
        class_counts: (C,) training samples per class. ``None``: counted online from the
            labels of training-mode forwards (margins follow the counts seen so far;
            classes not seen yet get ``max_margin``).
        max_margin: the largest margin (LDAM: 0.5), given to the rarest class.
        scale: s (LDAM: 30).
        margin: the spec whose m the class margins replace: ``CosFace()`` (LDAM's additive
            logit margin on normalised features, the default), ``ArcFace()`` or
            ``CombinedMargin`` (m2).
        sync_statistics: with online counts under torch.distributed (DDP), count every rank's
            labels (an all-gather of the labels per training step), so the counts and margins are
            the same on every rank and equal one process's on the global batch. Off, each rank
            counts its own labels (and DDP's buffer broadcast keeps rank 0's). With it, every rank
            of the group must call a training forward together.
        process_group: the group to count over (default: the world).

    Buffers ``.class_counts`` (C,) int64 and ``.class_margins`` (C,) float32. LDAM's
    deferred re-weighting (DRW) schedule is a sampler/weighting choice and not part of
    this head. Online counts move only after the batch's loss has been computed.
    """

    _keep_dtype_buffers = ("class_margins",)

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        class_counts: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        max_margin: float = 0.5,
        scale: float = 30.0,
        margin: MarginSpec = CosFace(),
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        normalize: bool = True,
        backend: str = "auto",
        sync_statistics: bool = True,
        process_group=None,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        check_sync_args(sync_statistics, process_group)
        if not isinstance(margin, MarginSpec) or not margin.has_single_margin:
            raise ValueError(f"margin must be a spec with a single m (CosFace, ArcFace, CombinedMargin), got {margin!r}")
        check_real("max_margin", max_margin, low=0.0, high=math.pi if isinstance(margin, ArcFace) else None,
                   high_inclusive=False)
        super().__init__(
            num_classes, embedding_dim, margin, scale, reduction=reduction, ignore_index=ignore_index,
            normalize=normalize, backend=backend, dtype=dtype, device=device,
        )
        self.max_margin = float(max_margin)
        self.online = class_counts is None
        self.sync_statistics, self.process_group = sync_statistics, process_group
        counts = torch.zeros(num_classes, dtype=torch.int64) if class_counts is None else torch.as_tensor(class_counts)
        if tuple(counts.shape) != (num_classes,):
            raise ValueError(f"class_counts must have shape ({num_classes},), got {tuple(counts.shape)}")
        if not bool(torch.isfinite(counts.double()).all()) or bool((counts < 0).any()):
            raise ValueError("class_counts must be finite and >= 0")
        counts = counts.detach().cpu().round().to(torch.int64)
        self.register_buffer("class_counts", counts.to(device))
        self.register_buffer("class_margins", ldam_margins(counts, self.max_margin).to(device))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        counting = self.training and self.online
        if counting:
            refuse_recomputation(self, "class counts and margins")
        group = sync_group(self.sync_statistics, self.process_group) if counting else None
        fields = dict(num_classes=self.num_classes, margin=self.margin, scale=self.scale, max_margin=self.max_margin,
                      ignore_index=self.ignore_index)
        agree_once(self, group, fields, self.class_counts.device)
        error = None
        try:
            self.check_batch(embeddings, labels, refuse_non_finite=counting)
        except (TypeError, ValueError) as err:
            if group is None:
                raise
            error = err  # raised on every rank by the gather below, so none waits in it
        counts, margins = self.class_counts, self.class_margins
        if counting:
            with torch.no_grad():
                if group is not None:  # every rank's labels, in rank order (no embedding bytes travel)
                    rows = torch.empty((0 if error is not None else labels.shape[0], 0), device=counts.device)
                    _, labels_seen = global_batch(rows, labels, group, error)
                else:
                    labels_seen = labels
                # in range too: under torch.compile a bad label is left out (as by the loss), not raised
                keep = (labels_seen != self.ignore_index) & in_range(labels_seen, self.num_classes)
                where = torch.where(keep, labels_seen, torch.zeros_like(labels_seen))
                counts = counts.index_add(0, where, keep.to(torch.int64))
                margins = ldam_margins(counts, self.max_margin).to(margins.device)
        loss = self.loss(embeddings, labels, class_margins=margins)
        if counts is not self.class_counts:  # state moves only once the loss has succeeded
            self.class_counts.copy_(counts)
            self.class_margins.copy_(margins)
        return loss
