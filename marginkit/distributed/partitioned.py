"""``PartitionedMarginSoftmax``: a margin-softmax head whose classes are sharded over ranks.

One training step on every rank r of W (B = global batch, D = embedding size,
C_r = the classes r owns, all collectives on the head's process group):

forward
  1. all-gather of 2 int64 per rank: local batch sizes (uneven batches) and an
     error code; a bad input on any rank raises the same exception on every rank.
  2. all-gather of the local rows, embeddings and labels packed as raw bytes
     (B·(D·itemsize + 8) bytes gathered).
  3. local work: Partial FC sampling (sample_rate < 1), the target cosine and ψ,
     dψ where r owns the label, and the backend's non-target partials (row max,
     row sum-exp) over r's classes, ``backends.<torch_chunked|triton>.lse_partials``.
  4. one all-reduce (sum) of 2·B float64: the partial sum-exps rescaled to a
     common shift, and ψ (non-zero only on the owner). The shift is ``scale``
     (an upper bound of every logit when normalize=True), which float64 holds
     without underflow as long as 2·scale < 600; otherwise (or normalize=False)
     an all-reduce (max) of B float32 row maxima comes first.
  5. ``common.combine_partials`` -> per-row loss and global log-sum-exp, the same
     bits on every rank.

backward
  6. local: ``grads_from_lse`` over r's classes + the target column's share
     (``common.apply_target_gradients``) for the rows r owns; the weight gradient is
     complete locally (r owns those rows).
  7. one reduce-scatter of the B×D float32 embedding gradient (each rank receives
     its own rows; an all-reduce and a slice where a backend has no reduce-scatter).

Nothing of size B × C_r crosses the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from marginkit.backends.common import (
    apply_target_gradients,
    combine_partials,
    compute_dtype,
    target_cosine,
    target_gradient,
)
from marginkit.distributed import collectives as coll
from marginkit.distributed.sharding import group_size_and_rank, shard_range
from marginkit.errors import MarginKitTypeError, check_choice, check_real
from marginkit.functional import BACKENDS, REDUCTIONS, backend_module, resolve_backend
from marginkit.nn.margin_softmax import check_head_arguments
from marginkit.specs import ArcFace, MarginSpec

__all__ = ["PartitionedMarginSoftmax", "PER_CLASS_STATE"]

# Per-class tensors a head may hold besides ``weight`` (first dimension = its classes).
# They reshard with the weight (full_state_dict / load_full_state_dict / DCP).
PER_CLASS_STATE = (
    "weight",
    "class_margins",
    "momentum_buffer",
    "momentum_initialized",
    "exp_avg",
    "exp_avg_sq",
    "adam_step",
)

# Rows of the seeded initialisation are drawn in blocks of this many global classes,
# each block from its own generator, so any shard draws the same values for its rows.
INIT_BLOCK_ROWS = 4096

# exp(-2·scale) must stay well inside float64's range for the fixed-shift combine.
_FIXED_SHIFT_MAX_SCALE = 300.0



def _mix(seed: int, k: int) -> int:
    """A 63-bit generator seed for block k (splitmix64-style mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + k * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


@torch.no_grad()
def seeded_normal_rows(
    start: int, stop: int, num_classes: int, dim: int, seed: int, std: float, device, dtype
) -> torch.Tensor:
    """Rows [start, stop) of a (num_classes, dim) normal(0, std) matrix defined by ``seed``.

    The matrix is drawn in blocks of ``INIT_BLOCK_ROWS`` global rows, block k from a
    generator seeded by (seed, k) on ``device``'s type, so the rows do not depend on how
    the classes are sharded: any world size builds the same global weight (for a given
    device type; CPU and CUDA generators give different streams).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.empty(stop - start, dim, dtype=dtype, device=device)
    if stop <= start or device.type == "meta":
        return out
    gen = torch.Generator(device=device)
    first, last = start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS
    for k in range(first, last + 1):
        b0 = k * INIT_BLOCK_ROWS
        b1 = min(b0 + INIT_BLOCK_ROWS, num_classes)
        gen.manual_seed(_mix(seed, k))
        block = torch.empty(b1 - b0, dim, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
        lo, hi = max(start, b0), min(stop, b1)
        out[lo - start : hi - start] = block[lo - b0 : hi - b0].to(dtype)
    return out


def _backend_module(backend: str, device: torch.device):
    """The fused backend running the shard's two phases (notes/CONTRACTS.md)."""
    return backend_module(resolve_backend(backend, device))


# --------------------------------------------------------------------------------------
# Collective input validation
# --------------------------------------------------------------------------------------
_OK, _VALUE_ERROR, _TYPE_ERROR = coll.OK, coll.VALUE_ERROR, coll.TYPE_ERROR


def _local_problem(head: "PartitionedMarginSoftmax", x, labels) -> tuple[int, int, str]:
    """(local batch size, error kind, message) for this rank's inputs."""
    w = head.weight
    if not isinstance(x, torch.Tensor):
        return 0, _TYPE_ERROR, f"local_embeddings must be a torch.Tensor of shape (B, D), got {type(x).__name__}"
    b = x.shape[0] if x.dim() >= 1 else 0
    if x.dim() != 2:
        return b, _VALUE_ERROR, f"local_embeddings must have shape (B, D), got shape {tuple(x.shape)}"
    if x.shape[1] != head.embedding_dim:
        return b, _VALUE_ERROR, (
            f"embedding_dim mismatch: local_embeddings have D = {x.shape[1]} but the head has D = {head.embedding_dim}"
        )
    if x.dtype != w.dtype:
        return b, _TYPE_ERROR, (
            f"local_embeddings dtype {x.dtype} differs from the head's weight dtype {w.dtype}; cast one to match"
        )
    if x.device != w.device:
        return b, _TYPE_ERROR, f"local_embeddings are on {x.device} but the head's weight is on {w.device}"
    if not isinstance(labels, torch.Tensor):
        return b, _TYPE_ERROR, f"local_labels must be a torch.Tensor of shape (B,), got {type(labels).__name__}"
    if labels.dim() != 1 or labels.shape[0] != b:
        return b, _VALUE_ERROR, f"local_labels must have shape (B,) = ({b},), got shape {tuple(labels.shape)}"
    if labels.dtype != torch.int64:
        return b, _TYPE_ERROR, f"local_labels must be int64 (torch.long), got {labels.dtype}; use labels.long()"
    if labels.device != w.device:
        return b, _TYPE_ERROR, f"local_labels are on {labels.device} but the head's weight is on {w.device}"
    if b:
        bad = (labels != head.ignore_index) & ((labels < 0) | (labels >= head.num_classes))
        if bool(bad.any()):
            value = int(labels[bad][0])
            return b, _VALUE_ERROR, (
                f"labels contains {value}, outside [0, C) = [0, {head.num_classes}) and not ignore_index "
                f"({head.ignore_index}); fix the labels or the number of classes"
            )
    return b, _OK, ""


def _check_inputs_everywhere(head: "PartitionedMarginSoftmax", x, labels) -> list[int]:
    """Every rank's local batch size; raises the same error on every rank when any rank's
    inputs are bad (one all-gather of 2 int64 per rank; a broadcast only on the error path)."""
    b, kind, msg = _local_problem(head, x, labels)
    group, world = head._group, head.world_size
    if group is None:
        if kind != _OK:
            raise (ValueError if kind == _VALUE_ERROR else MarginKitTypeError)(msg)
        return [b]
    meta = torch.tensor([b, kind], dtype=torch.int64, device=head.weight.device)
    table = coll.all_gather_small(meta, world, group).cpu()
    coll.raise_first_error(table[:, 1].tolist(), msg, group, head.weight.device)
    return table[:, 0].tolist()


# --------------------------------------------------------------------------------------
# The autograd function
# --------------------------------------------------------------------------------------
@dataclass
class _StepConfig:
    """Everything the autograd function needs besides the two differentiable inputs."""

    labels: torch.Tensor  # local labels (b,)
    sizes: list
    head: Any
    sampled: Optional[torch.Tensor] = None  # out: local class ids used this step (sample_rate < 1)
    extra: dict = field(default_factory=dict)


class _PartitionedMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_embeddings, weight, cfg: _StepConfig):
        head = cfg.head
        group, sizes = head._group, cfg.sizes
        dtype, es = local_embeddings.dtype, local_embeddings.element_size()
        dim = local_embeddings.shape[1]
        # 2. one all-gather of [embedding bytes | label bytes] rows.
        packed = torch.cat([coll.to_byte_rows(local_embeddings), coll.to_byte_rows(cfg.labels)], dim=1)
        packed = coll.all_gather_rows(packed, sizes, group)
        x = coll.from_byte_rows(packed[:, : dim * es], dtype, (dim,))
        labels = coll.from_byte_rows(packed[:, dim * es :], torch.int64, ())
        valid = labels != head.ignore_index
        start, stop = head.class_start, head.class_stop

        # 3. this shard's classes (all of them, or the Partial FC sample).
        owned = valid & (labels >= start) & (labels < stop)
        sample = head._sample_classes(torch.where(valid, labels, torch.full_like(labels, -1)))
        if sample is None:
            index, w = None, weight
            labels_local = torch.where(owned, labels - start, torch.full_like(labels, -1))
        else:
            # index: sorted local ids kept (every positive included); labels_local: the
            # position of each row's class in index, -1 where another rank owns it.
            index, labels_local = sample
            w = weight.index_select(0, index)
        cfg.sampled = index

        if w.shape[0]:
            cos = target_cosine(x, w, labels_local, head.normalize)
        else:  # no class here: no row is owned
            cos = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        margins = None
        if head.class_margins is not None:  # per-row margins, needed on the owner only
            if head.num_local:
                cls = torch.where(owned, labels - start, torch.zeros_like(labels))
                margins = head.class_margins.index_select(0, cls)
            else:
                margins = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
        psi, dpsi = head.margin.target_terms(cos, margins)
        zero = torch.zeros_like(psi)
        psi = torch.where(owned, psi, zero)
        dpsi = torch.where(owned, dpsi, zero)

        if w.shape[0]:
            backend = _backend_module(head.backend, x.device)
            row_max, row_sumexp = backend.lse_partials(x, w, labels_local, head.scale, head.normalize)
        else:  # no class here (C < W, or nothing sampled): empty partials
            row_max = torch.full((x.shape[0],), float("-inf"), dtype=compute_dtype(x), device=x.device)
            row_sumexp = torch.zeros(x.shape[0], dtype=compute_dtype(x), device=x.device)

        # 4. combine the partials across ranks: one all-reduce of 2·B float64.
        row_max64 = row_max.to(torch.float64)
        if head.normalize and head.scale <= _FIXED_SHIFT_MAX_SCALE:
            shift = torch.full_like(row_max64, head.scale)
        else:
            shift = coll.all_reduce_(row_max.clone(), dist.ReduceOp.MAX, group).to(torch.float64)
        rescale = torch.exp(row_max64 - torch.where(torch.isinf(shift), zero, shift))
        sumexp = torch.where(row_sumexp > 0, row_sumexp.to(torch.float64) * rescale, zero)
        both = coll.all_reduce_(torch.stack([sumexp, psi]), dist.ReduceOp.SUM, group)
        losses, lse = combine_partials(shift, both[0], both[1], head.scale)
        losses = torch.where(valid, losses, zero)
        cfg.extra["count"] = valid.sum()

        ctx.save_for_backward(x, w, labels_local, valid, dpsi, losses, lse, index if index is not None else x[:0, 0])
        ctx.cfg = cfg
        ctx.local_dtype = dtype
        ctx.weight_shape = weight.shape
        ctx.sampled = index is not None
        return losses.to(compute_dtype(local_embeddings))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses):
        x, w, labels_local, valid, dpsi, losses, lse, index = ctx.saved_tensors
        cfg = ctx.cfg
        head = cfg.head
        grad_rows = torch.where(valid, grad_losses, torch.zeros_like(grad_losses))
        if w.shape[0]:
            backend = _backend_module(head.backend, x.device)
            grad_x, grad_w = backend.grads_from_lse(x, w, labels_local, lse, grad_rows, head.scale, head.normalize)
        else:
            grad_x, grad_w = torch.zeros(x.shape, dtype=compute_dtype(x), device=x.device), torch.zeros_like(w)
        if w.shape[0]:
            tgrad = target_gradient(losses, dpsi, grad_rows, head.scale)
            grad_x = apply_target_gradients(grad_x, grad_w, x, w, labels_local, tgrad, head.normalize, compute_dtype(x))
        # 7. the embedding gradient summed over shards; this rank keeps its rows.
        grad_local = coll.sum_rows_to_owner(grad_x, cfg.sizes, head.rank, head._group)
        factor = head._grad_factor()
        if factor != 1.0:
            grad_local = grad_local * factor
        grad_local = grad_local.to(ctx.local_dtype)
        if ctx.sampled:
            if head.sparse_grad:  # (S, D) values: no C_r × D gradient is ever written
                grad_w = torch.sparse_coo_tensor(
                    index[None], grad_w, ctx.weight_shape, is_coalesced=True, check_invariants=False
                )
            else:
                dense = grad_w.new_zeros(ctx.weight_shape)
                dense.index_copy_(0, index, grad_w)
                grad_w = dense
            head._note_updated_rows(index)
        else:
            head._note_updated_rows(None)
        return grad_local, grad_w, None


