"""Sub-center ArcFace (Deng et al., ECCV 2020), chunked over classes.

Each class c has K sub-centers w_{c,1..K}, stored as rows c·K + k of a (C·K, D)
weight (the layout of the authors' code). The class cosine is the closest
sub-center's:

    cos θ_{i,c} = max_k cos(x_i, w_{c,k})

and the loss is the margin cross-entropy (ArcFace(0.5) in the paper) over these C
class cosines. The max is a hard selection, so only the winning sub-center of each
(row, class) pair receives gradient, as with autograd through ``torch.max``.

The fused backends take one weight row per class, and the winning sub-center
differs from row to row, so this runs its own chunked PyTorch loop
(``marginkit.nn._chunked``): per chunk of n classes a (B, n·K) cosine tile reduced
to (B, n) by the max, with B·n·K ≤ 2^21 floats; online log-sum-exp forward and
recompute backward; the target column in float64. Nothing (B, C·K) or (B, C) is
allocated. On CUDA it is cuBLAS GEMMs driven from Python, not a Triton kernel.

``dominant_weight()`` returns the (C, D) weight of each class's dominant sub-center
(the paper's post-training step that drops non-dominant sub-centers); pass it the
training features to count winners, or it falls back to the first sub-center.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from marginkit.backends.common import (
    NORM_EPS,
    apply_target_gradients,
    combine_partials,
    compute_dtype,
    inverse_norms,
    normalization_backward,
    owned_labels,
    target_gradient,
)
from marginkit.errors import MarginKitTypeError, check_positive_ints, check_real
from marginkit.functional import reduce_losses, rows_margins, validate_inputs
from marginkit.backends.torch_chunked import class_chunks, online_lse_step
from marginkit.nn._chunked import unit_rows
from marginkit.specs import ArcFace, MarginSpec

__all__ = ["SubCenterArcFace", "sub_center_cross_entropy", "sub_center_target"]


@torch.no_grad()
def sub_center_target(
    embeddings: torch.Tensor, weight: torch.Tensor, labels_local: torch.Tensor, k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos θ_y (B,) float64, winning weight row y·K + k* (B,) int64; -1 on ignored rows)."""
    owned = labels_local >= 0
    safe = torch.where(owned, labels_local, torch.zeros_like(labels_local))
    rows = safe[:, None] * k + torch.arange(k, device=labels_local.device)[None, :]
    x = embeddings.to(torch.float64)
    w = weight.index_select(0, rows.reshape(-1)).to(torch.float64).view(x.shape[0], k, weight.shape[1])
    dots = torch.einsum("bd,bkd->bk", x, w)
    if normalize:
        dots = dots / (
            torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(NORM_EPS)
            * torch.linalg.vector_norm(w, dim=2).clamp_min(NORM_EPS)
        )
    cos, best = dots.max(dim=1)
    cos = torch.where(owned, cos, torch.zeros_like(cos))
    winner = torch.where(owned, safe * k + best, torch.full_like(safe, -1))
    return cos, winner


def _chunk_terms(x_unit, weight, w_inv, start, stop, k, labels_local, scale):
    """Per chunk of classes [start, stop): w_unit (n·K, D), scaled class logits (B, n),
    winning sub-center (B, n) and the target mask (B, n)."""
    w_unit = weight[start * k : stop * k].to(x_unit.dtype) * w_inv[start * k : stop * k, None]
    cos = (x_unit @ w_unit.T).view(x_unit.shape[0], stop - start, k)
    best_cos, best = cos.max(dim=2)
    cols = torch.arange(start, stop, device=labels_local.device)
    is_target = labels_local[:, None] == cols[None, :]
    return w_unit, best_cos.mul_(scale), best, is_target


