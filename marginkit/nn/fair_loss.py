"""Fair Loss (Liu et al., ICCV 2019): CosFace with per-class margins moved by Deep Q-learning.

The paper's observation: under class imbalance, one margin does not suit every class;
an agent should learn, per class, whether to raise, keep or lower the margin, from
the class's sample count, the spread of its features and its current margin. This
module implements that agent online, inside the loss layer, with the statistics of
each class gathered by the csrc op ``class_statistics_update_``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from marginkit.backends.cuda import class_statistics_update_
from marginkit.errors import check_positive_ints, check_real
from marginkit.functional import margin_cross_entropy
from marginkit.backends.torch_chunked import CHUNK_ELEMENTS
from marginkit.nn._chunked import KeepBufferDtypes
from marginkit.nn._sync import broadcast_from_first_, check_sync_args, global_batch, local_loss, sync_group
from marginkit.specs import CosFace

__all__ = ["FairLoss", "QNetwork"]

PAPER_MARGIN_LEVELS = (0.15, 0.25, 0.35, 0.45)
ACTIONS = ("lower", "keep", "raise")  # action a moves the margin level by a − 1


class QNetwork(nn.Module):
    """Q(s, ·) for the 3 actions; s encoded as one-hots (count bin, spread bin, margin level)."""

    def __init__(self, num_count_bins: int, num_spread_bins: int, num_levels: int, hidden: int) -> None:
        super().__init__()
        self.sizes = (num_count_bins, num_spread_bins, num_levels)
        self.net = nn.Sequential(
            nn.Linear(sum(self.sizes), hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, len(ACTIONS))
        )

    def features(self, states: torch.Tensor) -> torch.Tensor:
        """states (N,) int64 with s = (count_bin·S + spread_bin)·L + level -> (N, 3 + S + L) one-hots."""
        nc, ns, nl = self.sizes
        level = states % nl
        spread = (states // nl) % ns
        count = states // (nl * ns)
        return torch.cat(
            [F.one_hot(count, nc), F.one_hot(spread, ns), F.one_hot(level, nl)], dim=1
        ).to(torch.float32)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(states))

    @torch.no_grad()
    def init_(self, generator: torch.Generator) -> None:
        """torch's default Linear init (U(±1/√fan_in)), drawn from ``generator``."""
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)