# --------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------
class PartitionedMarginSoftmax(nn.Module):
    """Margin softmax head with its classes sharded over the ranks of a process group.

    Rank r of W holds the weight rows of global classes ``shard_range(num_classes, W, r)``
    in ``.weight`` (a ``Parameter`` of shape (C_r, D)). ``forward(local_embeddings,
    local_labels)`` takes this rank's rows of the global batch (local batch sizes may
    differ between ranks, and may be 0), with *global* class ids; every rank returns the
    same loss, equal to ``mk.margin_cross_entropy`` over the global batch (all ranks'
    rows in rank order) with the full (C, D) weight. Gradients: each rank's local
    embeddings get those rows of the global-batch gradient (times ``grad_scale``, below)
    and ``.weight`` gets those rows of the full weight's gradient. Every rank must call
    ``forward`` and ``backward`` the same number of times, in the same order (they hold
    collectives), and back-propagate the returned loss as is.

    Args:
        num_classes: C, the global number of classes.
        embedding_dim: D.
        margin: a margin spec (``mk.ArcFace()``, ``mk.CosFace()``, ...).
        scale: the logit scale s > 0.
        process_group: the ranks sharing the classes (default: the world; without an
            initialised ``torch.distributed`` the head is a one-rank head).
        sample_rate: in (0, 1]. Below 1 (Partial FC, training mode only): every step each
            rank keeps every positive class of the global batch in its shard plus uniform
            negatives, ``int(sample_rate · C_r)`` classes in all (at least the positives),
            drawn by ``marginkit.backends.cuda.partial_fc_sample`` from (seed, step); the
            loss is the softmax over the kept classes, and only kept rows of ``.weight``
            get a (non-zero) gradient. Step such a head with :class:`PartialFCSGD` /
            :class:`PartialFCAdamW` (row-sparse: unsampled rows and their optimizer state
            never move), not with a dense ``torch.optim`` optimizer, whose weight decay and
            momentum would move every row. Evaluation mode uses every class. After a
            sampled forward, ``last_sampled`` holds the kept local class ids (sorted; add
            ``class_start`` for global ids).
        class_margins: optional global (C,) float tensor of per-class margins replacing the
            spec's m (CosFace, ArcFace; m2 of CombinedMargin). Held as a buffer of this
            rank's entries (``.class_margins``, shape (C_r,)) and resharded with the weight.
        reduction: "mean" (over the non-ignored rows of the global batch), "sum", or "none"
            (the (B_global,) per-row losses, the same on every rank).
        ignore_index: label of rows that take no part in the loss.
        normalize: L2-normalise embeddings and weight rows inside (as margin_cross_entropy).
        grad_scale: multiplier of the gradient each rank's *local embeddings* receive.
            ``"global"`` (default, 1): the gradient of the returned global-mean loss, as
            API.md states. When the backbone is wrapped in ``DistributedDataParallel``, DDP
            *averages* the backbone's parameter gradients over the W ranks, so the backbone
            then sees 1/W of the gradient of the global-mean loss. ``"ddp"`` (= W) undoes
            that: after DDP's average the backbone's gradient equals the gradient of the
            global-mean loss, which is what insightface's Partial FC does (its all-gather
            backward multiplies the embedding gradient by the world size). A positive
            number is used as is. ``.weight``'s gradient is never scaled (do not wrap the
            head in DDP: its rows are owned, not replicated).
        sparse_grad: with Partial FC, give ``.weight`` a sparse COO gradient holding only the
            sampled rows (as ``nn.Embedding(sparse=True)``) instead of a dense (C_r, D) one
            that is zero outside them: saves writing C_r·D zeros per step (25.6 GB at
            C_r = 12.5M, D = 512, fp32). The row-sparse optimizers take either form.
        backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
        seed: seeds the weight initialisation (normal(0, 0.01), drawn block-wise by global
            class id, so the global weight is the same at any world size for one device
            type) and the Partial FC sampling stream.
        dtype, device: of ``.weight``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: MarginSpec = ArcFace(),
        scale: float = 64.0,
        process_group: Optional[dist.ProcessGroup] = None,
        sample_rate: float = 1.0,
        *,
        class_margins: Optional[torch.Tensor] = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        normalize: bool = True,
        grad_scale: Union[str, float] = "global",
        sparse_grad: bool = False,
        backend: str = "auto",
        seed: int = 0,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
    ) -> None:
        super().__init__()
        check_head_arguments(num_classes, embedding_dim, margin, scale)
        check_real("sample_rate", sample_rate, low=0.0, high=1.0, low_inclusive=False)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("backend", backend, BACKENDS)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise MarginKitTypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MarginKitTypeError(f"seed must be an int, got {seed!r}")
        if isinstance(grad_scale, str):
            check_choice("grad_scale", grad_scale, ("global", "ddp"))
        else:
            check_real("grad_scale", grad_scale, low=0.0, low_inclusive=False)

        self._group, self.world_size, self.rank = group_size_and_rank(process_group)
        self.process_group = process_group
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.margin = margin
        self.scale = float(scale)
        self.sample_rate = float(sample_rate)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.normalize = bool(normalize)
        self.grad_scale = grad_scale
        self.sparse_grad = bool(sparse_grad)
        self.backend = backend
        self.seed = seed
        self.class_start, self.class_stop = shard_range(num_classes, self.world_size, self.rank)
        self.num_local = self.class_stop - self.class_start
        self.num_sample = int(self.sample_rate * self.num_local)

        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_dim, dtype=dtype, device=device))
        if class_margins is not None:
            if class_margins.shape != (num_classes,) or not class_margins.is_floating_point():
                raise ValueError(f"class_margins must be a float tensor of shape (C,) = ({num_classes},)")
            local = class_margins.detach()[self.class_start : self.class_stop]
            if local.numel() and (not bool(torch.isfinite(local).all()) or bool((local < 0).any())):
                raise ValueError("class_margins must be finite and >= 0")
            if not margin.has_single_margin:
                raise ValueError(f"{type(margin).__name__} has no single margin m for class_margins to replace")
            self.register_buffer("class_margins", local.clone().to(self.weight.device))
        else:
            self.class_margins = None
        # Partial FC sampling step counter (same on every rank) and the rows touched
        # since the last optimizer step.
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64))
        self._updated_rows: list = []
        self._all_rows_updated = False
        self.last_sampled: Optional[torch.Tensor] = None
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters/state
    def reset_parameters(self) -> None:
        """normal(0, 0.01) from ``seed``, the same global weight at any world size."""
        with torch.no_grad():
            rows = seeded_normal_rows(
                self.class_start, self.class_stop, self.num_classes, self.embedding_dim, self.seed, 0.01,
                self.weight.device, self.weight.dtype,
            )
            self.weight.copy_(rows)

    def per_class_names(self) -> list[str]:
        """Names of this head's per-class tensors (first dim = its C_r classes)."""
        return [n for n in PER_CLASS_STATE if getattr(self, n, None) is not None]

    def register_per_class_buffer(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Add (or return the existing) per-class buffer ``name`` (one of PER_CLASS_STATE)."""
        if name not in PER_CLASS_STATE or name == "weight":
            raise ValueError(f"per-class buffers are named one of {PER_CLASS_STATE[1:]}, got {name!r}")
        existing = getattr(self, name, None)
        if existing is not None:
            return existing
        if tensor.shape[0] != self.num_local:
            raise ValueError(f"{name} must have {self.num_local} rows (this rank's classes), got {tuple(tensor.shape)}")
        if name in self.__dict__:
            del self.__dict__[name]
        self.register_buffer(name, tensor)
        return tensor

    def full_state_dict(self, device: Optional[Union[torch.device, str]] = None) -> dict:
        """Global tensors on every rank: each per-class tensor whole, in class order
        (``weight``, and ``class_margins`` / optimizer state where the head holds them),
        plus the Partial FC step counter ``sample_step`` for sampling heads.

        ``device`` (default: the weight's) receives the result; the exchange moves one
        rank's shard at a time (a broadcast per rank and tensor), so the head's device
        holds at most one extra shard. For heads too large for one rank use the sharded
        path (:func:`marginkit.distributed.save_sharded`).
        """
        from marginkit.distributed.checkpoint import gather_full_state

        return gather_full_state(self, device)

    def load_full_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Take this rank's rows out of global tensors (from ``full_state_dict`` at any
        world size, or from one process). No communication."""
        from marginkit.distributed.checkpoint import load_full_state

        load_full_state(self, state_dict, strict)

    def sharded_state_dict(self) -> dict:
        """``torch.distributed.checkpoint``-ready state: per-class tensors as sharded tensors
        with global row offsets, sharing storage with this head (``dcp.load`` fills them
        in place), other entries as plain tensors. Nothing is gathered."""
        from marginkit.distributed.checkpoint import sharded_state

        return sharded_state(self)

    # ------------------------------------------------------------------ Partial FC
    @property
    def sampling(self) -> bool:
        return self.sample_rate < 1.0 and self.training

    def _sample_classes(self, labels_all: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(sorted local class ids kept this step, row positions in them), or None for all classes.

        ``labels_all``: the global batch's labels, ignored rows as -1. The sample depends on
        (seed, step) and global class ids only, so it is reproducible.
        """
        if not self.sampling:
            return None
        from marginkit.backends.cuda import partial_fc_sample

        step = int(self.sample_step)
        self.sample_step.add_(1)
        return partial_fc_sample(
            labels_all, self.class_start, self.class_stop, self.num_sample, self.seed * (1 << 32) + step
        )

    def _note_updated_rows(self, index: Optional[torch.Tensor]) -> None:
        if index is None:
            self._all_rows_updated = True
        else:
            self._updated_rows.append(index)

    def take_updated_rows(self) -> torch.Tensor:
        """Sorted local rows whose gradient may be non-zero since the last call (all rows
        after a dense step), and forget them. Used by the row-sparse optimizers."""
        if self._all_rows_updated or not self._updated_rows:
            rows = torch.arange(self.num_local, device=self.weight.device) if self._all_rows_updated else None
        else:
            rows = torch.unique(torch.cat(self._updated_rows))
        self._updated_rows, self._all_rows_updated = [], False
        if rows is None:
            return torch.zeros(0, dtype=torch.int64, device=self.weight.device)
        return rows

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._updated_rows, self._all_rows_updated = [], False

    def _grad_factor(self) -> float:
        if self.grad_scale == "global":
            return 1.0
        if self.grad_scale == "ddp":
            return float(self.world_size)
        return float(self.grad_scale)

    # ------------------------------------------------------------------ forward
    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        sizes = _check_inputs_everywhere(self, local_embeddings, local_labels)
        cfg = _StepConfig(labels=local_labels, sizes=sizes, head=self)
        losses = _PartitionedMarginCE.apply(local_embeddings, self.weight, cfg)
        self.last_sampled = cfg.sampled
        if self.reduction == "none":
            return losses
        total = losses.sum()
        if self.reduction == "sum":
            return total
        # Non-ignored rows of the global batch: the same on every rank (same gathered labels).
        return total / cfg.extra["count"].clamp_min(1)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, margin={self.margin}, "
            f"scale={self.scale}, world_size={self.world_size}, rank={self.rank}, "
            f"classes=[{self.class_start}, {self.class_stop}), sample_rate={self.sample_rate}"
        )
