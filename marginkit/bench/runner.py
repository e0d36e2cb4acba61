"""The benchmark runner behind ``marginkit bench`` (and the pytest-benchmark suite).

For each shape of the sweep (B × D × C × dtype × margin) it makes one set of
random inputs, measures the three-GEMM floor, then every selected provider's
forward + backward step; it writes the rows in API.md's CSV schema as it goes
(a sweep cut short still leaves its finished rows), a JSON sidecar with what
the CSV has no column for (first-call/compile time, timer, notes, versions),
a PNG plot, and prints a table.

A run that raises an out-of-memory error is a row, not a gap: ``nan`` times and
``oom`` in ``peak_extra_mib``. Any other exception is a row with ``error``
there (the message is in the terminal and the sidecar) and the exit status is 3.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import importlib.metadata
import itertools
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from marginkit.bench.config import (
    CSV_COLUMNS,
    DEFAULTS,
    MARGINS,
    METHODS,
    BenchConfig,
    device_label,
    device_slug,
    dtype_name,
    make_spec,
    parse_dtype,
    parse_sizes,
    resolve_device,
)
from marginkit.bench.providers import PROVIDERS, Inputs, make_inputs
from marginkit.bench.timing import CPU_MEMORY_REASON, measure

__all__ = ["Row", "BenchResult", "add_arguments", "run_sweep", "run_from_args", "main", "write_csv", "is_oom"]

FLOOR = "floor-3gemm"


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


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


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


class DeviceLost(RuntimeError):
    """The CUDA context is broken (e.g. a peer's illegal memory access): no later run can work."""


def _cleanup(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def write_csv(rows, path) -> Path:
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


def _versions(device: str) -> dict:
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
    return v


def _write_json(result: BenchResult, path: Path, header: dict) -> Path:
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        return v

    payload = dict(header)
    payload["skipped"] = result.skipped
    payload["not_run"] = result.not_run
    payload["stop_reason"] = result.stop_reason
    payload["rows"] = [
        {**{k: clean(v) for k, v in asdict(r).items()}, "tflops": clean(r.tflops), "floor_frac": clean(r.floor_frac)}
        for r in result.rows
    ]
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    return path


def _fmt(v, fmt, empty="-"):
    return empty if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_table(rows) -> str:
    head = ["method", "margin", "B", "D", "C", "dtype", "ms median", "p20-p80", "TFLOP/s",
            "floor/ms", "x floor", "peak MiB", "1st call s", "note"]
    body = []
    for r in rows:
        if r.status == "ok":
            span = f"{_fmt(r.ms_p20, '.3f')}-{_fmt(r.ms_p80, '.3f')}"
            body.append([r.method, r.margin, str(r.B), str(r.D), str(r.C), r.dtype, _fmt(r.ms_median, ".3f"), span,
                         _fmt(r.tflops, ".3g"), _fmt(r.floor_frac, ".2f"),
                         _fmt(1 / r.floor_frac if r.floor_frac else math.nan, ".2f"),
                         _fmt(r.peak_extra_mib, ".1f"), _fmt(r.first_call_s, ".2f"), r.note])
        else:
            body.append([r.method, r.margin, str(r.B), str(r.D), str(r.C), r.dtype, r.status.upper(), "",
                         "", "", "", r.status, "", r.note])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------


def select_providers(names, skip, device: str, include_compile: bool) -> list[str]:
    """Provider names to run, floor included, in METHODS order."""
    cuda = device.startswith("cuda")
    if names:
        chosen = []
        for n in names:
            if n not in PROVIDERS:
                raise ValueError(f"unknown provider {n!r}; choose from {', '.join(PROVIDERS)}")
            chosen.append(n)
    else:
        chosen = [n for n, p in PROVIDERS.items() if cuda or p.default_on_cpu or (n == "torch-compile" and include_compile)]
    if include_compile and "torch-compile" not in chosen:
        chosen.append("torch-compile")
    chosen = [n for n in chosen if n not in set(skip or ())]
    if FLOOR not in chosen:
        chosen.append(FLOOR)  # floor_ms is a column of every row
    return [n for n in METHODS if n in chosen]


def _sweep_configs(device, Bs, Ds, Cs, dtypes, margins, scale):
    for margin, dtype, B, D in itertools.product(margins, dtypes, Bs, Ds):
        for C in dict.fromkeys(Cs):  # in the order given: a time-boxed run can put its headline size first
            yield BenchConfig(device=device, B=B, D=D, C=C, dtype=dtype, margin=margin, scale=scale)


def run_sweep(
    *,
    device: str = "auto",
    B=None,
    D=None,
    C=None,
    dtype=None,
    margin=None,
    scale: float = 64.0,
    providers=None,
    skip=None,
    include_compile: bool = False,
    reps: Optional[int] = None,
    warmup: int = 1,
    budget_s: Optional[float] = None,
    rep_ms: float = 100.0,
    seed: int = 0,
    time_limit_s: Optional[float] = None,
    out=None,
    plot=True,
    progress: bool = True,
    echo=print,
) -> BenchResult:
    """Run a sweep and write its files. Sizes default to DEFAULTS[cpu|cuda]."""
    from tqdm.auto import tqdm

    device = resolve_device(device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    dflt = DEFAULTS[kind]
    Bs = parse_sizes(B) if B is not None else dflt["B"]
    Ds = parse_sizes(D) if D is not None else dflt["D"]
    Cs = parse_sizes(C) if C is not None else dflt["C"]
    dtypes = [parse_dtype(t) for t in (dtype if isinstance(dtype, (list, tuple)) else str(dtype).split(","))] \
        if dtype is not None else [parse_dtype(t) for t in dflt["dtype"]]
    margins = list(margin) if isinstance(margin, (list, tuple)) else (str(margin).split(",") if margin else dflt["margin"])
    for m in margins:
        if m not in MARGINS:
            raise ValueError(f"unknown margin {m!r}; use one of {', '.join(MARGINS)}")
    if not (scale > 0):
        raise ValueError(f"scale must be > 0, got {scale}")
    if reps is not None and reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}")
    if budget_s is None:
        budget_s = 3.0 if kind == "cuda" else 1.0
    names = select_providers(providers, skip, device, include_compile)

    label = device_label(device)
    date = _dt.date.today().isoformat()
    if out is None:
        out = Path(f"marginkit-bench-{device_slug(device)}-{date}.csv")
    out = Path(out)
    if plot is True:
        plot = out.with_suffix(".png")
    result = BenchResult(csv_path=out, json_path=out.with_suffix(".json"), plot_path=Path(plot) if plot else None)
    header = {
        "device": label,
        "date": date,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": _versions(device),
        "argv": sys.argv,
        "sweep": {"B": Bs, "D": Ds, "C": list(dict.fromkeys(Cs)), "dtype": [dtype_name(t) for t in dtypes],
                  "margin": margins, "scale": scale, "providers": names, "seed": seed},
        "timing": ("CUDA: triton.testing.do_bench (CUDA events, L2 flushed, median/p20/p80) after warm-up; steps "
                   "slower than 200 ms: CUDA events, as many as fit in budget_s" if kind == "cuda" else
                   "CPU: time.perf_counter loop after warm-up"),
        "budget_s": budget_s,
        "memory": ("torch.cuda.max_memory_allocated during one step minus memory allocated before it and the "
                   "gradients it leaves" if kind == "cuda" else CPU_MEMORY_REASON),
        "flops": "floor flops 6·B·D·C (three GEMMs); TFLOP/s = that / ms_median; floor_frac = floor_ms / ms_median",
    }

    echo(f"marginkit bench on {label} ({device}), {date}; torch {torch.__version__}")
    echo(f"  sweep: B={Bs} D={Ds} C={list(dict.fromkeys(Cs))} dtype={[dtype_name(t) for t in dtypes]} margin={margins} s={scale}")
    if kind == "cpu":
        echo("  note: a CPU timing says nothing about a GPU; these sizes check the plumbing.")
        echo(f"  note: {CPU_MEMORY_REASON}.")
        if "marginkit" in names:
            echo("  note: marginkit (backend='auto') resolves to the torch backend on CPU: its rows time the same "
                 "code path as marginkit-torch.")
        if "torch-compile" not in names:
            echo("  note: torch-compile is opt-in on CPU (compiling takes long): add --compile.")

    # providers whose package is absent: one clear line each, then left out
    runnable = []
    for n in names:
        reason = PROVIDERS[n].unavailable()
        if reason:
            result.skipped[n] = reason
            echo(f"skip {n}: {reason}")
        else:
            runnable.append(n)

    runnable.sort(key=lambda n: n != FLOOR)  # the floor first: every row's floor_ms comes from it
    configs = list(_sweep_configs(device, Bs, Ds, Cs, dtypes, margins, scale))
    done = set()  # (method, B, D, C, dtype, row margin): no-margin peers run once per shape
    floor_cache = {}
    device_lost = False  # after a fatal CUDA error the loop only lists what it did not run
    told = set()
    t_start = time.perf_counter()
    bar = tqdm(total=len(configs) * len(runnable), desc=f"bench {label}", unit="run",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def note(msg):
        if msg not in told:
            told.add(msg)
            (bar.write if progress else echo)(msg)

    def emit(row: Row):
        result.rows.append(row)
        if row.status == "error":
            result.errors += 1
        write_csv(result.rows, out)

    try:
        for cfg in configs:
            spec_names = {n: PROVIDERS[n].row_margin(cfg.margin) for n in runnable}
            inputs: Optional[Inputs] = None
            input_fail = None
            try:
                if not device_lost:
                    inputs = make_inputs(cfg, seed)
            except Exception as exc:  # inputs alone may not fit
                input_fail = ("oom" if is_oom(exc) else "error", f"inputs: {type(exc).__name__}: {str(exc)[:200]}")
            if input_fail:
                _cleanup(device)

            floor_key = (cfg.B, cfg.D, cfg.C, cfg.dtype)
            for n in runnable:
                bar.set_postfix_str(f"{n} C={cfg.C}")
                prov = PROVIDERS[n]
                rmargin = spec_names[n]
                reason = prov.unsupported(device, cfg.margin)
                if reason:
                    note(f"skip {n} ({cfg.margin}, {device}): {reason}")
                    bar.update(1)
                    continue
                reason = prov.too_large(cfg)
                if reason:
                    note(f"skip {n} at B={cfg.B} D={cfg.D} C={cfg.C}: {reason}")
                    result.skipped[f"{n} B={cfg.B} D={cfg.D} C={cfg.C}"] = reason
                    bar.update(1)
                    continue
                key = (n, cfg.B, cfg.D, cfg.C, cfg.dtype, rmargin)
                if key in done and n != FLOOR:
                    bar.update(1)
                    continue
                if result.stop_reason is None and time_limit_s is not None and \
                        time.perf_counter() - t_start > time_limit_s:
                    result.stop_reason = f"time limit of {time_limit_s:g} s reached"
                if result.stop_reason is not None:
                    note(f"{result.stop_reason}: runs from here on are not started (listed under not_run in the JSON)")
                    result.not_run.append(f"{n} B={cfg.B} D={cfg.D} C={cfg.C} {dtype_name(cfg.dtype)} {rmargin}")
                    bar.update(1)
                    continue
                done.add(key)
                row = Row(label, date, n, cfg.B, cfg.D, cfg.C, dtype_name(cfg.dtype), rmargin, sweep_margin=cfg.margin)
                if input_fail:
                    row.status, row.note = input_fail
                elif n == FLOOR and floor_key in floor_cache:
                    row = _copy_floor(floor_cache[floor_key], row)
                else:
                    try:
                        _measure_into(row, prov, inputs, rmargin, device, reps=reps, warmup=warmup,
                                      budget_s=budget_s, rep_ms=rep_ms)
                    except DeviceLost:
                        device_lost = True
                        result.stop_reason = f"the device failed during {n} at C={cfg.C}"
                    if n == FLOOR:
                        floor_cache[floor_key] = row
                if row.status == "error":
                    note(f"error {n} C={cfg.C}: {row.note}")
                elif row.status == "oom":
                    note(f"oom {n} B={cfg.B} D={cfg.D} C={cfg.C} {row.dtype}: recorded as an oom row")
                fl = floor_cache.get(floor_key)
                row.floor_ms = fl.ms_median if fl is not None else math.nan
                emit(row)
                bar.update(1)
            del inputs
            if not device_lost:
                _cleanup(device)
    finally:
        bar.close()

    header["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    _write_json(result, result.json_path, header)
    if not result.rows:
        write_csv(result.rows, out)
    if result.plot_path is not None:
        try:
            from marginkit.bench.plot import plot_rows

            plot_rows(result.rows, result.plot_path, title=f"marginkit bench, {label}, {date}")
        except Exception as exc:  # a plot must not cost the measurements
            echo(f"plot not written ({type(exc).__name__}: {exc})")
            result.plot_path = None
    echo("")
    echo(format_table(result.rows))
    echo("")
    echo("TFLOP/s counts the floor's 6·B·D·C flops; floor/ms = floor_ms / ms (1.00 = at the three-GEMM floor).")
    for r in result.rows:
        if r.method == "torch-compile" and r.status == "ok":
            echo(f"torch-compile first call (compile + one step) at B={r.B} D={r.D} C={r.C}: {r.first_call_s:.1f} s")
    echo(f"wrote {out}" + (f", {result.plot_path}" if result.plot_path else "") + f", {result.json_path}")
    if result.not_run:
        echo(f"{result.stop_reason}: {len(result.not_run)} run(s) not started: " + "; ".join(result.not_run))
    if result.errors:
        echo(f"{result.errors} measurement(s) raised errors (rows marked 'error'); see above")
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _copy_floor(src: Row, row: Row) -> Row:
    for f in ("ms_median", "ms_p20", "ms_p80", "peak_extra_mib", "status", "note", "first_call_s", "reps", "timer"):
        setattr(row, f, getattr(src, f))
    return row


def _measure_into(row: Row, prov, inputs: Inputs, rmargin: str, device: str, **timing) -> None:
    case = None
    failure = None
    try:
        spec = make_spec(rmargin)
        case = prov.build(inputs, spec)
        m = measure(case, device, **timing)
        row.ms_median, row.ms_p20, row.ms_p80 = m.ms_median, m.ms_p20, m.ms_p80
        row.peak_extra_mib, row.first_call_s, row.reps, row.timer = m.peak_extra_mib, m.first_call_s, m.reps, m.timer
        row.note = case.note
    except Exception as exc:
        failure = ("oom" if is_oom(exc) else "error", f"{type(exc).__name__}: {_first_line(exc)}")
    finally:
        if case is not None:
            for p in case.params:
                p.grad = None
        case = None
    lost = False
    try:
        _cleanup(device)
    except Exception as exc:  # the synchronize after the run fails: the context is gone
        lost = True
        failure = ("error", f"device failed, sweep stopped ({type(exc).__name__}: {_first_line(exc)})")
    if failure:
        row.status, row.note = failure
        row.ms_median = row.ms_p20 = row.ms_p80 = row.peak_extra_mib = math.nan
    if lost:
        raise DeviceLost(row.note)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("what to run")
    g.add_argument("--device", default="auto", help="auto (CUDA if present, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--C", "-C", default=None,
                   help="classes, comma list (GPU 100K,1M,4M,10M; CPU 1K,10K,100K); K/M suffixes and 1e6 work")
    g.add_argument("--B", "-B", default=None, help="batch rows, comma list (GPU 1024, CPU 64)")
    g.add_argument("--D", "-D", default=None, help="embedding dim, comma list (GPU 512, CPU 64)")
    g.add_argument("--dtype", default=None, help="bf16, fp16, fp32, comma list (GPU bf16, CPU fp32)")
    g.add_argument("--margin", default=None, help=f"comma list of {', '.join(MARGINS)} (default arcface)")
    g.add_argument("--scale", type=float, default=64.0, help="s (default 64)")
    g.add_argument("--providers", default=None,
                   help=f"comma list from {', '.join(METHODS)} (default: all; torch-compile only on CUDA)")
    g.add_argument("--skip", default=None, help="comma list of providers to leave out")
    g.add_argument("--compile", action="store_true", help="include torch-compile on CPU (opt-in: compiling is slow)")
    g.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("timing")
    t.add_argument("--reps", type=int, default=None,
                   help="fixed number of timed steps per run (default: do_bench on CUDA, a time budget on CPU)")
    t.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (default 1)")
    t.add_argument("--budget-s", type=float, default=None,
                   help="seconds of timed steps per run for slow steps and CPU (default 3 on CUDA, 1 on CPU)")
    t.add_argument("--rep-ms", type=float, default=100.0, help="do_bench's rep (ms of timed steps, default 100)")
    t.add_argument("--time-limit-s", type=float, default=None,
                   help="start no new run after this many seconds (the JSON lists those not run); default none")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="CSV path (default ./marginkit-bench-<device>-<date>.csv)")
    o.add_argument("--out-dir", default=None, help="write <out-dir>/<device-slug>-<date>.csv (+ .png, .json)")
    o.add_argument("--plot", default=None, help="PNG path (default: the CSV's path with .png)")
    o.add_argument("--no-plot", action="store_true", help="write no PNG")
    o.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def _split(v):
    return [s.strip() for s in v.split(",") if s.strip()] if v else None


def run_from_args(args: argparse.Namespace) -> int:
    try:
        device = resolve_device(args.device)
        out = args.out
        if out is None and args.out_dir:
            out = Path(args.out_dir) / f"{device_slug(device)}-{_dt.date.today().isoformat()}.csv"
        plot = False if args.no_plot else (args.plot or True)
        t0 = time.perf_counter()
        result = run_sweep(
            device=device, B=args.B, D=args.D, C=args.C, dtype=args.dtype, margin=args.margin, scale=args.scale,
            providers=_split(args.providers), skip=_split(args.skip), include_compile=args.compile,
            reps=args.reps, warmup=args.warmup, budget_s=args.budget_s, rep_ms=args.rep_ms, seed=args.seed,
            time_limit_s=args.time_limit_s,
            out=out, plot=plot, progress=not args.no_progress,
        )
    except ValueError as exc:
        print(f"marginkit bench: error: {exc}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 3 if result.errors else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="marginkit bench", description="Benchmark marginkit against its peers and the "
                                "three-GEMM floor (forward + backward per step).")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))
