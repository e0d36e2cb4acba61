"""IR-Softmax: the class weights are running class centers (no gradient).

Under class imbalance, learned classifier weights drift toward the head classes
(the rare classes' weights see few positive updates and many negative ones).
IR-Softmax replaces the learned weights by class centers kept as a moving average
of the normalised features, so every class's weight sits where its features are,
however few they are. With a CosFace margin it is IR-AM-Softmax, with a SphereFace
margin IR-A-Softmax; any margin spec works.
"""

from __future__ import annotations

import torch

from marginkit.ops import class_center_update_
from marginkit.cuda_graphs import refuse_capture
from marginkit.autograd_guards import refuse_recomputation
from marginkit.errors import check_positive_ints, check_real
from marginkit.functional import margin_cross_entropy
from marginkit.nn._head import (
    HEAD_KEYWORDS, MARGIN_TENSOR_KEYWORDS, PER_CALL_KEYWORDS, KeepBufferDtypes, check_class_margins_now,
    hold_margin_tensors, resolved_loss_keywords, take_loss_keywords, with_margin_tensors,
)
from marginkit.distributed.statistics_sync import (
    agree_once, broadcast_from_first_, check_sync_args, global_batch, local_loss, sync_group,
)
from marginkit.specs import CosFace, MarginSpec
from marginkit.validation import check_labels

#: the loss keywords IRSoftmax passes on
IR_KEYWORDS = HEAD_KEYWORDS + PER_CALL_KEYWORDS

__all__ = ["IRSoftmax"]


