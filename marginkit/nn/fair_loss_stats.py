"""Per-class statistics of ``FairLoss``: spread, distance to the nearest other class, bins, rewards.

The window statistics themselves (count n_c, Σ x̂·ŵ_c, Σ ‖x̂ − ŵ_c‖²) are accumulated by
the csrc op ``class_statistics_update_``; these functions turn them into the agent's
inputs. Everything here is float64 and free of state.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["tertile_bins", "nearest_other_sqdist", "standardised_rewards", "group_spread", "INTER_CHUNK_ELEMENTS"]

# Working-set bound of the nearest-class search: 4M floats (16 MiB) per (rows × classes) tile.
INTER_CHUNK_ELEMENTS = 1 << 22
# Rewards are z-scores clipped here so one outlier class cannot dominate a DQN minibatch.
REWARD_CLIP = 3.0
# Added to the standard deviation so a window of equal gains gives rewards 0, not 0/0.
REWARD_STD_EPS = 1e-8


def tertile_bins(values: torch.Tensor, population: torch.Tensor, thresholds: Optional[Sequence[float]]) -> torch.Tensor:
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
    """min_{j≠c} ‖ŵ_c − ŵ_j‖² = 2 − 2·max_{j≠c} ŵ_c·ŵ_j for each c in ``rows`` (N,) -> (N,) float64.

    Chunked over both the queried rows and the classes: the working set is at most
    ``chunk_elements`` floats; never a (C, C) matrix. 4.0 (the largest squared distance
    on the sphere) with C = 1.
    """
    with torch.autocast(weight.device.type, enabled=False):  # float32 dots, also inside the caller's autocast
        return _nearest_other_sqdist(weight, rows, chunk_elements)


def _nearest_other_sqdist(weight: torch.Tensor, rows: torch.Tensor, chunk_elements: Optional[int]) -> torch.Tensor:
    budget = chunk_elements or INTER_CHUNK_ELEMENTS
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


def standardised_rewards(delta: torch.Tensor) -> torch.Tensor:
    """r = clip((Δ − mean Δ)/(std Δ + eps), ±3) over the transitions completing together
    (population std; zeros when fewer than two): removes the drift every class shares."""
    if delta.numel() < 2:
        return torch.zeros_like(delta)
    return ((delta - delta.mean()) / (delta.std(unbiased=False) + REWARD_STD_EPS)).clamp(-REWARD_CLIP, REWARD_CLIP)


def group_spread(counts: torch.Tensor, sq_sums: torch.Tensor, groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled intra-class spread per group: (Σ_{c∈g} Σ‖x̂ − ŵ_c‖² / Σ_{c∈g} n_c (G,) float64,
    samples per group (G,) int64). Spread is NaN for a group with no sample."""
    n = torch.zeros(num_groups, dtype=torch.int64, device=counts.device).index_add_(0, groups, counts)
    s = torch.zeros(num_groups, dtype=torch.float64, device=counts.device).index_add_(0, groups, sq_sums.to(torch.float64))
    return s / n.to(torch.float64), n
