"""Running one cell of a sweep: one provider at one shape, into one :class:`Row`.

A checked provider (marginkit's rows) is first compared with float64
(:mod:`marginkit.bench.check`); a mismatch makes the row ``error`` with the
error in its note, and it is not timed. Then :func:`marginkit.bench.timing.measure`
times it and measures its peak extra memory. An out-of-memory error is an
``oom`` row, any other exception an ``error`` row; a CUDA context that no
longer works raises :class:`DeviceLost` after the row is filled, so the sweep
can stop and still write what it has.
"""

from __future__ import annotations

import gc
import math
from typing import Optional

import torch

from marginkit.bench.check import check_against_float64
from marginkit.bench.config import dtype_name, make_spec
from marginkit.bench.plan import Cell
from marginkit.bench.providers import PROVIDERS, Inputs, make_inputs
from marginkit.bench.records import Row
from marginkit.bench.timing import measure

__all__ = ["DeviceLost", "is_oom", "cleanup", "make_cell_inputs", "new_row", "run_cell", "copy_measurement"]


class DeviceLost(RuntimeError):
    """The CUDA context is broken (e.g. a peer's illegal memory access): no later run can work."""


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is an out-of-memory error, CUDA or CPU."""
    oom_types = tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
    )
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if oom_types and isinstance(exc, oom_types):
            return True
        if isinstance(exc, MemoryError):
            return True
        msg = str(exc).lower()
        if "out of memory" in msg or "can't allocate memory" in msg:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def cleanup(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _failure(exc: BaseException) -> tuple:
    return ("oom" if is_oom(exc) else "error", f"{type(exc).__name__}: {_first_line(exc)}")


def make_cell_inputs(cfg, seed: int):
    """(inputs, None) or (None, (status, note)) when the inputs alone do not fit or fail."""
    try:
        return make_inputs(cfg, seed), None
    except Exception as exc:
        failure = ("oom" if is_oom(exc) else "error", f"inputs: {type(exc).__name__}: {str(exc)[:200]}")
        cleanup(cfg.device)
        return None, failure


def new_row(cell: Cell, label: str, date: str) -> Row:
    cfg = cell.cfg
    return Row(label, date, cell.method, cfg.B, cfg.D, cfg.C, dtype_name(cfg.dtype), cell.margin,
               sweep_margin=cfg.margin)


def copy_measurement(src: Row, row: Row) -> Row:
    """The floor of a shape is measured once and filed under each margin of the sweep."""
    for f in ("ms_median", "ms_p20", "ms_p80", "peak_extra_mib", "status", "note", "first_call_s", "reps", "timer"):
        setattr(row, f, getattr(src, f))
    return row


def run_cell(cell: Cell, row: Row, inputs: Optional[Inputs], timing: dict) -> Row:
    """Check (when the provider is checked), time and measure ``cell`` into ``row``."""
    prov = PROVIDERS[cell.method]
    device = cell.cfg.device
    case = None
    failure = None
    try:
        spec = make_spec(cell.margin)
        case = prov.build(inputs, spec)
        cpu_tracked = not device.startswith("cuda") and case.memory_traceable
        if prov.checked:
            # the check's step is the run's first call (compile, autotuning) and, on the CPU, its memory step
            check = check_against_float64(case, inputs, spec, track_memory=cpu_tracked)
            row.check_rel_err = check.max_rel_err
            if not check.ok:
                failure = ("error", f"float64 check failed, not timed: {check.summary()}")
        if failure is None:
            inputs_tensors = (inputs.x, inputs.w, inputs.labels)
            m = measure(case, device, preexisting=inputs_tensors, warmed_up=prov.checked, **timing)
            row.ms_median, row.ms_p20, row.ms_p80 = m.ms_median, m.ms_p20, m.ms_p80
            row.peak_extra_mib, row.reps, row.timer = m.peak_extra_mib, m.reps, m.timer
            if prov.checked:
                row.first_call_s = check.step_s
                if cpu_tracked:
                    row.peak_extra_mib = check.peak_extra_mib
            else:
                row.first_call_s = m.first_call_s
            notes = [case.note] + ([f"float64 check: rel err {check.max_rel_err:.1g}"] if prov.checked else [])
            row.note = "; ".join(n for n in notes if n)
    except Exception as exc:
        failure = _failure(exc)
    finally:
        if case is not None:
            for p in case.params:
                p.grad = None
        case = None
    lost = False
    try:
        cleanup(device)
    except Exception as exc:  # the synchronize after the run fails: the context is gone
        lost = True
        failure = ("error", f"device failed, sweep stopped ({type(exc).__name__}: {_first_line(exc)})")
    if failure:
        row.status, row.note = failure
        row.ms_median = row.ms_p20 = row.ms_p80 = row.peak_extra_mib = math.nan
    if lost:
        raise DeviceLost(row.note)
    return row
