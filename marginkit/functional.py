"""``margin_cross_entropy``: the public functional form of the pipeline."""

from __future__ import annotations

from typing import Optional

import torch

from marginkit._pipeline import check_pending_labels, margin_loss
from marginkit.specs import ArcFace, MarginSpec

__all__ = ["margin_cross_entropy", "check_pending_labels"]


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
    interclass_filtering_threshold: float = 0.0,
    feature_norm_scale: bool = False,
    memory_budget: Optional[float] = 0,
) -> torch.Tensor:
    """Margin softmax cross-entropy over all C classes without materialising (B, C) logits.

    Args:
        embeddings: (B, D) float32/float16/bfloat16 features.
        weight: (C, D) class weights: the dtype of ``embeddings``, or float32 with half-precision
            embeddings (fp32 master weights: computed in the embeddings' dtype without a (C, D)
            copy; ``weight.grad`` is float32).
        labels: (B,) int64 class ids in [0, C), or ``ignore_index``.
        margin: a margin spec (``mk.ArcFace()``, ``mk.CosFace()``, ...) giving the target logit.
        scale: s > 0; logits are s·ψ(cos θ_y) on the target column and s·cos θ_j elsewhere.
        class_margins: optional (C,) per-class margins replacing the spec's m.
        sample_margins: optional (B,) per-row margins replacing the spec's m.
        reduction: "mean" (over non-ignored rows), "sum" or "none" ((B,) float32, 0 on ignored rows).
        ignore_index: label value of rows that take no part in the loss.
        normalize: L2-normalise the rows of both inputs inside (gradients flow through it).
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        deterministic: Triton only: bitwise run-to-run identical gradients (a few MiB more and a
            little slower). The torch backend on the CPU is deterministic anyway.
        interclass_filtering_threshold: in [0, 1]; > 0 is insightface's inter-class filtering:
            on labelled rows, non-target cosines above it count as 0 (likely duplicate identities
            neither push the row nor get a gradient). 0 (default) turns it off.
        memory_budget: bytes of extra memory the loss may hold from the forward to the backward to
            go faster. The forward keeps the exp-scaled logits of as many whole backward chunks as
            fit, and the backward skips recomputing them (three GEMM passes instead of four).
            Triton: compute dtype, B·(element size + 1/8) bytes per class; torch backend: compute
            dtype (float32, float64 for float64 inputs), B·element size per class (+ B for sub-center
            heads' winners) and B·element size per chunk. Nothing is kept when no backward will run
            (``torch.no_grad()``, no input requiring grad). 0 (default): none kept, the bounded workspace
            (peak extra ~64 MiB at B = 1024). None: unlimited, all C kept (2.03 GiB at B = 1024,
            C = 1M in bf16 on Triton), the fastest setting. The torch backend keeps its one chunk
            (≤ 8 MiB) whatever the budget when every class fits in it.
        feature_norm_scale: A-Softmax as published (SphereFace, L-Softmax, pytorch-metric-learning's
            SphereFaceLoss): every logit of row i is further multiplied by ‖x_i‖, and the gradient
            includes that norm's (radial) part. Needs ``normalize=True``; holds a normalised (C, D)
            copy of the weight and autograd's state for it: about 4× the weight's bytes extra
            (measured: 99 MiB at C = 200K, D = 32 in float32, against 17 MiB without it).

    Under ``torch.autocast`` the embeddings are cast to the autocast dtype, a float32 weight is
    read as a master weight, and forward and backward run in that one precision.

    A label outside [0, C) raises ``ValueError``: at once on the CPU; on CUDA the check runs on
    the device (no host sync), the row is left out of the loss and of every gradient, and the
    error is raised by the next call (or ``mk.functional.check_pending_labels(wait=True)``).
    Margin values (NaN, negative, ArcFace's >= π) are checked the same way: the whole tensor at once
    on the CPU; on CUDA the rows that use a bad margin, left out and reported by the next call.
    Under ``torch.compile`` and CUDA-graph capture nothing is reported: a row with a bad label or a
    bad margin is left out without an error (``marginkit.cuda_graphs``).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or (B,) for reduction="none".
    """
    return margin_loss(
        embeddings, weight, labels, margin, scale, class_margins=class_margins, sample_margins=sample_margins,
        reduction=reduction, ignore_index=ignore_index, normalize=normalize, backend=backend,
        deterministic=deterministic, interclass_filtering_threshold=interclass_filtering_threshold,
        feature_norm_scale=feature_norm_scale, memory_budget=memory_budget,
    )
