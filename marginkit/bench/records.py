"""What a sweep produces: one :class:`Row` per run (the CSV's columns and what only the JSON and the
table carry) and the :class:`BenchResult` of a whole sweep."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["Row", "BenchResult"]


@dataclass
class Row:
    device: str
    date: str
    method: str
    B: int
    D: int
    C: int
    dtype: str
    margin: str
    ms_median: float = math.nan
    ms_p20: float = math.nan
    ms_p80: float = math.nan
    peak_extra_mib: float = math.nan
    floor_ms: float = math.nan
    # not in the CSV (the sidecar JSON and the table carry them)
    sweep_margin: str = ""
    status: str = "ok"  # ok | oom | error
    note: str = ""
    first_call_s: float = math.nan
    reps: int = 0
    timer: str = ""
    check_rel_err: float = math.nan  # the float64 check's largest relative error (checked providers)

    @property
    def flops(self) -> float:
        return 6.0 * self.B * self.D * self.C

    @property
    def tflops(self) -> float:
        """The floor's useful flops (3 GEMMs) per second of this step, in TFLOP/s."""
        return self.flops / (self.ms_median * 1e9) if self.ms_median > 0 else math.nan

    @property
    def floor_frac(self) -> float:
        """floor_ms / ms_median: 1.0 runs at the floor, 0.5 takes twice as long."""
        return self.floor_ms / self.ms_median if self.ms_median > 0 else math.nan

    def csv_record(self) -> dict:
        def num(v, fmt):
            # "nan" (not "") for what was not measured, so every numeric column parses as a float.
            return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

        peak = self.status if self.status in ("oom", "error") else num(self.peak_extra_mib, ".1f")
        return {
            "device": self.device,
            "date": self.date,
            "method": self.method,
            "B": str(self.B),
            "D": str(self.D),
            "C": str(self.C),
            "dtype": self.dtype,
            "margin": self.margin,
            "ms_median": num(self.ms_median, ".4f"),
            "ms_p20": num(self.ms_p20, ".4f"),
            "ms_p80": num(self.ms_p80, ".4f"),
            "peak_extra_mib": peak,
            "floor_ms": num(self.floor_ms, ".4f"),
        }


@dataclass
class BenchResult:
    rows: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # provider (or provider and shape) -> reason
    not_run: list = field(default_factory=list)  # runs not started: --time-limit-s reached or the device failed
    stop_reason: Optional[str] = None
    csv_path: Optional[Path] = None
    json_path: Optional[Path] = None
    plot_path: Optional[Path] = None
    errors: int = 0
