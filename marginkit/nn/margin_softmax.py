"""``MarginSoftmax``: a classification head with a margin, holding the (C, D) weight."""

from __future__ import annotations

import torch

from marginkit.nn._head import (
    HEAD_KEYWORDS, MARGIN_TENSOR_KEYWORDS, PER_CALL_KEYWORDS, ClassWeightHead, check_class_margins_now,
    check_keyword_names, hold_margin_tensors, with_margin_tensors,
)
from marginkit.specs import ArcFace, MarginSpec



class MarginSoftmax(ClassWeightHead):
    """Margin softmax loss layer (ArcFace, CosFace, SphereFace, combined) over ``num_classes``.

    Args:
        num_classes: C, the number of identities.
        embedding_dim: D, the feature size.
        margin: a margin spec, e.g. ``mk.ArcFace(0.5)`` (``mk.insightface_margin((1, 0.5, 0))`` to
            reproduce insightface exactly).
        scale: the logit scale s.
        **loss_kwargs: passed to ``margin_cross_entropy`` (``reduction``, ``ignore_index``,
            ``class_margins``, ``sample_margins``, ``normalize``, ``backend``, ``deterministic``,
            ``interclass_filtering_threshold``, ``feature_norm_scale``, ``memory_budget``); checked here, so a
            typo fails at construction, not at the first forward.

    Shapes: ``forward(embeddings (B, D), labels (B,) int64) -> loss`` (float32 scalar,
    or (B,) with ``reduction="none"``). ``.weight`` is (C, D), initialised normal(0, 0.01)
    like insightface's heads. Fixed ``class_margins`` / ``sample_margins`` are held as
    non-persistent buffers: they move with ``.to(device)`` and keep their dtype.
    """

    _keep_dtype_buffers = MARGIN_TENSOR_KEYWORDS

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: MarginSpec = ArcFace(),
        scale: float = 64.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **loss_kwargs,
    ) -> None:
        check_keyword_names("MarginSoftmax", loss_kwargs, HEAD_KEYWORDS + PER_CALL_KEYWORDS, ", dtype, device")
        head_kwargs = {k: loss_kwargs.pop(k) for k in HEAD_KEYWORDS if k in loss_kwargs}
        super().__init__(num_classes, embedding_dim, margin, scale, dtype=dtype, device=device, **head_kwargs)
        self.loss_kwargs = loss_kwargs
        if loss_kwargs:
            check_class_margins_now(self.weight, margin, scale, head_kwargs | loss_kwargs)
        hold_margin_tensors(self, loss_kwargs)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, **with_margin_tensors(self, self.loss_kwargs))
