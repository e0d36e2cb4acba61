"""``MarginSoftmax``: a classification head with a margin, holding the (C, D) weight."""

from __future__ import annotations

import torch
from torch import nn

from marginkit.errors import MarginKitTypeError, check_positive_ints, check_real
from marginkit.functional import margin_cross_entropy
from marginkit.specs import ArcFace, MarginSpec


def check_head_arguments(num_classes, embedding_dim, margin, scale) -> None:
    """Typed errors for the constructor arguments every margin-softmax head shares."""
    check_positive_ints(num_classes=num_classes, embedding_dim=embedding_dim)
    if not isinstance(margin, MarginSpec):
        raise MarginKitTypeError(f"margin must be a marginkit margin spec (mk.ArcFace(), ...), got {margin!r}")
    check_real("scale", scale, low=0.0, low_inclusive=False)


class MarginSoftmax(nn.Module):
    """Margin softmax loss layer (ArcFace, CosFace, SphereFace, combined) over ``num_classes``.

    Args:
        num_classes: C, the number of identities.
        embedding_dim: D, the feature size.
        margin: a margin spec, e.g. ``mk.ArcFace(0.5)``.
        scale: the logit scale s.
        **loss_kwargs: passed to ``margin_cross_entropy`` (``reduction``, ``ignore_index``,
            ``class_margins``, ``normalize``, ``backend``...).

    Shapes: ``forward(embeddings (B, D), labels (B,) int64) -> loss`` (float32 scalar,
    or (B,) with ``reduction="none"``). ``.weight`` is (C, D), initialised normal(0, 0.01)
    like insightface's heads.
    """

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
        super().__init__()
        check_head_arguments(num_classes, embedding_dim, margin, scale)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.margin = margin
        self.scale = float(scale)
        self.loss_kwargs = loss_kwargs
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margin_cross_entropy(embeddings, self.weight, labels, self.margin, self.scale, **self.loss_kwargs)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, margin={self.margin}, scale={self.scale}"
