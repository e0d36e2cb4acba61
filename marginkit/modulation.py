"""The one hook on non-target cosines: ``NegativeModulation``.

The target column belongs to the margin spec; every non-target cosine goes through
this modulation before scaling. A cosine above its row's threshold becomes
``quadratic·cos² + linear·cos``; the others stay as they are. Two heads use it:

- CurricularFace: threshold = the row's target logit ψ, quadratic = 1, linear = t
  (hard negatives become cos·(t + cos));
- insightface's inter-class filtering: threshold = a constant on labelled rows,
  quadratic = linear = 0 (near-duplicate identities stop acting as negatives).

Backends take it as one argument and know nothing of either paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NegativeModulation", "curricular", "interclass_filter", "slope_bound"]


@dataclass(frozen=True)
class NegativeModulation:
    """Per-row threshold (B,) and the quadratic that replaces cosines above it.

    ``threshold`` is compared in the compute dtype (float32, float64 for float64 inputs); +inf leaves
    a row untouched.
    """

    threshold: torch.Tensor
    quadratic: float
    linear: float

    def apply(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N(cos), dN/dcos) for a (B, n) block of cosines (the torch backends' form)."""
        above = cos > self.threshold.to(cos.dtype)[:, None]
        modulated = torch.where(above, cos * (self.quadratic * cos + self.linear), cos)
        slope = torch.where(above, 2.0 * self.quadratic * cos + self.linear, torch.ones_like(cos))
        return modulated, slope

    @property
    def max_slope(self) -> float:
        """An upper bound of |dN/dcos| over cos ∈ [−1, 1] (scales the backward's workspace)."""
        return max(1.0, 2.0 * abs(self.quadratic) + abs(self.linear))


def slope_bound(modulation: "NegativeModulation | None") -> float:
    """An upper bound of |dN/dcos|: the modulation's ``max_slope``, 1 without one (N(cos) = cos)."""
    return modulation.max_slope if modulation is not None else 1.0


def curricular(target_logit: torch.Tensor, t: float) -> NegativeModulation:
    """CurricularFace: negatives harder than the row's target logit become cos·(t + cos)."""
    return NegativeModulation(target_logit, 1.0, float(t))


def interclass_filter(valid_rows: torch.Tensor, threshold: float, dtype: torch.dtype) -> NegativeModulation:
    """insightface's ``interclass_filtering_threshold``: on labelled rows, non-target
    cosines above ``threshold`` count as 0 (they neither push nor get a gradient)."""
    inf = torch.full(valid_rows.shape, float("inf"), dtype=dtype, device=valid_rows.device)
    return NegativeModulation(torch.where(valid_rows, torch.full_like(inf, threshold), inf), 0.0, 0.0)