def _tertile_bins(values: torch.Tensor, population: torch.Tensor, thresholds: Optional[Sequence[float]]) -> torch.Tensor:
    """Bin 0/1/2 of ``values``: by the fixed ``thresholds`` (t1, t2) if given, else by the
    lower and upper tertile of ``population`` (order statistics at ⌊(n−1)/3⌋ and ⌊2(n−1)/3⌋);
    bin = [v > t1] + [v > t2]."""
    if thresholds is not None:
        t1, t2 = (torch.tensor(float(t), dtype=values.dtype, device=values.device) for t in thresholds)
    else:
        ordered = population.sort().values
        n = ordered.numel()
        t1, t2 = ordered[(n - 1) // 3], ordered[(2 * (n - 1)) // 3]
    return (values > t1).to(torch.int64) + (values > t2).to(torch.int64)


@torch.no_grad()
def nearest_other_sqdist(weight: torch.Tensor, rows: torch.Tensor, chunk_elements: Optional[int] = None) -> torch.Tensor:
    """min_{j≠c} ‖ŵ_c − ŵ_j‖² = 2 − 2·max_{j≠c} ŵ_c·ŵ_j for each c in ``rows`` (float64).

    Chunked over both the queried rows and the classes: the working set is at most
    ``chunk_elements`` floats. 4.0 (the largest squared distance on the sphere) with C = 1.
    """
    budget = chunk_elements or CHUNK_ELEMENTS
    w = F.normalize(weight.detach().to(torch.float32), dim=1, eps=1e-12)
    C, n = w.shape[0], rows.numel()
    best = torch.full((n,), -1.0, dtype=torch.float32, device=w.device)
    row_step = max(1, min(n, int(math.isqrt(budget))))
    col_step = max(1, budget // row_step)
    for r0 in range(0, n, row_step):
        q_rows = rows[r0 : r0 + row_step]
        q = w.index_select(0, q_rows)
        for c0 in range(0, C, col_step):
            dots = q @ w[c0 : c0 + col_step].T
            cols = torch.arange(c0, c0 + dots.shape[1], device=w.device)
            dots.masked_fill_(q_rows[:, None] == cols[None, :], -1.0)
            best[r0 : r0 + row_step] = torch.maximum(best[r0 : r0 + row_step], dots.max(dim=1).values)
    return (2.0 - 2.0 * best.to(torch.float64)).clamp(0.0, 4.0)


class FairLoss(KeepBufferDtypes):
    """Fair Loss: CosFace whose per-class margins a Deep Q-learning agent adjusts.

    Loss: ``margin_cross_entropy(x, weight, y, CosFace(0.0), scale, class_margins=self.class_margins)``
    (the fused path, no (B, C) logits), with a learnable ``.weight`` (C, D) and a
    ``.class_margins`` (C,) float32 buffer that gradients never touch.

    **Margins.** Each class sits on one of the levels ``margin_levels`` (the paper's
    0.15, 0.25, 0.35, 0.45 by default; start: ``initial_margin``). An action moves a
    class by one level: lower (−1), keep, raise (+1), clamped at the ends, so margins
    always lie in [min(levels), max(levels)].

    **Schedule.** Each training-mode forward (1) computes the loss with the current
    margins, (2) adds the batch to the per-class window statistics with
    ``class_statistics_update_`` (counts n_c, Σ x̂·ŵ_c, Σ ‖x̂ − ŵ_c‖², against the weight
    at that step), and (3) on every ``update_every``-th training call, lets the agent
    move (so the new margins apply from the next call). Eval mode gathers nothing and
    never moves. A move involves only the classes *active* in the window (n_c > 0) and
    then clears the window.

    **State** of an active class c at a move:
        * count bin: tertile of c's cumulative training count among all classes seen so
          far (or fixed ``count_thresholds``);
        * spread bin: tertile of intra_c among the active classes (or fixed
          ``spread_thresholds``), where intra_c = Σ‖x̂ − ŵ_c‖² / n_c over the window, the
          mean squared distance of the class's normalised features to its normalised
          weight;
        * its current margin level.
      3 × 3 × 4 = 36 states with the defaults, encoded for the Q-network as one-hots.

    **Reward.** With inter_c = min_{j≠c} ‖ŵ_c − ŵ_j‖² (squared distance from c's weight to
    the nearest other class's weight, at the move), the class score is
    score_c = inter_c − intra_c (larger: farther from the others, tighter around its
    weight). A class's transition (s, a) → s' completes at the next move where the class
    is active again; its raw gain is Δ_c = score_c(now) − score_c(when it acted). The
    reward is Δ_c standardised over the transitions completing at that move,
    r_c = clip((Δ_c − mean Δ)/(std Δ + 1e-8), −3, 3) (population std; r = 0 when only one
    transition completes), which removes the drift all classes share as training
    proceeds and keeps rewards on a fixed scale.

    **Agent.** DQN: a Q-network (MLP, 2 hidden layers of ``hidden`` units) and a target
    network copied from it every ``target_sync`` learning rounds; experience replay
    (ring buffer of ``replay_capacity`` transitions); at each move, once the replay
    holds ``min_replay`` transitions, ``train_steps`` Adam steps on minibatches of
    ``replay_batch`` with the Huber loss to r + γ·max_a' Q_target(s', a'); then
    ε-greedy actions with ε = max(epsilon_end, epsilon_start·epsilon_decay^moves). The
    agent runs on the CPU (its inputs are per-class bins); randomness (network init,
    ε-greedy, replay sampling) comes from its own generator seeded with ``seed``.

    **Distributed training.** With ``sync_statistics`` (default) under an initialised
    torch.distributed, each training forward gathers every rank's embeddings and labels
    over ``process_group`` (default: the world; one all-gather of B·D values) and updates
    the window statistics and counts from the global batch, so every rank's agent sees
    the same statistics as one process would; after each move the first rank's margins
    and pending transitions are broadcast, so all ranks train with the same margins.
    Every rank of the group must call a training forward together. ``.weight`` is a
    parameter like any other: keep it in step with DDP.

    **Checkpointing.** Counters, margins, window statistics and pending transitions are
    buffers; the networks, the Adam state, the replay buffer, ε and the generator state
    travel in ``get_extra_state``: a module loaded from another's ``state_dict`` acts
    identically from then on.

    Cost of a move: O(B)-sized transfers and, for inter_c, a chunked (active × C)
    product of normalised weights (≤ ``update_every``·B·C·D flops, once per
    ``update_every`` steps), never a (C, C) matrix. The buffers keep their dtypes under
    ``.half()`` / ``.to(dtype)`` (only ``.weight`` follows).
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
        check_positive_ints(num_classes=num_classes, embedding_dim=embedding_dim)
        check_real("scale", scale, low=0.0, low_inclusive=False)
        for name, v in (("update_every", update_every), ("replay_capacity", replay_capacity),
                        ("replay_batch", replay_batch), ("train_steps", train_steps), ("target_sync", target_sync),
                        ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        levels = [check_real("margin_levels entry", m, low=0.0) for m in margin_levels]
        if len(levels) < 2 or sorted(levels) != levels or len(set(levels)) != len(levels):
            raise ValueError(f"margin_levels must be >= 2 increasing values, got {tuple(margin_levels)}")
        check_real("initial_margin", initial_margin)
        start = min(range(len(levels)), key=lambda i: abs(levels[i] - initial_margin))
        if abs(levels[start] - initial_margin) > 1e-9:
            raise ValueError(f"initial_margin {initial_margin} is not one of margin_levels {tuple(levels)}")
        for name, th in (("count_thresholds", count_thresholds), ("spread_thresholds", spread_thresholds)):
            if th is not None and (len(th) != 2 or float(th[0]) > float(th[1])):
                raise ValueError(f"{name} must be two increasing thresholds (3 bins), got {th!r}")
        check_real("gamma", gamma, low=0.0, high=1.0)
        for name, v in (("epsilon_start", epsilon_start), ("epsilon_end", epsilon_end), ("epsilon_decay", epsilon_decay)):
            check_real(name, v, low=0.0, high=1.0)
        check_real("lr", lr, low=0.0, low_inclusive=False)
        if not isinstance(min_replay, int) or min_replay < 1:
            raise ValueError(f"min_replay must be a positive int, got {min_replay!r}")
        check_sync_args(sync_statistics, process_group)

        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.scale, self.update_every = float(scale), update_every
        self.margin_levels = tuple(levels)
        self.count_thresholds = None if count_thresholds is None else tuple(map(float, count_thresholds))
        self.spread_thresholds = None if spread_thresholds is None else tuple(map(float, spread_thresholds))
        self.gamma, self.lr = float(gamma), float(lr)
        self.epsilon_start, self.epsilon_end, self.epsilon_decay = float(epsilon_start), float(epsilon_end), float(epsilon_decay)
        self.replay_capacity, self.replay_batch, self.min_replay = replay_capacity, replay_batch, min_replay
        self.train_steps, self.target_sync, self.hidden, self.seed = train_steps, target_sync, hidden, int(seed)
        self.chunk_elements = chunk_elements
        self.sync_statistics, self.process_group = sync_statistics, process_group
        self.loss_kwargs = loss_kwargs
        self.ignore_index = int(loss_kwargs.get("ignore_index", -100))

        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, dtype=dtype, device=device))
        nn.init.normal_(self.weight, mean=0.0, std=0.01)
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
        self._init_agent()

    # ------------------------------------------------------------------ agent (CPU, extra state)
    def _init_agent(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)
        sizes = (3, 3, len(self.margin_levels))
        self._q_net = QNetwork(*sizes, self.hidden)
        self._q_net.init_(self._generator)
        self._target_net = QNetwork(*sizes, self.hidden)
        self._target_net.load_state_dict(self._q_net.state_dict())
        for p in self._target_net.parameters():
            p.requires_grad_(False)
        self._optimizer = torch.optim.Adam(self._q_net.parameters(), lr=self.lr)
        cap = self.replay_capacity
        self._replay = {
            "state": torch.zeros(cap, dtype=torch.int64),
            "action": torch.zeros(cap, dtype=torch.int64),
            "reward": torch.zeros(cap, dtype=torch.float32),
            "next_state": torch.zeros(cap, dtype=torch.int64),
        }
        self._replay_size = 0
        self._replay_pos = 0
        self._learn_rounds = 0
        self._last_loss = float("nan")

    # nn.Module.__setattr__ would register QNetwork attributes as submodules (their
    # parameters would then reach the user's optimizer); keep them out of the module tree.
    def __setattr__(self, name, value):
        if name in ("_q_net", "_target_net", "_optimizer", "_generator"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def q_network(self) -> QNetwork:
        return self._q_net

    @property
    def margin_range(self) -> tuple[float, float]:
        """(lowest, highest) margin a class can have: the ends of ``margin_levels``."""
        return self.margin_levels[0], self.margin_levels[-1]

    @property
    def epsilon(self) -> float:
        return max(self.epsilon_end, self.epsilon_start * self.epsilon_decay ** int(self.agent_moves))

    @property
    def replay_size(self) -> int:
        return self._replay_size

    def get_extra_state(self) -> dict:
        return {
            "version": 1,
            "q_net": {k: v.clone() for k, v in self._q_net.state_dict().items()},
            "target_net": {k: v.clone() for k, v in self._target_net.state_dict().items()},
            "optimizer": self._optimizer.state_dict(),
            "replay": {k: v.clone() for k, v in self._replay.items()},
            "replay_size": self._replay_size,
            "replay_pos": self._replay_pos,
            "learn_rounds": self._learn_rounds,
            "epsilon": self.epsilon,
            "generator": self._generator.get_state(),
        }

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("FairLoss: unrecognised agent state in the state_dict")
        if state["replay"]["state"].numel() != self.replay_capacity:
            raise ValueError(
                f"FairLoss: the checkpoint's replay capacity is {state['replay']['state'].numel()}, "
                f"this module's is {self.replay_capacity}; build the module with the same replay_capacity"
            )
        self._q_net.load_state_dict(state["q_net"])
        self._target_net.load_state_dict(state["target_net"])
        self._optimizer = torch.optim.Adam(self._q_net.parameters(), lr=self.lr)
        self._optimizer.load_state_dict(state["optimizer"])
        self._replay = {k: v.clone().cpu() for k, v in state["replay"].items()}
        self._replay_size = int(state["replay_size"])
        self._replay_pos = int(state["replay_pos"])
        self._learn_rounds = int(state["learn_rounds"])
        self._generator.set_state(state["generator"].cpu())

    def _push(self, states, actions, rewards, next_states) -> None:
        cap = self.replay_capacity
        for name, values in (("state", states), ("action", actions), ("reward", rewards), ("next_state", next_states)):
            values = values.cpu()
            n = values.numel()
            idx = (self._replay_pos + torch.arange(n)) % cap
            self._replay[name][idx[-cap:]] = values[-cap:].to(self._replay[name].dtype)
        n = states.numel()
        self._replay_pos = (self._replay_pos + n) % cap
        self._replay_size = min(cap, self._replay_size + n)

    def _learn(self) -> None:
        if self._replay_size < self.min_replay:
            return
        for _ in range(self.train_steps):
            ix = torch.randint(self._replay_size, (self.replay_batch,), generator=self._generator)
            s, a = self._replay["state"][ix], self._replay["action"][ix]
            r, s2 = self._replay["reward"][ix], self._replay["next_state"][ix]
            with torch.no_grad():
                target = r + self.gamma * self._target_net(s2).max(dim=1).values
            q = self._q_net(s).gather(1, a[:, None]).squeeze(1)
            loss = F.smooth_l1_loss(q, target)
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
            self._last_loss = loss.item()
        self._learn_rounds += 1
        if self._learn_rounds % self.target_sync == 0:
            self._target_net.load_state_dict(self._q_net.state_dict())

    @torch.no_grad()
    def _choose(self, states: torch.Tensor) -> torch.Tensor:
        n = states.numel()
        explore = torch.rand(n, generator=self._generator) < self.epsilon
        random_actions = torch.randint(len(ACTIONS), (n,), generator=self._generator)
        greedy = self._q_net(states).argmax(dim=1)
        return torch.where(explore, random_actions, greedy)

    # ------------------------------------------------------------------ statistics and moves
    @torch.no_grad()
    def class_states(self, classes: torch.Tensor, intra: torch.Tensor) -> torch.Tensor:
        """Encoded states (N,) of ``classes`` given their window spreads ``intra`` (float64)."""
        seen = self.seen_counts.to(torch.float64)
        count_bin = _tertile_bins(seen[classes], seen[seen > 0], self.count_thresholds)
        spread_bin = _tertile_bins(intra, intra, self.spread_thresholds)
        L = len(self.margin_levels)
        return (count_bin * 3 + spread_bin) * L + self.margin_level[classes]

    @torch.no_grad()
    def agent_step(self) -> None:
        """One move of the agent on the window's statistics (``forward`` calls it on schedule)."""
        active = (self.window_counts > 0).nonzero().squeeze(1)
        if active.numel():
            n = self.window_counts[active].to(torch.float64)
            intra = self.window_sq_sum[active] / n
            inter = nearest_other_sqdist(self.weight, active, self.chunk_elements)
            score = inter - intra
            states = self.class_states(active, intra)
            # Complete the pending transitions of the classes active again.
            done = self.pending_state[active] >= 0
            if bool(done.any()):
                cls = active[done]
                delta = score[done] - self.pending_score[cls]
                if delta.numel() >= 2:
                    reward = ((delta - delta.mean()) / (delta.std(unbiased=False) + 1e-8)).clamp(-3.0, 3.0)
                else:
                    reward = torch.zeros_like(delta)
                self._push(self.pending_state[cls], self.pending_action[cls], reward, states[done])
            with torch.enable_grad():
                self._learn()
            actions = self._choose(states.cpu()).to(active.device)
            level = (self.margin_level[active] + actions - 1).clamp(0, len(self.margin_levels) - 1)
            self.margin_level[active] = level
            levels = torch.tensor(self.margin_levels, dtype=torch.float32, device=level.device)
            self.class_margins[active] = levels[level]
            self.pending_state[active] = states
            self.pending_action[active] = actions
            self.pending_score[active] = score
        self.window_counts.zero_()
        self.window_cos_sum.zero_()
        self.window_sq_sum.zero_()
        self.agent_moves += 1

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        group = sync_group(self.sync_statistics, self.process_group) if self.training else None
        loss, error = local_loss(lambda: margin_cross_entropy(
            embeddings, self.weight, labels, CosFace(0.0), self.scale, class_margins=self.class_margins, **self.loss_kwargs
        ), group)
        if self.training:
            with torch.no_grad():
                x, y = global_batch(embeddings, labels, group, error)
                class_statistics_update_(
                    self.window_counts, self.window_cos_sum, self.window_sq_sum, x, self.weight.detach(), y,
                    self.ignore_index,
                )
                kept = y != self.ignore_index
                self.seen_counts.index_add_(0, torch.where(kept, y, torch.zeros_like(y)), kept.to(torch.int64))
                self.forward_calls += 1
                if int(self.forward_calls) % self.update_every == 0:
                    self.agent_step()
                    if group is not None:  # one agent decides: margins equal on every rank
                        broadcast_from_first_([self.margin_level, self.class_margins, self.pending_state,
                                               self.pending_action, self.pending_score], group)
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, scale={self.scale}, "
            f"update_every={self.update_every}, margin_levels={self.margin_levels}"
        )
