"""Range Loss (Zhang et al., ICCV 2017) as a module over the csrc op ``range_loss``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from marginkit.ops import range_loss
from marginkit.cuda_graphs import refuse_capture
from marginkit.errors import check_positive_ints, check_real
from marginkit.validation import check_ignore_index

__all__ = ["RangeLoss"]


class RangeLoss(nn.Module):
    """Range loss (API.md): harmonic mean of each class's k largest intra-class distances,
    plus a hinge on the closest pair of class means.

    Distances are squared Euclidean between the rows *as given* (normalise them first if
    you want the loss on the unit sphere). For each class with ≥ 2 rows in the batch:
    its k' = min(k, pairs) largest pairwise distances d_1..d_k';
    intra = Σ_classes k' / Σ_j 1/d_j. With x̄_c the means of the classes present,
    inter = max(margin − min_{Q≠R} ‖x̄_Q − x̄_R‖², 0) (0 with fewer than 2 classes).
    ``forward(embeddings (B, D), labels (B,) int64) -> alpha·intra + beta·inter``, a 0-d
    float32 tensor (float64 for float64 embeddings), differentiable in the embeddings.
    Runs the csrc op (CPU or CUDA kernels; see ``marginkit.ops.range_loss``).

    Rows labelled ``ignore_index`` (default −100, as ``margin_cross_entropy``) are left
    out; ``ignore_index=None`` keeps every row (labels are then plain group ids).

    Beside a margin softmax, with a weight λ (the paper trains softmax + λ·range loss)::

        head = mk.MarginSoftmax(C, D, mk.CosFace(0.35))      # or plain softmax, ArcFace...
        range_loss = mk.RangeLoss(k=2, margin=1.0)
        emb = backbone(images)
        loss = head(emb, labels) + lam * range_loss(torch.nn.functional.normalize(emb), labels)

    The range term only sees classes with several rows in the batch, so sample
    identities in groups (e.g. P identities × K images per batch) for it to act.
    """

    def __init__(
        self, k: int = 2, margin: float = 1.0, alpha: float = 1.0, beta: float = 1.0, *, ignore_index: Optional[int] = -100
    ) -> None:
        super().__init__()
        check_positive_ints(k=k)
        # negative weights would reward spreading a class out; a negative margin makes inter always 0
        check_real("margin", margin, low=0.0)
        check_real("alpha", alpha, low=0.0)
        check_real("beta", beta, low=0.0)
        if ignore_index is not None:
            check_ignore_index(ignore_index)
        self.k, self.margin, self.alpha, self.beta = k, float(margin), float(alpha), float(beta)
        self.ignore_index = ignore_index

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        refuse_capture(self, "reads each batch on the host (its ignored rows, the op's index checks)")
        if self.ignore_index is not None and isinstance(labels, torch.Tensor) and labels.dim() == 1:
            keep = labels != self.ignore_index
            if not bool(keep.all()):
                embeddings, labels = embeddings[keep], labels[keep]
        return range_loss(embeddings, labels, self.k, self.margin, self.alpha, self.beta)

    def extra_repr(self) -> str:
        return f"k={self.k}, margin={self.margin}, alpha={self.alpha}, beta={self.beta}"
