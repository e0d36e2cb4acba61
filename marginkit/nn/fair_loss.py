"""Fair Loss (Liu, Deng, Zhong, Wang, Hu, Tao, Huang, ICCV 2019): CosFace with margins moved by an agent.

The paper's observation: under class imbalance one margin does not suit every class; an
agent should raise, keep or lower margins from the sample count, the spread of the
features and the current margin. ``FairLoss`` offers two agents:

* default, **online** (marginkit's variant, not the paper's procedure): a DQN learning
  per class while the model trains (``marginkit.nn.fair_loss_agent``);
* ``policy=``, **the paper's procedure**: per-group margins moved once per epoch by a
  table fitted offline and frozen (``marginkit.nn.fair_loss_paper``).

The loss is always ``mk.margin_cross_entropy`` with ``class_margins``; the statistics
are in ``marginkit.nn.fair_loss_stats``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from marginkit.ops import class_statistics_update_
from marginkit.cuda_graphs import refuse_capture
from marginkit.autograd_guards import refuse_recomputation
from marginkit.errors import MarginKitTypeError, check_float_dtype, check_int, check_positive_ints, check_real
from marginkit.functional import margin_cross_entropy
from marginkit.nn._head import HEAD_KEYWORDS, KeepBufferDtypes, resolved_loss_keywords, take_loss_keywords
from marginkit.distributed.statistics_sync import (
    agree_once, broadcast_from_first_, check_sync_args, global_batch, local_loss, sync_group,
)
from marginkit.nn.fair_loss_agent import NUM_COUNT_BINS, OnlineMarginDQN, QNetwork, encode_states
from marginkit.nn.fair_loss_paper import FairLossTable
from marginkit.nn.fair_loss_stats import group_spread, nearest_other_sqdist, standardised_rewards, tertile_bins
from marginkit.validation import check_labels
from marginkit.specs import CosFace

#: the loss keywords FairLoss passes on (its class margins are the agent's)
FAIR_LOSS_KEYWORDS = HEAD_KEYWORDS + ("interclass_filtering_threshold", "feature_norm_scale")

__all__ = ["FairLoss", "QNetwork", "PAPER_MARGIN_LEVELS"]

PAPER_MARGIN_LEVELS = (0.15, 0.25, 0.35, 0.45)


class FairLoss(KeepBufferDtypes):
    """Fair Loss: CosFace whose per-class margins an agent adjusts.

    Loss: ``margin_cross_entropy(x, weight, y, CosFace(0.0), scale, class_margins=self.class_margins)``
    (the fused path, no (B, C) logits), with a learnable ``.weight`` (C, D) and a
    ``.class_margins`` (C,) float32 buffer that gradients never touch.

    **Margins.** Each class sits on one of the levels ``margin_levels`` (the paper's
    0.15, 0.25, 0.35, 0.45 by default; start: ``initial_margin``). An action moves a
    margin by one level: lower (−1), keep, raise (+1), clamped at the ends.

    **Schedule.** Each training-mode forward (1) checks the batch and computes the loss
    with the current margins, (2) adds the batch to the per-class window statistics
    with ``class_statistics_update_`` (counts n_c, Σ x̂·ŵ_c, Σ ‖x̂ − ŵ_c‖², against the
    weight at that step), and (3) on every ``update_every``-th training call lets the
    agent move (the new margins apply from the next call; with an empty window, no move
    and no ε decay) and clears the window. Eval
    mode gathers nothing and never moves.

    **Online agent** (default; marginkit's variant, *not* the paper's procedure). Per
    class active in the window (n_c > 0), state = (tertile of its cumulative count among
    the classes seen, or fixed ``count_thresholds``; tertile of intra_c = Σ‖x̂ − ŵ_c‖²/n_c
    among the active classes, or fixed ``spread_thresholds``; its level): 36 states.
    Reward of a class's transition, completed at its next active move: Δ of
    score_c = inter_c − intra_c (inter_c = min_{j≠c} ‖ŵ_c − ŵ_j‖²), z-scored over the
    transitions completing together and clipped to ±3. The DQN (``OnlineMarginDQN``:
    target network every ``target_sync`` rounds, replay of ``replay_capacity``,
    ``train_steps`` Adam steps of ``replay_batch`` after ``min_replay``, ε-greedy with
    ε = max(epsilon_end, epsilon_start·epsilon_decay^moves)) runs on the CPU from its own
    generator seeded with ``seed``. On the demo's long-tailed data this reward pays for
    raising every class, so most margins end at the top level (docs/demo.md).

    **Paper procedure** (``policy=FairLossTable``, ``class_count_bins`` (C,) int64 in
    {0, 1, 2} fixed from the dataset's class sizes, ``spread_thresholds`` fixed): the
    classes of a count bin form a group sharing one margin (``.group_level`` (3,)); at
    each move a group with samples in the window takes state (its count bin, its pooled
    spread binned by ``spread_thresholds``, its level) and the frozen table's greedy
    action. With ``update_every`` = steps per epoch this is one move per epoch, the
    window a full pass. Nothing is learnt online.

    **Bad input and state.** Everything is checked before any state changes, and a
    training batch with a non-finite embedding is refused with a ``ValueError`` naming
    ``embeddings``; a rejected or raising call leaves the state (window, counters,
    margins, agent) bit-identical: a move is computed into copies and committed at its
    end, and refuses to store non-finite statistics (non-finite ``weight``).

    **Distributed training.** With ``sync_statistics`` (default) under an initialised
    torch.distributed, each training forward gathers every rank's embeddings and labels
    over ``process_group`` (one all-gather of B·D values) and updates the statistics
    from the global batch; after each move the first rank's margins (and pending
    transitions) are broadcast. Every rank of the group must call a training forward
    together. ``.weight`` is a parameter like any other: keep it in step with DDP.

    **Checkpointing.** Counters, margins, window statistics and pending transitions are
    buffers; the agent (networks, Adam state, replay, generator) or the frozen table
    travels in ``get_extra_state``: a module loaded from another's ``state_dict`` acts
    identically from then on. The buffers keep their dtypes under ``.half()`` /
    ``.to(dtype)`` (only ``.weight`` follows).
    """

    _keep_dtype_buffers = ("class_margins", "window_cos_sum", "window_sq_sum", "pending_score")

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        scale: float = 64.0,
        update_every: int = 100,
        *,
        margin_levels: Sequence[float] = PAPER_MARGIN_LEVELS,
        initial_margin: float = 0.35,
        count_thresholds: Optional[Sequence[float]] = None,
        spread_thresholds: Optional[Sequence[float]] = None,
        policy: Optional[FairLossTable] = None,
        class_count_bins: Optional[torch.Tensor] = None,
        gamma: float = 0.9,
        epsilon_start: float = 1.0,
        epsilon_end: float = 0.05,
        epsilon_decay: float = 0.9,
        replay_capacity: int = 10000,
        replay_batch: int = 64,
        min_replay: int = 32,
        train_steps: int = 4,
        lr: float = 1e-3,
        target_sync: int = 5,
        hidden: int = 32,
        seed: int = 0,
        chunk_elements: Optional[int] = None,
        sync_statistics: bool = True,
        process_group=None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        **loss_kwargs,
    ) -> None:
        super().__init__()
        check_positive_ints(num_classes=num_classes, embedding_dim=embedding_dim, update_every=update_every,
                            replay_capacity=replay_capacity, replay_batch=replay_batch, min_replay=min_replay,
                            train_steps=train_steps, target_sync=target_sync, hidden=hidden)
        check_real("scale", scale, low=0.0, low_inclusive=False)
        levels = [check_real("margin_levels entry", m, low=0.0) for m in margin_levels]
        if len(levels) < 2 or sorted(levels) != levels or len(set(levels)) != len(levels):
            raise ValueError(f"margin_levels must be >= 2 increasing values, got {tuple(margin_levels)}")
        check_real("initial_margin", initial_margin)
        start = min(range(len(levels)), key=lambda i: abs(levels[i] - initial_margin))
        if abs(levels[start] - initial_margin) > 1e-9:
            raise ValueError(f"initial_margin {initial_margin} is not one of margin_levels {tuple(levels)}")
        for name, th in (("count_thresholds", count_thresholds), ("spread_thresholds", spread_thresholds)):
            _check_thresholds(name, th)
        check_int("seed", seed)
        if chunk_elements is not None:
            check_positive_ints(chunk_elements=chunk_elements)
        check_float_dtype("dtype", dtype)
        check_real("gamma", gamma, low=0.0, high=1.0)
        for name, v in (("epsilon_start", epsilon_start), ("epsilon_end", epsilon_end), ("epsilon_decay", epsilon_decay)):
            check_real(name, v, low=0.0, high=1.0)
        check_real("lr", lr, low=0.0, low_inclusive=False)
        check_sync_args(sync_statistics, process_group)
        _check_policy_args(policy, class_count_bins, spread_thresholds, num_classes, len(levels))

        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.scale, self.update_every = float(scale), update_every
        self.margin_levels = tuple(levels)
        self.count_thresholds = None if count_thresholds is None else tuple(map(float, count_thresholds))
        self.spread_thresholds = None if spread_thresholds is None else tuple(map(float, spread_thresholds))
        self.seed, self.chunk_elements = int(seed), chunk_elements
        self.sync_statistics, self.process_group = sync_statistics, process_group
        # bytes the loss may keep from forward to backward; settable later as head.memory_budget
        self.memory_budget = take_loss_keywords("FairLoss", loss_kwargs, FAIR_LOSS_KEYWORDS)
        self.loss_kwargs = loss_kwargs
        self.ignore_index = int(loss_kwargs.get("ignore_index", -100))
        self.policy = policy
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, dtype=dtype, device=device))
        nn.init.normal_(self.weight, mean=0.0, std=0.01)
        # after the weight: building the Q-networks draws from torch's global generator
        self._agent = None if policy is not None else OnlineMarginDQN(
            num_levels=len(levels), hidden=hidden, lr=float(lr), gamma=float(gamma), replay_capacity=replay_capacity,
            replay_batch=replay_batch, min_replay=min_replay, train_steps=train_steps, target_sync=target_sync,
            epsilon_start=float(epsilon_start), epsilon_end=float(epsilon_end), epsilon_decay=float(epsilon_decay),
            seed=int(seed),
        )

        C = num_classes
        i64, f64 = dict(dtype=torch.int64, device=device), dict(dtype=torch.float64, device=device)
        self.register_buffer("margin_level", torch.full((C,), start, **i64))
        self.register_buffer("class_margins", torch.full((C,), levels[start], dtype=torch.float32, device=device))
        self.register_buffer("window_counts", torch.zeros(C, **i64))
        self.register_buffer("window_cos_sum", torch.zeros(C, **f64))
        self.register_buffer("window_sq_sum", torch.zeros(C, **f64))
        self.register_buffer("seen_counts", torch.zeros(C, **i64))
        self.register_buffer("pending_state", torch.full((C,), -1, **i64))
        self.register_buffer("pending_action", torch.zeros(C, **i64))
        self.register_buffer("pending_score", torch.zeros(C, **f64))
        self.register_buffer("forward_calls", torch.zeros((), **i64))
        self.register_buffer("agent_moves", torch.zeros((), **i64))
        if policy is not None:
            self.register_buffer("class_count_bins", class_count_bins.detach().to(**i64).clone())
            self.register_buffer("group_level", torch.full((NUM_COUNT_BINS,), start, **i64))

    # ------------------------------------------------------------------ read-only views
    @property
    def q_network(self) -> Optional[QNetwork]:
        """The online agent's Q-network (None with a frozen ``policy``)."""
        return None if self._agent is None else self._agent.q_net

    @property
    def margin_range(self) -> tuple[float, float]:
        """(lowest, highest) margin a class can have: the ends of ``margin_levels``."""
        return self.margin_levels[0], self.margin_levels[-1]

    @property
    def epsilon(self) -> float:
        return 0.0 if self._agent is None else self._agent.epsilon(int(self.agent_moves))

    @property
    def replay_size(self) -> int:
        return 0 if self._agent is None else self._agent.replay_size

    def get_extra_state(self) -> dict:
        if self._agent is None:
            return {"version": 1, "policy": self.policy.state_dict()}
        return {**self._agent.state_dict(), "epsilon": self.epsilon}

    def _check_extra_state(self, state) -> None:
        """ValueError when ``state`` is not an agent/policy this module can take."""
        if self._agent is None:
            if not isinstance(state, dict) or "policy" not in state:
                raise ValueError("FairLoss: this module has a frozen policy; the state_dict holds an online agent")
        else:
            if isinstance(state, dict) and "policy" in state:
                raise ValueError("FairLoss: this module has an online agent; the state_dict holds a frozen policy")
            self._agent.check_state(state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # torch copies the buffers before it hands over the extra state: check the agent first
        key = prefix + "_extra_state"
        if key in state_dict:
            self._check_extra_state(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state: dict) -> None:
        self._check_extra_state(state)
        if self._agent is None:
            self.policy = FairLossTable.from_state_dict(state["policy"])
        else:
            self._agent.load_state_dict(state)

    # ------------------------------------------------------------------ moves
    @torch.no_grad()
    def class_states(self, classes: torch.Tensor, intra: torch.Tensor) -> torch.Tensor:
        """Online agent's encoded states (N,) of ``classes`` given their window spreads ``intra`` (float64)."""
        seen = self.seen_counts.to(torch.float64)
        count_bin = tertile_bins(seen[classes], seen[seen > 0], self.count_thresholds)
        spread_bin = tertile_bins(intra, intra, self.spread_thresholds)
        return encode_states(count_bin, spread_bin, self.margin_level[classes], len(self.margin_levels))

    @torch.no_grad()
    def agent_step(self) -> None:
        """One move on the window's statistics (``forward`` calls it on schedule); all or nothing.
        An empty window (no labelled row since the last move) is no move: ε does not decay."""
        if not bool(self.window_counts.any()):
            return
        snapshot = self._snapshot()
        try:
            if self._agent is None:
                self._policy_move()
            else:
                self._online_move()
            self.window_counts.zero_()
            self.window_cos_sum.zero_()
            self.window_sq_sum.zero_()
            self.agent_moves += 1
        except BaseException:
            self._restore(snapshot)
            raise

    def _online_move(self) -> None:
        active = (self.window_counts > 0).nonzero().squeeze(1)
        if not active.numel():
            return
        intra = self.window_sq_sum[active] / self.window_counts[active].to(torch.float64)
        score = nearest_other_sqdist(self.weight, active, self.chunk_elements) - intra
        if not bool(torch.isfinite(score).all()):
            raise ValueError("FairLoss: non-finite class statistics (is `weight` finite?); the agent did not move")
        states = self.class_states(active, intra)
        done = self.pending_state[active] >= 0  # classes active again complete their transition
        if bool(done.any()):
            cls = active[done]
            reward = standardised_rewards(score[done] - self.pending_score[cls])
            self._agent.push(self.pending_state[cls], self.pending_action[cls], reward, states[done])
        self._agent.learn()
        actions = self._agent.choose(states.cpu(), int(self.agent_moves)).to(active.device)
        level = (self.margin_level[active] + actions - 1).clamp(0, len(self.margin_levels) - 1)
        self.margin_level[active] = level
        self.class_margins[active] = self._level_values(level)
        self.pending_state[active] = states
        self.pending_action[active] = actions
        self.pending_score[active] = score

    def _policy_move(self) -> None:
        spread, samples = group_spread(self.window_counts, self.window_sq_sum, self.class_count_bins, NUM_COUNT_BINS)
        groups = (samples > 0).nonzero().squeeze(1)
        if not groups.numel():
            return
        if not bool(torch.isfinite(spread[groups]).all()):
            raise ValueError("FairLoss: non-finite group statistics (is `weight` finite?); the policy did not move")
        spread_bin = tertile_bins(spread[groups], spread[groups], self.spread_thresholds)
        states = encode_states(groups, spread_bin, self.group_level[groups], len(self.margin_levels))
        actions = self.policy.act(states)
        self.group_level[groups] = (self.group_level[groups] + actions - 1).clamp(0, len(self.margin_levels) - 1)
        self.margin_level.copy_(self.group_level[self.class_count_bins])
        self.class_margins.copy_(self._level_values(self.margin_level))

    def _level_values(self, level: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.margin_levels, dtype=torch.float32, device=level.device)[level]

    def _snapshot(self) -> tuple[dict, Optional[dict]]:
        buffers = {k: v.clone() for k, v in self._buffers.items() if v is not None}
        return buffers, None if self._agent is None else self._agent.state_dict()

    def _restore(self, snapshot) -> None:
        buffers, agent = snapshot
        for k, v in buffers.items():
            self._buffers[k].copy_(v)
        if agent is not None:
            self._agent.load_state_dict(agent)

    # ------------------------------------------------------------------ forward
    def _checked_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_tensor(embeddings) and embeddings.is_floating_point() \
                and not bool(torch.isfinite(embeddings).all()):
            raise ValueError(
                "FairLoss: embeddings contain non-finite values (NaN or ±inf) in a training batch; the batch is "
                "refused and the module's statistics, margins and agent are unchanged. Expected: finite embeddings."
            )
        if self.training and torch.is_tensor(labels) and labels.dim() == 1 and labels.dtype == torch.int64:
            # eager, before the loss: on CUDA the loss only flags a bad label for its next call, which the
            # statistics op would then report a second time
            check_labels(labels, self.num_classes, self.ignore_index)
            # a non-finite row would put NaN in the window, and every later move would refuse it
            ignored = labels == self.ignore_index  # one host read: no boolean-mask indexing
            rows = self.weight.detach().index_select(0, torch.where(ignored, torch.zeros_like(labels), labels))
            if labels.numel() and not bool((torch.isfinite(rows).all(dim=1) | ignored).all()):
                raise ValueError(
                    "FairLoss: weight has non-finite rows for classes of this training batch; the batch is refused "
                    "and the module's statistics, margins and agent are unchanged. Check the optimizer (learning "
                    "rate) or reload a checkpoint."
                )
        return margin_cross_entropy(embeddings, self.weight, labels, CosFace(0.0), self.scale,
                                    class_margins=self.class_margins, memory_budget=self.memory_budget,
                                    **self.loss_kwargs)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training:
            refuse_capture(self, "checks each training batch on the host and its agent steps on the host")
            refuse_recomputation(self, "class statistics, step count and margins")
        group = sync_group(self.sync_statistics, self.process_group) if self.training else None
        agree_once(self, group, self._sync_fields(), self.weight.device)
        loss, error = local_loss(lambda: self._checked_loss(embeddings, labels), group)
        if not self.training:
            return loss
        with torch.no_grad():
            x, y = global_batch(embeddings, labels, group, error)  # raises on every rank if any rank failed
            moving = (int(self.forward_calls) + 1) % self.update_every == 0
            snapshot = self._snapshot() if moving else None  # the move rolls back the window it consumed too
            try:
                class_statistics_update_(self.window_counts, self.window_cos_sum, self.window_sq_sum, x,
                                         self.weight.detach(), y, self.ignore_index)
                kept = y != self.ignore_index
                self.seen_counts.index_add_(0, torch.where(kept, y, torch.zeros_like(y)), kept.to(torch.int64))
                self.forward_calls += 1
                if moving:
                    self.agent_step()
                    if group is not None:  # one agent decides: margins equal on every rank
                        broadcast_from_first_(self._moved_buffers(), group)
            except BaseException:
                if snapshot is not None:
                    self._restore(snapshot)
                raise
        return loss

    def _sync_fields(self) -> dict:
        """What every rank that shares the statistics and the agent must agree on (``agree_once``)."""
        return dict(num_classes=self.num_classes, embedding_dim=self.embedding_dim, scale=self.scale,
                    update_every=self.update_every, margin_levels=self.margin_levels,
                    count_thresholds=self.count_thresholds, spread_thresholds=self.spread_thresholds, seed=self.seed,
                    policy=self.policy is not None,
                    **resolved_loss_keywords(self.loss_kwargs, FAIR_LOSS_KEYWORDS))

    def _moved_buffers(self) -> list:
        if self._agent is None:
            return [self.group_level, self.margin_level, self.class_margins]
        return [self.margin_level, self.class_margins, self.pending_state, self.pending_action, self.pending_score]

    def extra_repr(self) -> str:
        agent = "online DQN" if self._agent is not None else "frozen policy, per count group"
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, scale={self.scale}, "
                f"update_every={self.update_every}, margin_levels={self.margin_levels}, agent={agent}")


