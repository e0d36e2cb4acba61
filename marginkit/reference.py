"""The float64 textbook oracle: materialises the (B, C) logits and lets autograd work.

It is the truth the tests compare every backend to. It shares only the margin
formula ψ with the backends (through ``spec.differentiable_target``, whose
gradient autograd derives from the formula, independently of the analytic
derivatives the backends use). Never use it for training at scale.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from marginkit.specs import ArcFace, MarginSpec
from marginkit.validation import check_labels, validate_inputs

__all__ = ["margin_cross_entropy"]


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
    """``mk.margin_cross_entropy``'s core signature and meaning; computed in float64.

    ``backend`` and ``deterministic`` are accepted for signature compatibility and ignored;
    ``interclass_filtering_threshold``, ``feature_norm_scale`` and ``memory_budget`` are not
    taken (the tests hold those to their own oracles). The loss of a row is lse − ψ·s, so a
    row the model classifies with a huge margin reads exactly 0 where the backends keep ~1e-28.
    The loss is float32 (float64 for float64 inputs, like the backends). Gradients
    reach ``embeddings`` and ``weight`` in their own dtype; the loss is float32.
    """
    validate_inputs(
        embeddings, weight, labels, margin, scale, class_margins, sample_margins, reduction, ignore_index, backend,
        normalize, deterministic,
    )
    check_labels(labels, weight.shape[0], ignore_index)
    x = embeddings.to(torch.float64)
    w = weight.to(torch.float64)
    if normalize:
        x = F.normalize(x, dim=1, eps=1e-12)
        w = F.normalize(w, dim=1, eps=1e-12)
    cos = x @ w.T  # (B, C): the textbook way
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    cos_target = cos.gather(1, safe[:, None]).squeeze(1)
    # Its own margin gather and reduction: the oracle shares nothing with what it judges but the specs.
    m = sample_margins if sample_margins is not None else (
        None if class_margins is None else class_margins[safe]
    )
    # Margins are constants of the loss (as in every backend): no gradient reaches them.
    m = None if m is None else m.detach().to(torch.float64)
    psi = margin.differentiable_target(cos_target, m)
    onehot = F.one_hot(safe, weight.shape[0]).to(torch.bool) & keep[:, None]
    logits = scale * torch.where(onehot, psi[:, None], cos)
    losses = torch.logsumexp(logits, dim=1) - scale * psi
    out_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32  # as the backends
    losses = torch.where(keep, losses, torch.zeros_like(losses)).to(out_dtype)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / keep.sum().clamp_min(1)
