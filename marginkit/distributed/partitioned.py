"""``PartitionedMarginSoftmax``: a margin-softmax head whose classes are sharded over ranks.

The step (collectives, autograd) is ``partitioned_step``; the checks every rank must answer
alike are ``partitioned_checks`` and ``agreement``; docs/scaling.md gives the bytes on the wire.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from marginkit import backends
from marginkit._pipeline import autocast_inputs, no_autocast, reduce_losses
from marginkit.cuda_graphs import refuse_capture
from marginkit.autograd_guards import refuse_recomputation
from marginkit.distributed.agreement import (
    FLOAT_DIGEST_BITS, check_agreement, config_digest, head_config, tensor_digest,
)
from marginkit.distributed.checkpoint import gather_full_state, load_full_state, sharded_state
from marginkit.distributed.device_sampling import fixed_sample_size
from marginkit.distributed.partitioned_checks import (
    OK,
    POISON,
    DeferredRecord,
    exchange_sizes,
    local_problem,
    raise_kind,
    raise_recorded,
)
from marginkit.distributed.partitioned_step import LOWEST_SENT_LABEL, PartitionedMarginCE, StepPlan
from marginkit.distributed.sharding import PER_CLASS_STATE, group_size_and_rank, seeded_normal_rows, shard_range
from marginkit.errors import (
    MarginKitTypeError, check_choice, check_float_dtype, check_int, check_memory_budget, check_positive_ints, check_real,
)
from marginkit.specs import ArcFace, MarginSpec
from marginkit.validation import REDUCTIONS, check_ignore_index

__all__ = ["PartitionedMarginSoftmax", "PER_CLASS_STATE", "seeded_normal_rows"]

GRAD_REDUCE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def _check_head_arguments(num_classes, embedding_dim, margin, scale) -> None:
    check_positive_ints(num_classes=num_classes, embedding_dim=embedding_dim)
    if not isinstance(margin, MarginSpec):
        raise MarginKitTypeError(f"margin must be a marginkit margin spec (mk.ArcFace(), ...), got {margin!r}")
    check_real("scale", scale, low=0.0, low_inclusive=False)


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
        sample_rate: in (0, 1]. Below 1 (Partial FC, training mode only; keep every rank in the
            same train/eval mode, which is not checked): every step each
            rank keeps every positive class of the global batch in its shard plus uniform
            negatives, ``int(sample_rate · C_r)`` classes in all (at least the positives),
            drawn by ``marginkit.ops.partial_fc_sample`` from (seed, step); the
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
            (the (B_global,) per-row losses, the same on every rank; with ``max_local_batch``
            M the (W·M,) losses of the padded layout: rank r's rows at [r·M, r·M + b_r), 0 elsewhere).
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
        max_local_batch: M, the most rows any rank passes in one call. Declared, no step reads a
            device value on the host (no stream sync): every rank sends M rows (padding), the
            Partial FC sample has the fixed size min(C_r, max(int(sample_rate·C_r), W·M)) and
            is drawn on the device, and errors found during a step are raised at the *next*
            call on every rank (a rank whose own input is rejected also raises at once; rows
            with an out-of-range label are ignored, a step with a rejected input changes no
            weight). None (default): local batch sizes are exchanged each step (one small
            all-gather read on the host) and every error is raised at once.
        grad_reduce_dtype: dtype of the embedding gradient on the wire (None: float32, or
            float64 for float64 inputs). ``torch.bfloat16`` halves the reduce-scatter's bytes;
            its rounding is measured in tests/distributed (about 2e-3 relative).
        memory_budget: bytes this rank may keep from the forward to the backward to skip
            recomputing logits, as in ``mk.MarginSoftmax``: the exp-scaled logits of as many
            whole backward chunks of the rank's classes as fit, over the global batch's N rows
            (all of them: N·C_r·(element size + 1/8) bytes on Triton, about N·C_r·4 on the torch
            backend). 0 (default): none, the bounded workspace; None: no limit. With
            Partial FC the store covers the sampled rows (what the kernels see). Those chunks'
            dW GEMMs then run after the embedding gradient's reduce-scatter has been started,
            so it is on the wire behind them. A second backward through the same graph
            (``retain_graph=True``) recomputes every chunk (on Triton the first consumed the store).
            Ranks may use different budgets (same results to rounding); settable later as
            ``head.memory_budget``.
        dtype, device: of ``.weight``.

    Every rank must build the head with the same arguments (``agreement.FIELDS``): the first
    forward checks it, later steps carry a digest, and a mismatch raises the same
    ``ValueError`` naming the field and both values on every rank.
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
        max_local_batch: Optional[int] = None,
        grad_reduce_dtype: Optional[torch.dtype] = None,
        interclass_filtering_threshold: float = 0.0,
        memory_budget: Optional[float] = 0,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
    ) -> None:
        super().__init__()
        _check_head_arguments(num_classes, embedding_dim, margin, scale)
        check_real("sample_rate", sample_rate, low=0.0, high=1.0, low_inclusive=False)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("backend", backend, backends.BACKENDS)
        if max_local_batch is not None:
            check_positive_ints(max_local_batch=max_local_batch)
        check_choice("grad_reduce_dtype", grad_reduce_dtype, GRAD_REDUCE_DTYPES)
        check_real("interclass_filtering_threshold", interclass_filtering_threshold, low=0.0, high=1.0)
        check_memory_budget(memory_budget)
        # the three lowest int64 mark a rank's rejected input; labels below the fourth are sent as it
        check_ignore_index(ignore_index, LOWEST_SENT_LABEL + 1, " (int64's four lowest values are reserved)")
        check_int("seed", seed)
        check_float_dtype("dtype", dtype)
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
        self.max_local_batch = max_local_batch
        self.grad_reduce_dtype = grad_reduce_dtype
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.memory_budget = memory_budget
        self.class_start, self.class_stop = shard_range(num_classes, self.world_size, self.rank)
        self.num_local = self.class_stop - self.class_start
        self.num_sample = int(self.sample_rate * self.num_local)

        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_dim, dtype=dtype, device=device))
        if class_margins is not None:
            if class_margins.shape != (num_classes,) or not class_margins.is_floating_point():
                raise ValueError(f"class_margins must be a float tensor of shape (C,) = ({num_classes},)")
            if not margin.has_single_margin:
                raise ValueError(f"{type(margin).__name__} has no single margin m for class_margins to replace")
            # The whole (C,) tensor, which every rank holds: a rank must not reject what another accepted.
            full = class_margins.detach()
            if not bool(torch.isfinite(full).all()) or bool((full < 0).any()):
                raise ValueError("class_margins must be finite and >= 0")
            margin.check_margin_values("class_margins", full)
            local = full[self.class_start : self.class_stop]
            self.register_buffer("class_margins", local.clone().to(self.weight.device))
        else:
            self.class_margins = None
        # what the ranks compare (they keep different slices): the whole tensor's digest, or None
        self.class_margins_digest = None if class_margins is None else tensor_digest(class_margins)
        # Partial FC sampling step counter (same on every rank, on the device) and the rows
        # touched since the last optimizer step: a (C_r,) mask, bounded however many steps run.
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64, device=self.weight.device))
        # a buffer, so that .to(device) moves it with the weight; not persistent: not in checkpoints
        self.register_buffer("_updated_mask", torch.zeros(self.num_local, dtype=torch.bool, device=self.weight.device),
                             persistent=False)
        self._all_rows_updated = False
        self.last_sampled: Optional[torch.Tensor] = None
        self._agreed_input_dtype: Optional[torch.dtype] = None  # set by the first forward
        # whether the last accepted step's embeddings needed a gradient (every rank's did alike): a rank
        # that rejects its input joins the backward by this, not by the input it rejected
        self._input_needed_grad = False
        self._pending = DeferredRecord()
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Optimizer state a row-sparse optimizer keeps in the head (momentum, Adam moments) exists
        # only after its first step: a fresh head resuming from a checkpoint registers it here.
        for name in PER_CLASS_STATE[1:]:
            saved = state_dict.get(prefix + name)
            if saved is not None and getattr(self, name, None) is None:
                self.register_per_class_buffer(name, torch.empty_like(saved, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def full_state_dict(self, device: Optional[Union[torch.device, str]] = None) -> dict:
        """Global tensors on every rank: each per-class tensor whole, in class order
        (``weight``, and ``class_margins`` / optimizer state where the head holds them),
        plus the Partial FC step counter ``sample_step`` for sampling heads. A collective:
        every rank of the group must call it (``if rank == 0: head.full_state_dict()`` hangs).

        ``device`` (default: the weight's) receives the result; the exchange moves one
        rank's shard at a time (a broadcast per rank and tensor), so the head's device
        holds at most one extra shard. For heads too large for one rank use the sharded
        path (:func:`marginkit.distributed.save_sharded`).
        """
        return gather_full_state(self, device)

    def load_full_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Take this rank's rows out of global tensors (from ``full_state_dict`` at any
        world size, or from one process). No communication."""
        load_full_state(self, state_dict, strict)

    def sharded_state_dict(self) -> dict:
        """``torch.distributed.checkpoint``-ready state: per-class tensors as sharded tensors
        with global row offsets, sharing storage with this head (``dcp.load`` fills them
        in place), other entries as plain tensors. Nothing is gathered."""
        return sharded_state(self)

    # ------------------------------------------------------------------ Partial FC
    @property
    def sampling(self) -> bool:
        return self.sample_rate < 1.0 and self.training

    def config(self) -> dict:
        """The arguments every rank must share, as text (``agreement.FIELDS``); stored in checkpoints."""
        return head_config(self)

    def _note_updated_rows(self, index: Optional[torch.Tensor]) -> None:
        if index is None:
            self._all_rows_updated = True
        else:
            self._updated_mask[index] = True

    def take_updated_rows(self) -> torch.Tensor:
        """Sorted local rows whose gradient may be non-zero since the last call (all rows
        after a dense step), and forget them. Used by the row-sparse optimizers."""
        if self._all_rows_updated:
            rows = torch.arange(self.num_local, device=self.weight.device)
        else:  # the optimizer's step reads the row count (a sync there, not in forward/backward)
            rows = self._updated_mask.nonzero().reshape(-1)
        self._updated_mask.zero_()
        self._all_rows_updated = False
        return rows

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._updated_mask.zero_()
        self._all_rows_updated = False

    def _grad_factor(self) -> float:
        if self.grad_scale == "global":
            return 1.0
        if self.grad_scale == "ddp":
            return float(self.world_size)
        return float(self.grad_scale)

    # ------------------------------------------------------------------ forward
    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """local_embeddings (b, D), local_labels (b,) global ids -> the global loss (every rank alike)."""
        refuse_capture(self, "checks every rank's input alike on the host (each step, or a record read at the next call)")
        if self.training and self.sampling:  # every rank alike: the refusal precedes any collective
            refuse_recomputation(self, "Partial FC sampler step")
        raise_recorded(self, self._pending.take())
        x, labels = local_embeddings, local_labels
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            x, _ = autocast_inputs(x, self.weight)
        config = self.config()
        # Only a declared M fixes the row bytes on the wire: without it the dtype may change between calls.
        fixed_dtype = self._agreed_input_dtype if self.max_local_batch is not None else None
        problem = local_problem(self, x, labels, fixed_dtype)
        first = self._agreed_input_dtype is None
        if first:  # one collective of per-field digests: ranks built alike, or the same error everywhere
            check_agreement(config, self._group, self.weight.device)
        sizes = None
        if first or self.max_local_batch is None:
            sizes = exchange_sizes(self, x, labels, problem, config_digest(config), config)
            self._agreed_input_dtype = x.dtype
        if problem[1] != OK:  # declared M, after the first call: send poison, then raise here
            self._run_rejected_step(problem)
        self._input_needed_grad = x.requires_grad
        # nothing to keep for a backward that will not run (no_grad, inference, everything frozen)
        backward_runs = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        plan = self._plan(sizes, config, x.shape[0], memory_budget=self.memory_budget if backward_runs else 0)
        with no_autocast(self.weight.device):
            losses, live, sampled, record = PartitionedMarginCE.apply(x, self.weight, labels, self._seed(), plan)
        self._after_step(losses, sampled if plan.sampling else None, record, plan)
        return reduce_losses(losses, live, self.reduction)

    def _seed(self) -> torch.Tensor:
        """The sampler's seed for this step, on the device: seed·2^32 + step (int64 bits)."""
        base = (self.seed << 32) % (1 << 64)
        base = base - (1 << 64) if base >= 1 << 63 else base
        return self.sample_step + base

    def _plan(
        self, sizes: Optional[list], config: dict, local_rows: int, pad_label: Optional[int] = None,
        memory_budget: Optional[float] = 0,
    ) -> StepPlan:
        declared = self.max_local_batch is not None
        sampling = None
        if self.sampling:
            sampling = "device" if declared else "host"
        return StepPlan(
            engine=backends.resolve(self.backend, self.weight.device), group=self._group, world=self.world_size,
            rank=self.rank, num_classes=self.num_classes, class_start=self.class_start, class_stop=self.class_stop,
            margin=self.margin, scale=self.scale, normalize=self.normalize, ignore_index=self.ignore_index,
            class_margins=self.class_margins, grad_factor=self._grad_factor(),
            grad_reduce_dtype=self.grad_reduce_dtype, sparse_grad=self.sparse_grad,
            filter_threshold=self.interclass_filtering_threshold,
            sizes=None if declared else sizes, block_rows=self.max_local_batch if declared else None,
            pad_label=self.ignore_index if pad_label is None else pad_label, sampling=sampling,
            num_sample=self.num_sample,
            sample_size=fixed_sample_size(self.num_local, self.num_sample, self.world_size * (self.max_local_batch or 0)),
            digest=config_digest(config, FLOAT_DIGEST_BITS) if declared else None,
            memory_budget=memory_budget,
        )

    def _after_step(self, losses, sampled, record, plan: StepPlan) -> None:
        """Module-side bookkeeping of a step (the Function itself changes no state)."""
        if plan.sampling:
            self.sample_step.add_(1)
        self.last_sampled = sampled
        if plan.block_rows is not None:
            self._pending.put(record)
        if losses.grad_fn is not None:  # mark the rows the backward reaches, when it runs
            losses.grad_fn.register_hook(lambda grad_inputs, grad_outputs: self._note_updated_rows(sampled))

    def _run_rejected_step(self, problem) -> None:
        """This rank rejected its input (declared M, after the first call): it still runs the
        step's collectives with poison rows, so no rank waits, then raises its error. It joins the
        backward's reduce-scatter when the other ranks will run one: grad enabled, and the weight or
        the embeddings need a gradient, the latter as at the last accepted step (the rejected input
        itself may be detached, an integer tensor or no tensor; a frozen head still sends dX)."""
        b, kind, message = problem
        dtype = self._agreed_input_dtype
        x = torch.zeros((0, self.embedding_dim), dtype=dtype, device=self.weight.device)
        backward = torch.is_grad_enabled() and (self._input_needed_grad or self.weight.requires_grad)
        x.requires_grad_(backward)
        labels = torch.zeros(0, dtype=torch.int64, device=self.weight.device)
        plan = self._plan(None, self.config(), 0, pad_label=POISON + kind)
        with no_autocast(self.weight.device):
            losses, _, sampled, record = PartitionedMarginCE.apply(x, self.weight.detach(), labels, self._seed(), plan)
            if backward:  # the others' backward runs a reduce-scatter: join it now
                torch.autograd.grad(losses.sum(), [x], allow_unused=True)
        if plan.sampling:
            self.sample_step.add_(1)
        self._pending.put(record)
        raise_kind(kind, f"rank {self.rank} of {self.world_size}: {message}")

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, margin={self.margin}, "
            f"scale={self.scale}, world_size={self.world_size}, rank={self.rank}, "
            f"classes=[{self.class_start}, {self.class_stop}), sample_rate={self.sample_rate}"
        )