def _check_thresholds(name: str, thresholds) -> None:
    """None, or two finite increasing edges (three bins): a sequence or a tensor."""
    if thresholds is None:
        return
    if torch.is_tensor(thresholds):
        thresholds = thresholds.tolist()
    if isinstance(thresholds, (str, bytes)) or not hasattr(thresholds, "__len__") or len(thresholds) != 2:
        raise MarginKitTypeError(f"{name} must be None or two increasing thresholds (3 bins), got {thresholds!r}")
    low, high = (check_real(f"{name} entry", t) for t in thresholds)
    if low > high:
        raise ValueError(f"{name} must be two increasing thresholds (3 bins), got {thresholds!r}")


def _check_policy_args(policy, class_count_bins, spread_thresholds, num_classes: int, num_levels: int) -> None:
    """The paper mode needs a table for these levels, (C,) count bins in {0, 1, 2} and fixed spread edges."""
    if policy is None:
        if class_count_bins is not None:
            raise ValueError("class_count_bins is only used with policy= (the paper's per-group margins); got no policy")
        return
    if not isinstance(policy, FairLossTable):
        raise TypeError(f"policy must be a marginkit.nn.fair_loss_paper.FairLossTable or None, got {type(policy).__name__}")
    if policy.num_levels != num_levels:
        raise ValueError(f"policy was fitted for {policy.num_levels} margin levels, margin_levels has {num_levels}")
    if not torch.is_tensor(class_count_bins) or class_count_bins.shape != (num_classes,) \
            or class_count_bins.is_floating_point() or class_count_bins.is_complex():
        raise ValueError(f"class_count_bins must be an integer tensor of shape ({num_classes},) with policy=, "
                         f"got {class_count_bins!r}")
    if class_count_bins.numel() and not bool(((class_count_bins >= 0) & (class_count_bins < NUM_COUNT_BINS)).all()):
        raise ValueError(f"class_count_bins values must lie in [0, {NUM_COUNT_BINS}), got min "
                         f"{int(class_count_bins.min())}, max {int(class_count_bins.max())}")
    if spread_thresholds is None:
        raise ValueError("spread_thresholds (two fixed edges, e.g. from fair_loss_paper.tertile_edges) are required "
                         "with policy=: the frozen table's spread bins must mean what they meant offline")
