"""Sub-center ArcFace (Deng et al., ECCV 2020), chunked over classes.

Each class c has K sub-centers w_{c,1..K}, stored as rows c·K + k of a (C·K, D)
weight (the layout of the authors' code). The class cosine is the closest
sub-center's:

    cos θ_{i,c} = max_k cos(x_i, w_{c,k})

and the loss is the margin cross-entropy (ArcFace(0.5) in the paper) over these C
class cosines. The default ``ArcFace(0.5)`` takes ArcFace's fallback past π (API.md's ArcFace);
the authors' code (insightface's SubCenter-ArcFace) has none: ``CombinedMargin(1.0, 0.5, 0.0)``
computes theirs, loss and gradients (they differ only on rows with θ_y + 0.5 > π). The max is a
hard selection, so only the winning sub-center of each (row, class) pair receives gradient, as
with autograd through ``torch.max``.

It runs through the one pipeline with ``sub_centers=K``: the torch backend's chunk step
takes the max over each class's K rows (the Triton kernels take one row per class, so the
registry picks the torch backend for sub-center weights on every device). Nothing (B, C·K)
or (B, C) is allocated.

``dominant_weight()`` returns the (C, D) weight of each class's dominant sub-center
(the paper's post-training step that drops non-dominant sub-centers); pass it the
training features to count winners, or it falls back to the first sub-center.
"""

from __future__ import annotations

from typing import Optional

import torch

from marginkit._pipeline import margin_loss
from marginkit.backends.common import sub_center_target
from marginkit.nn._head import ClassWeightHead
from marginkit.specs import ArcFace, MarginSpec

__all__ = ["SubCenterArcFace", "sub_center_cross_entropy", "sub_center_target"]


def _check_sub_centers(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (sub-centers per class) must be a positive int, got {k!r}")


def sub_center_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    margin: MarginSpec = ArcFace(0.5),
    scale: float = 64.0,
    *,
    class_margins: Optional[torch.Tensor] = None,
    sample_margins: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    normalize: bool = True,
) -> torch.Tensor:
    """Margin cross-entropy over class cosines max_k cos(x, w_{c,k}); weight is (C·K, D).

    Same arguments and meaning as ``mk.margin_cross_entropy`` otherwise (class_margins
    is (C,), indexed by class, not by sub-center).
    """
    _check_sub_centers(k)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] % k:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of k = {k} (expected (C·K, D))")
    return margin_loss(
        embeddings, weight, labels, margin, scale, class_margins=class_margins, sample_margins=sample_margins,
        reduction=reduction, ignore_index=ignore_index, normalize=normalize, sub_centers=k,
    )


class SubCenterArcFace(ClassWeightHead):
    """Sub-center ArcFace head: K sub-centers per class, max over them, ArcFace margin.

    Args:
        num_classes, embedding_dim: C and D.
        k: sub-centers per class (paper: 3).
        margin: margin spec on the class cosine (paper: ``ArcFace(0.5)``; the authors' code, with no
            fallback past π: ``CombinedMargin(1.0, 0.5, 0.0)``).
        scale: s (paper: 64).
        reduction, ignore_index, normalize: as ``margin_cross_entropy``.

    ``.weight`` is a (C·K, D) parameter; row c·K + j is sub-center j of class c.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        k: int = 3,
        margin: MarginSpec = ArcFace(0.5),
        scale: float = 64.0,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        normalize: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        _check_sub_centers(k)
        super().__init__(
            num_classes, embedding_dim, margin, scale, reduction=reduction, ignore_index=ignore_index,
            normalize=normalize, weight_rows=num_classes * k, dtype=dtype, device=device,
        )
        self.k = k

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, sub_centers=self.k)

    @torch.no_grad()
    def dominant_weight(self, embeddings: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(C, D): per class, the sub-center that wins most often over (embeddings, labels)
        (ties and classes without rows: the lowest index). Without data: sub-center 0."""
        k, C = self.k, self.num_classes
        votes = torch.zeros(C, k, dtype=torch.int64, device=self.weight.device)
        if embeddings is not None and labels is not None:
            labels_local = torch.where(labels == self.ignore_index, torch.full_like(labels, -1), labels)
            _, winner = sub_center_target(embeddings, self.weight, labels_local, k, self.normalize)
            won = winner[winner >= 0]
            votes.view(-1).index_add_(0, won, torch.ones_like(won))
        best = votes.argmax(dim=1)  # first maximum
        return self.weight.view(C, k, -1)[torch.arange(C, device=best.device), best].clone()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}"
