"""Writing a sweep's reports: the CSV (API.md schema), the JSON sidecar, the PNG and the terminal text."""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from marginkit.bench.check import TOLERANCE
from marginkit.bench.config import CSV_COLUMNS, dtype_name
from marginkit.bench.memory import CPU_MEMORY_METHOD
from marginkit.bench.plan import SweepPlan
from marginkit.bench.records import BenchResult
from marginkit.bench.timing import CUDA_MEMORY_METHOD

__all__ = ["write_csv", "write_json", "format_table", "json_header", "banner_lines", "summary_lines",
           "write_reports", "versions", "CPU_SCOPE"]

#: what a CPU run measures and what it cannot, printed under its table
CPU_SCOPE = (
    "A CPU run measures memory (peak extra MiB) and relative overhead between the losses on this CPU; it cannot "
    "say anything about GPU speed. GPU results: benchmarks/results/ and the README's benchmark table."
)


def write_csv(rows, path) -> Path:
    """Write ``rows`` to ``path`` in API.md's columns (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow(r.csv_record())
    tmp.replace(path)
    return path


def versions(device: str) -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    dists = {"triton": "triton", "pytorch_metric_learning": "pytorch-metric-learning",
             "cut_cross_entropy": "cut-cross-entropy", "liger_kernel": "liger-kernel"}
    for mod, dist in dists.items():
        try:
            m = __import__(mod)
        except Exception:
            v[mod] = None
            continue
        try:  # the installed distribution's version: liger_kernel has no __version__
            v[mod] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            v[mod] = getattr(m, "__version__", "?")
    if str(device).startswith("cuda"):
        v["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(torch.device(device))
        v["gpu"] = {"name": props.name, "sm": f"{props.major}.{props.minor}",
                    "multiprocessors": props.multi_processor_count,
                    "memory_gib": round(props.total_memory / 2**30, 1)}
    else:
        v["cpu_threads"] = torch.get_num_threads()
    return v


def json_header(plan: SweepPlan) -> dict:
    cuda = plan.on_cuda
    return {
        "device": plan.label,
        "date": plan.date,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": versions(plan.device),
        "argv": sys.argv,
        "sweep": plan.sweep,
        "timing": ("CUDA: triton.testing.do_bench (CUDA events, L2 flushed, median/p20/p80) after warm-up; steps "
                   "slower than 200 ms: CUDA events, as many as fit in budget_s" if cuda else
                   "CPU: time.perf_counter loop after warm-up, as many steps as fit in budget_s"),
        "budget_s": plan.timing["budget_s"],
        "memory": CUDA_MEMORY_METHOD if cuda else CPU_MEMORY_METHOD,
        "check": ("marginkit rows: one forward + backward at the benchmark shape compared with a float64 path "
                  "(loss, dX of every row, dW of every target class and 256 random ones); relative error above "
                  f"{ {dtype_name(k): v for k, v in TOLERANCE.items()} } makes the row an error, not a time"),
        "flops": "floor flops 6·B·D·C (three GEMMs); TFLOP/s = that / ms_median; floor_frac = floor_ms / ms_median",
    }


def write_json(result: BenchResult, path, header: dict) -> Path:
    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    payload = dict(header)
    payload["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    payload["skipped"] = result.skipped
    payload["not_run"] = result.not_run
    payload["stop_reason"] = result.stop_reason
    payload["rows"] = [
        {**{k: clean(v) for k, v in asdict(r).items()}, "tflops": clean(r.tflops), "floor_frac": clean(r.floor_frac)}
        for r in result.rows
    ]
    path = Path(path)
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    return path


def _fmt(v, fmt, empty="-"):
    return empty if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_table(rows) -> str:
    head = ["method", "margin", "B", "D", "C", "dtype", "ms median", "p20-p80", "TFLOP/s",
            "floor/ms", "x floor", "peak MiB", "1st call s", "note"]
    body = []
    for r in rows:
        shape = [r.method, r.margin, str(r.B), str(r.D), str(r.C), r.dtype]
        if r.status == "ok":
            span = f"{_fmt(r.ms_p20, '.3f')}-{_fmt(r.ms_p80, '.3f')}"
            body.append(shape + [_fmt(r.ms_median, ".3f"), span, _fmt(r.tflops, ".3g"), _fmt(r.floor_frac, ".2f"),
                                 _fmt(1 / r.floor_frac if r.floor_frac else math.nan, ".2f"),
                                 _fmt(r.peak_extra_mib, ".1f"), _fmt(r.first_call_s, ".2f"), r.note])
        else:
            body.append(shape + [r.status.upper(), "", "", "", "", r.status, "", r.note])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def cpu_load_notes() -> list:
    """Why CPU timings may not match the README's: its threads, and other work on the machine."""
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    lines = [f"  note: {threads} CPU thread(s) on {cores} core(s); the README's CPU table used one "
             "(OMP_NUM_THREADS=1), set it to compare."] if threads > 1 else []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores / 2:  # other processes hold the cores: a thread descheduled mid-op stalls the others
        lines.append(f"  note: load average {load:.1f} on {cores} core(s): other processes share this CPU, so "
                     "timings vary between runs (most with several threads and small ops: marginkit's chunks).")
    return lines


