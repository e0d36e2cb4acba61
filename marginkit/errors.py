"""Typed input errors and the small validators every public entry point shares.

Messages name the argument, the value received and what is allowed, so a user
can fix the call without reading the source.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

__all__ = [
    "MarginKitTypeError", "check_real", "check_gradient_mode", "check_choice", "check_positive_ints", "check_bool",
    "check_int", "check_float_dtype", "check_memory_budget",
]

GRADIENT_MODES = ("exact", "straight_through")


class MarginKitTypeError(TypeError, ValueError):
    """A wrong dtype, device or kind of argument.

    It is both a TypeError (what Python raises for wrong kinds) and a ValueError
    (what API.md promises for dtype, device and shape mismatches), so either
    ``except`` clause catches it.
    """


def check_real(
    name: str,
    value,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Validate a finite real scalar within [low, high]; return it as float."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise MarginKitTypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    v = float(value)
    if not abs(v) < math.inf:  # not math.isfinite: torch.compile(dynamic=True) traces a float as a SymFloat
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    if high is not None and (v > high or (v == high and not high_inclusive)):
        bound = (f"<= {high}" if high_inclusive else f"< {high}") + (" (π)" if high == math.pi else "")
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return v


def check_positive_ints(**values) -> None:
    """Each keyword must be an int ≥ 1 (sizes such as num_classes, embedding_dim)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def check_int(name: str, value, low: Optional[int] = None) -> int:
    """A Python int (not a bool: ``seed=1.7`` must not become 1 silently) within int64 and >= ``low``.
    A SymInt (torch.compile traced it) passes unchecked: the ops' real calls check the concrete value."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise MarginKitTypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} = {value} does not fit in int64 (allowed: [-2**63, 2**63 - 1])")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


#: the floating dtypes marginkit computes in (a head's weight, the compiled ops' tensors)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: the half-precision ones: with a float32 weight they are the fp32-master-weight case
HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_float_dtype(name: str, value) -> None:
    """None (torch's default) or a floating dtype a weight can be trained in."""
    if value is not None and value not in FLOAT_DTYPES:
        allowed = ", ".join(str(d) for d in FLOAT_DTYPES)
        raise MarginKitTypeError(f"{name} must be None or one of {allowed}; got {value!r}")


def check_memory_budget(value) -> None:
    """``memory_budget``: bytes the loss may keep from forward to backward, >= 0, or None (no limit)."""
    if value is not None:
        if isinstance(value, float) and value == float("inf"):
            raise ValueError("memory_budget = inf: pass None for no limit (or a number of bytes >= 0)")
        check_real("memory_budget", value, low=0.0)


def check_bool(name: str, value) -> None:
    """A flag must be a real bool: ``normalize="no"`` would otherwise be silently truthy."""
    if not isinstance(value, bool):
        raise MarginKitTypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_gradient_mode(value) -> None:
    check_choice("gradient", value, GRADIENT_MODES)
