"""Fair Loss as the paper trains it: per-group margins, an agent fitted offline, then frozen.

Liu, Deng, Zhong, Wang, Hu, Tao, Huang, "Fair Loss: Margin-Aware Reinforcement Learning
for Deep Face Recognition", ICCV 2019. What the paper specifies and what is chosen here:

* **Groups.** Classes are grouped by sample count; every class of a group shares one
  margin. Chosen: the group *is* the count bin, 3 bins with fixed edges from the
  dataset's class sizes (``fixed_count_bins``: the tertiles of the sizes unless given).
* **State** (paper): count bin × intra-class-variance bin × margin level, 3 × 3 × 4 = 36.
  The paper does not give the variance bin edges. Chosen: the group's pooled spread
  (mean ‖x̂ − ŵ_c‖² over its samples, on a full pass over the training set) binned by
  fixed edges, the tertiles of the per-class spreads at the pre-trained checkpoint
  (``tertile_edges``).
* **Actions**: lower / keep / raise the group's margin by one level of (0.15, 0.25,
  0.35, 0.45).
* **Offline phase** (paper: "sample networks" fine-tuned from a pre-trained model with
  one group's margin changed). Chosen (``collect_transitions``): from one checkpoint and
  a base assignment of levels, one copy fine-tuned with the base margins (*keep*) and,
  per group and per action lower/raise, one copy with that group's margin moved; the
  fine-tune length is the caller's (the paper does not state it; the demo uses 2
  epochs). Each action is scored against the keep copy, so keep has reward 0.
* **Reward.** The paper derives it from the change of inter- and intra-class distances
  but does not give the formula. Two are offered and both are recorded per tuple:
  ``"local"``: Δ of the group's own mean (inter_c − intra_c) against the keep copy (the
  paper's kind of reward; it cannot see what a group's margin costs the *other*
  groups); ``"global"``: Δ of the class-balanced validation accuracy over all classes.
* **Agent** (paper: DQN). Chosen: a 36 × 3 table fitted by fitted-Q iteration on the
  tuples (``FairLossTable.fit``): a deterministic function of the tuples, which is what
  a DQN converges to on so few distinct states. Unvisited state-actions are 0, ties go
  to *keep*.
* **Use**: frozen; one move per group per epoch of the real training
  (``FairLoss(policy=table, class_count_bins=..., spread_thresholds=...,
  update_every=steps_per_epoch)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

from marginkit.nn.fair_loss_agent import ACTIONS, NUM_COUNT_BINS, NUM_SPREAD_BINS, encode_states
from marginkit.nn.fair_loss_stats import tertile_bins

__all__ = ["FairLossTable", "GroupMeasure", "Transitions", "collect_transitions", "fixed_count_bins", "tertile_edges"]

KEEP = ACTIONS.index("keep")


def tertile_edges(values: torch.Tensor) -> tuple[float, float]:
    """(t1, t2): the lower and upper tertile order statistics of ``values`` (same rule as the bins)."""
    ordered = values.detach().to(torch.float64).flatten().sort().values
    n = ordered.numel()
    if n == 0:
        raise ValueError("tertile_edges needs at least one value")
    return float(ordered[(n - 1) // 3]), float(ordered[(2 * (n - 1)) // 3])


def fixed_count_bins(class_counts: torch.Tensor, thresholds: Optional[Sequence[float]] = None) -> torch.Tensor:
    """(C,) int64 count bin 0/1/2 of each class from the dataset's class sizes (C,):
    [n > t1] + [n > t2], with (t1, t2) the tertiles of the sizes unless given. With many tied
    sizes the bins are far from thirds (sizes 70×1, 20×2, 10×100 bin 70/0/30): pass thresholds."""
    counts = class_counts.detach().to(torch.float64)
    return tertile_bins(counts, counts, thresholds)


@dataclass
class GroupMeasure:
    """What one model tells the offline phase, for G groups.

    spread: (G,) float64 pooled intra-class spread of each group on a full training pass;
    compactness: (G,) float64 each group's mean over its classes of inter_c − intra_c;
    accuracy: class-balanced validation accuracy over all classes (a float).
    """

    spread: torch.Tensor
    compactness: torch.Tensor
    accuracy: float


@dataclass
class Transitions:
    """Offline tuples (N,): states, actions, next states (int64) and one reward (N,) float64 per kind."""

    states: torch.Tensor
    actions: torch.Tensor
    next_states: torch.Tensor
    rewards: Dict[str, torch.Tensor]


def collect_transitions(
    checkpoint: GroupMeasure,
    finetune: Callable[[torch.Tensor], GroupMeasure],
    group_count_bins: torch.Tensor,
    spread_thresholds: Sequence[float],
    base_levels: Sequence[torch.Tensor],
    num_levels: int,
) -> Transitions:
    """The offline phase: for each base assignment of levels (G,) int64 in ``base_levels``,
    fine-tune a keep copy and, per group and per action lower/raise, a copy with that
    group's level moved (a move clamped at an end is the keep copy: no fine-tune), and
    record (s, a, r, s') per group and action. ``finetune(levels)`` must start from the
    same checkpoint every time; ``checkpoint`` is that checkpoint's own measure (it gives
    the spread bin of s). Fine-tunes: at most 1 + 2·G per base assignment.
    """
    bins = group_count_bins.to(torch.int64).cpu()
    spread_bin = lambda measure: tertile_bins(measure.spread.cpu(), measure.spread.cpu(), spread_thresholds)  # noqa: E731
    start_spread = spread_bin(checkpoint)
    rows = []  # (s, a, s', local, global)
    for base in base_levels:
        base = base.to(torch.int64).cpu()
        keep = finetune(base.clone())
        keep_spread = spread_bin(keep)
        for g in range(bins.numel()):
            s = int(encode_states(bins[g], start_spread[g], base[g], num_levels))
            for action in range(len(ACTIONS)):
                levels = base.clone()
                levels[g] = min(max(int(base[g]) + action - 1, 0), num_levels - 1)
                out = keep if torch.equal(levels, base) else finetune(levels.clone())
                s2 = int(encode_states(bins[g], (keep_spread if out is keep else spread_bin(out))[g], levels[g], num_levels))
                local = float(out.compactness[g] - keep.compactness[g])
                rows.append((s, action, s2, local, float(out.accuracy - keep.accuracy)))
    col = lambda i, dtype: torch.tensor([r[i] for r in rows], dtype=dtype)  # noqa: E731
    return Transitions(col(0, torch.int64), col(1, torch.int64), col(2, torch.int64),
                       {"local": col(3, torch.float64), "global": col(4, torch.float64)})


class FairLossTable:
    """A frozen Q table over the 9·L (count bin, spread bin, level) states × 3 actions.

    ``fit`` is fitted-Q iteration: Q_{k+1}(s, a) = mean over the tuples with (s, a) of
    r + γ·max_a' Q_k(s', a'), from Q_0 = 0, ``iterations`` times; state-actions with no
    tuple stay 0. ``act`` is greedy, ties broken towards keep (then lower, then raise).
    """

    def __init__(self, num_levels: int = 4, q: Optional[torch.Tensor] = None) -> None:
        shape = (NUM_COUNT_BINS * NUM_SPREAD_BINS * num_levels, len(ACTIONS))
        self.num_levels = num_levels
        self.q = torch.zeros(shape, dtype=torch.float64) if q is None else q.detach().to(torch.float64).cpu().clone()
        if tuple(self.q.shape) != shape:
            raise ValueError(f"FairLossTable: q must have shape {shape} for {num_levels} levels, got {tuple(self.q.shape)}")

    @classmethod
    def fit(cls, transitions: Transitions, reward: str = "global", num_levels: int = 4,
            gamma: float = 0.5, iterations: int = 50) -> "FairLossTable":
        if reward not in transitions.rewards:
            raise ValueError(f"reward must be one of {tuple(transitions.rewards)}, got {reward!r}")
        table = cls(num_levels)
        n_states = table.q.shape[0]
        cell = (transitions.states * len(ACTIONS) + transitions.actions).cpu()
        visits = torch.bincount(cell, minlength=n_states * len(ACTIONS)).to(torch.float64)
        r = transitions.rewards[reward].to(torch.float64).cpu()
        nxt = transitions.next_states.cpu()
        for _ in range(iterations):
            target = r + gamma * table.q.max(dim=1).values[nxt]
            total = torch.zeros(n_states * len(ACTIONS), dtype=torch.float64).index_add_(0, cell, target)
            table.q = torch.where(visits > 0, total / visits.clamp_min(1.0), 0.0).view(n_states, len(ACTIONS))
        return table

    def act(self, states: torch.Tensor) -> torch.Tensor:
        """Greedy actions (N,) int64 for states (N,) int64 (any device; computed on the CPU)."""
        q = self.q[states.cpu()]
        best = q.max(dim=1, keepdim=True).values
        order = torch.tensor([KEEP] + [a for a in range(len(ACTIONS)) if a != KEEP])
        first_best = (q[:, order] == best).to(torch.int64).argmax(dim=1)  # first maximum in tie order
        return order[first_best].to(states.device)

    def state_dict(self) -> dict:
        return {"num_levels": self.num_levels, "q": self.q.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FairLossTable":
        return cls(int(state["num_levels"]), state["q"])