class _SubCenterCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, weight, labels_local, winner, psi, dpsi, k, scale, normalize, chunk_elements):
        with torch.no_grad():
            x_unit, _ = unit_rows(embeddings, normalize)
            w_inv = inverse_norms(weight, normalize)
            B, C = embeddings.shape[0], weight.shape[0] // k
            row_max = torch.full((B,), float("-inf"), dtype=x_unit.dtype, device=embeddings.device)
            row_sumexp = torch.zeros(B, dtype=x_unit.dtype, device=embeddings.device)
            for start, stop in class_chunks(B, C, chunk_elements, per_class=k):
                _, logits, _, is_target = _chunk_terms(x_unit, weight, w_inv, start, stop, k, labels_local, scale)
                row_max, row_sumexp = online_lse_step(row_max, row_sumexp, logits.masked_fill_(is_target, float("-inf")))
            losses, lse = combine_partials(row_max, row_sumexp, psi, scale)
            losses = torch.where(labels_local >= 0, losses, torch.zeros_like(losses))
        ctx.save_for_backward(embeddings, weight, labels_local, winner, dpsi, losses, lse)
        ctx.k, ctx.scale, ctx.normalize, ctx.chunk_elements = k, scale, normalize, chunk_elements
        return losses.to(compute_dtype(embeddings))

    @staticmethod
    @torch.no_grad()
    def backward(ctx, grad_losses):
        embeddings, weight, labels_local, winner, dpsi, losses, lse = ctx.saved_tensors
        k, scale, normalize = ctx.k, ctx.scale, ctx.normalize
        grad_rows = torch.where(labels_local >= 0, grad_losses, torch.zeros_like(grad_losses))
        x_unit, x_inv = unit_rows(embeddings, normalize)
        w_inv = inverse_norms(weight, normalize)
        g_scaled = (grad_rows.to(x_unit.dtype) * scale)[:, None]
        lse_c = lse.to(x_unit.dtype)[:, None]
        grad_x_unit = torch.zeros_like(x_unit)
        grad_weight = torch.empty_like(weight)
        B, C = embeddings.shape[0], weight.shape[0] // k
        for start, stop in class_chunks(B, C, ctx.chunk_elements, per_class=k):
            w_unit, logits, best, is_target = _chunk_terms(x_unit, weight, w_inv, start, stop, k, labels_local, scale)
            grad_cos = torch.exp(logits - lse_c).mul_(g_scaled).masked_fill_(is_target, 0.0)
            # Route each (row, class) gradient to its winning sub-center.
            grad_sub = torch.zeros(B, stop - start, k, dtype=grad_cos.dtype, device=grad_cos.device)
            grad_sub.scatter_(2, best[:, :, None], grad_cos[:, :, None])
            grad_sub = grad_sub.view(B, (stop - start) * k)
            grad_x_unit += grad_sub @ w_unit
            grad_weight[start * k : stop * k] = normalization_backward(
                grad_sub.T @ x_unit, weight[start * k : stop * k], w_inv[start * k : stop * k], normalize
            ).to(weight.dtype)
        grad_embeddings = normalization_backward(grad_x_unit, embeddings, x_inv, normalize)
        target_grad = target_gradient(losses, dpsi, grad_rows, scale)
        grad_embeddings = apply_target_gradients(
            grad_embeddings, grad_weight, embeddings, weight, winner, target_grad, normalize, embeddings.dtype
        )
        return grad_embeddings, grad_weight, None, None, None, None, None, None, None, None


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
    chunk_elements: Optional[int] = None,
) -> torch.Tensor:
    """Margin cross-entropy over class cosines max_k cos(x, w_{c,k}); weight is (C·K, D).

    Same arguments and meaning as ``mk.margin_cross_entropy`` otherwise (class_margins
    is (C,), indexed by class, not by sub-center).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (sub-centers per class) must be a positive int, got {k!r}")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] % k:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of k = {k} (expected (C·K, D))")
    if not isinstance(weight, torch.Tensor):
        raise MarginKitTypeError(f"weight must be a torch.Tensor of shape (C·K, D), got {type(weight).__name__}")
    # Validate against a (C, D) view of the class count (labels must lie in [0, C)).
    class_view = weight[:: k] if weight.dim() == 2 else weight
    validate_inputs(
        embeddings, class_view, labels, margin, scale, class_margins, sample_margins, reduction, ignore_index, "torch"
    )
    labels_local = owned_labels(labels, ignore_index)
    cos_target, winner = sub_center_target(embeddings, weight, labels_local, k, normalize)
    psi, dpsi = margin.target_terms(cos_target, rows_margins(labels, ignore_index, class_margins, sample_margins))
    losses = _SubCenterCE.apply(
        embeddings, weight, labels_local, winner, psi, dpsi, k, float(scale), normalize, chunk_elements
    )
    return reduce_losses(losses, labels, ignore_index, reduction)


class SubCenterArcFace(nn.Module):
    """Sub-center ArcFace head: K sub-centers per class, max over them, ArcFace margin.

    Args:
        num_classes, embedding_dim: C and D.
        k: sub-centers per class (paper: 3).
        margin: margin spec on the class cosine (paper: ``ArcFace(0.5)``).
        scale: s (paper: 64).
        reduction, ignore_index, normalize, chunk_elements: as ``margin_cross_entropy``.

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
        chunk_elements: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        super().__init__()
        check_positive_ints(num_classes=num_classes, embedding_dim=embedding_dim)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not isinstance(margin, MarginSpec):
            raise TypeError(f"margin must be a marginkit margin spec, got {margin!r}")
        check_real("scale", scale, low=0.0, low_inclusive=False)
        self.num_classes, self.embedding_dim, self.k = num_classes, embedding_dim, k
        self.margin, self.scale = margin, float(scale)
        self.reduction, self.ignore_index, self.normalize = reduction, ignore_index, normalize
        self.chunk_elements = chunk_elements
        self.weight = nn.Parameter(torch.empty(num_classes * k, embedding_dim, dtype=dtype, device=device))
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sub_center_cross_entropy(
            embeddings, self.weight, labels, self.k, self.margin, self.scale,
            reduction=self.reduction, ignore_index=self.ignore_index, normalize=self.normalize,
            chunk_elements=self.chunk_elements,
        )

    @torch.no_grad()
    def dominant_weight(self, embeddings: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(C, D): per class, the sub-center that wins most often over (embeddings, labels)
        (ties and classes without rows: the lowest index). Without data: sub-center 0."""
        k, C = self.k, self.num_classes
        votes = torch.zeros(C, k, dtype=torch.int64, device=self.weight.device)
        if embeddings is not None and labels is not None:
            labels_local = owned_labels(labels, self.ignore_index)
            _, winner = sub_center_target(embeddings, self.weight, labels_local, k, self.normalize)
            won = winner[winner >= 0]
            votes.view(-1).index_add_(0, won, torch.ones_like(won))
        best = votes.argmax(dim=1)  # first maximum
        return self.weight.view(C, k, -1)[torch.arange(C, device=best.device), best].clone()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, k={self.k}, margin={self.margin}, scale={self.scale}"