class IRSoftmax(KeepBufferDtypes):
    """IR-Softmax head (API.md): margin softmax against running class centers.

    Args:
        num_classes: C.
        embedding_dim: D.
        margin: any margin spec; ``CosFace(0.35)`` (IR-AM-Softmax, the default) or
            ``SphereFace(m)`` (IR-A-Softmax).
        scale: the logit scale s.
        momentum: weight of the old center in the update, in [0, 1].
        sync_statistics: under an initialised torch.distributed, update the centers from the
            global batch (every rank's rows, gathered over ``process_group``) so that they
            stay identical on every rank (default True; no effect in a single process).
        process_group: the ranks that share the centers (default: the world).
        **loss_kwargs: passed to ``margin_cross_entropy`` (``reduction``, ``ignore_index``,
            ``backend``...; ``class_margins``/``sample_margins`` with a single-m spec); checked
            here. ``memory_budget`` becomes the ``head.memory_budget`` attribute.

    ``.centers`` is a (C, D) float32 buffer, initialised to random unit rows (torch's
    global RNG). ``forward(embeddings (B, D), labels (B,)) -> loss`` computes
    ``margin_cross_entropy(x, centers, y, margin, scale)`` with the *current* centers,
    which receive no gradient (the embeddings do). Then, in training mode only, for every
    class c present in the batch (``ignore_index`` rows skipped):

        center_c ← normalize(momentum·center_c + (1 − momentum)·mean_{i: y_i = c} normalize(x_i))

    done in place by the csrc op ``class_center_update_`` (CPU or CUDA). Eval mode never
    moves the centers. Because the loss's backward needs the centers it was computed
    with, a training forward hands the loss a copy (O(C·D), freed after backward).
    The centers stay float32 whatever the embeddings' dtype (they are cast for the loss),
    also under ``.half()`` / ``.to(dtype)``.

    **Distributed training** (DDP or any torch.distributed job): with ``sync_statistics``
    each training forward gathers the (rows, D) embeddings and labels of every rank (one
    all-gather of B·D values) and applies the update above to the global batch, so the
    centers equal a single process's on the global batch; the first synchronised training
    forward also copies the first rank's centers to all ranks (as DDP does for
    parameters). Every rank of the group must then call a training forward together.
    The loss each rank returns is still its local batch's.
    """

    _keep_dtype_buffers = ("centers", *MARGIN_TENSOR_KEYWORDS)

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: MarginSpec = CosFace(0.35),
        scale: float = 64.0,
        momentum: float = 0.9,
        *,
        sync_statistics: bool = True,
        process_group=None,
        device=None,
        **loss_kwargs,
    ) -> None:
        super().__init__()
        check_positive_ints(num_classes=num_classes, embedding_dim=embedding_dim)
        check_sync_args(sync_statistics, process_group)
        if not isinstance(margin, MarginSpec):
            raise TypeError(f"margin must be a marginkit margin spec (mk.CosFace(), ...), got {margin!r}")
        check_real("scale", scale, low=0.0, low_inclusive=False)
        check_real("momentum", momentum, low=0.0, high=1.0)
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.margin, self.scale, self.momentum = margin, float(scale), float(momentum)
        # bytes the loss may keep from forward to backward; settable later as head.memory_budget
        self.memory_budget = take_loss_keywords("IRSoftmax", loss_kwargs, IR_KEYWORDS)
        self.loss_kwargs = loss_kwargs
        self.sync_statistics, self.process_group = sync_statistics, process_group
        self._centers_shared = False  # the first synchronised training forward broadcasts them
        self.ignore_index = int(loss_kwargs.get("ignore_index", -100))
        self.register_buffer("centers", torch.empty(num_classes, embedding_dim, dtype=torch.float32, device=device))
        self.reset_parameters()
        if loss_kwargs.get("class_margins") is not None:
            check_class_margins_now(self.centers, margin, scale, loss_kwargs)
        hold_margin_tensors(self, loss_kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.centers.copy_(torch.nn.functional.normalize(torch.randn_like(self.centers), dim=1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training:
            refuse_capture(self, "checks each training batch on the host before it moves the class centers")
            refuse_recomputation(self, "class centers")
        group = sync_group(self.sync_statistics, self.process_group) if self.training else None
        agree_once(self, group, self._sync_fields(), self.centers.device)
        if group is not None and not self._centers_shared:
            broadcast_from_first_([self.centers], group)
            self._centers_shared = True
        centers = self.centers.detach()
        if self.training or centers.dtype != embeddings.dtype:
            # A snapshot: the in-place update below must not change what backward sees.
            centers = centers.to(dtype=embeddings.dtype, copy=True)
        def compute() -> torch.Tensor:
            if torch.is_tensor(embeddings) and embeddings.dim() == 2 and embeddings.shape[1] != self.embedding_dim:
                raise ValueError(  # the loss would blame a "weight" this head does not have
                    f"embedding_dim mismatch: embeddings have D = {embeddings.shape[1]} but IRSoftmax was built with "
                    f"embedding_dim = {self.embedding_dim} (its centers are ({self.num_classes}, {self.embedding_dim}))"
                )
            # Centers are running state: a non-finite batch would poison them for good.
            if self.training and embeddings.numel() and not bool(torch.isfinite(embeddings).all()):
                raise ValueError(
                    "embeddings contain NaN or infinite values; IRSoftmax refuses a non-finite batch in training "
                    "mode (its centers are unchanged); check the backbone's output"
                )
            if self.training and torch.is_tensor(labels) and labels.dim() == 1 and labels.dtype == torch.int64:
                # eager, before the loss: on CUDA the loss only flags a bad label for its next call, which
                # the center update would then report a second time
                check_labels(labels, self.num_classes, self.ignore_index)
            return margin_cross_entropy(embeddings, centers, labels, self.margin, self.scale,
                                        memory_budget=self.memory_budget,
                                        **with_margin_tensors(self, self.loss_kwargs))

        loss, error = local_loss(compute, group)
        if self.training:
            x, y = global_batch(embeddings, labels, group, error)
            class_center_update_(self.centers, x, y, self.momentum, self.ignore_index)
        return loss

    def _sync_fields(self) -> dict:
        """What every rank that shares the centers must agree on (``agree_once``)."""
        return dict(num_classes=self.num_classes, embedding_dim=self.embedding_dim, margin=self.margin,
                    scale=self.scale, momentum=self.momentum,
                    **resolved_loss_keywords(with_margin_tensors(self, self.loss_kwargs), IR_KEYWORDS))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, margin={self.margin}, "
            f"scale={self.scale}, momentum={self.momentum}"
        )