def banner_lines(plan: SweepPlan) -> list:
    s = plan.sweep
    lines = [f"marginkit bench on {plan.label} ({plan.device}), {plan.date}; torch {torch.__version__}",
             f"  sweep: B={s['B']} D={s['D']} C={s['C']} dtype={s['dtype']} margin={s['margin']} s={s['scale']}"]
    if not plan.on_cuda:
        lines.append("  note: marginkit (backend='auto') resolves to the torch backend on CPU (the code "
                     "marginkit-torch names; add it with --providers to see the same numbers twice).")
        lines += cpu_load_notes()
        if "torch-compile" not in plan.sweep["providers"]:
            lines.append("  note: torch-compile is opt-in on CPU (compiling takes long): add --compile.")
    lines += [f"skip {n}: {why}" for n, why in plan.unavailable.items()]
    return lines


def summary_lines(result: BenchResult, plan: SweepPlan) -> list:
    """The table and what to read it with."""
    lines = ["", format_table(result.rows), ""]
    if not plan.on_cuda:
        lines.append(CPU_SCOPE)
    lines.append(f"Memory: {CUDA_MEMORY_METHOD if plan.on_cuda else CPU_MEMORY_METHOD}.")
    lines.append("TFLOP/s counts the floor's 6·B·D·C flops; floor/ms = floor_ms / ms (1.00 = at the three-GEMM floor).")
    lines.append("marginkit rows are checked against float64 (loss and gradients) before they are timed; "
                 "a mismatch is an error row.")
    for r in result.rows:
        if r.method == "torch-compile" and r.status == "ok":
            lines.append(f"torch-compile first call (compile + one step) at B={r.B} D={r.D} C={r.C}: "
                         f"{r.first_call_s:.1f} s")
    written = [result.csv_path] + ([result.plot_path] if result.plot_path else []) + [result.json_path]
    lines.append("wrote " + ", ".join(str(p) for p in written))
    if result.not_run:
        lines.append(f"{result.stop_reason}: {len(result.not_run)} run(s) not started: " + "; ".join(result.not_run))
    if result.errors:
        lines.append(f"{result.errors} measurement(s) raised errors or failed the check (rows marked 'error'); "
                     "see above")
    return lines


def write_reports(result: BenchResult, plan: SweepPlan, header: dict, echo=print) -> None:
    """The JSON, the CSV (again: a sweep with no rows still leaves a header), the plot, the terminal text."""
    write_json(result, result.json_path, header)
    write_csv(result.rows, result.csv_path)
    if result.plot_path is not None:
        try:
            from marginkit.bench.plot import plot_labels, plot_rows  # matplotlib only when a plot is asked for

            title, memory_method = plot_labels(plan.label, plan.date)
            plot_rows(result.rows, result.plot_path, title=title, memory_method=memory_method)
        except Exception as exc:  # a plot must not cost the measurements
            echo(f"plot not written ({type(exc).__name__}: {exc})")
            result.plot_path = None
    for line in summary_lines(result, plan):
        echo(line)
