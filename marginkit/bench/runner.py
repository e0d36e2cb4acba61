"""The benchmark runner behind ``marginkit bench`` (and the pytest-benchmark suite).

A sweep is planned (:mod:`marginkit.bench.plan`: shapes × providers from a
:class:`SweepOptions`), run one cell at a time (:mod:`marginkit.bench.cell`:
float64 check of marginkit's rows, then time and peak extra memory), and
reported (:mod:`marginkit.bench.report`: CSV in API.md's schema, written after
every row so a sweep cut short keeps its finished rows; JSON sidecar; PNG;
table). This module only walks the plan: one set of random inputs per shape,
the floor first, the time limit, and a device that stops working.

A run that raises an out-of-memory error is a row, not a gap: ``nan`` times and
``oom`` in ``peak_extra_mib``. Any other exception, or a failed float64 check,
is a row with ``error`` there and the exit status is 3.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
import time
from pathlib import Path

from marginkit.bench.cell import DeviceLost, cleanup, copy_measurement, is_oom, make_cell_inputs, new_row, run_cell
from marginkit.bench.config import MARGINS, METHODS, device_slug, dtype_name, resolve_device
from marginkit.bench.plan import FLOOR, SweepOptions, SweepPlan, plan_sweep, select_providers, split_list
from marginkit.bench.records import BenchResult, Row
from marginkit.bench.report import banner_lines, json_header, write_csv, write_reports

__all__ = ["Row", "BenchResult", "SweepOptions", "FLOOR", "add_arguments", "run_sweep", "run_plan",
           "run_from_args", "main", "select_providers", "is_oom", "write_csv"]


class _Sweep:
    """The state of one sweep while it runs: the result so far, the floor per shape, the progress bar."""

    def __init__(self, plan: SweepPlan, echo):
        from tqdm.auto import tqdm

        self.plan = plan
        self.echo = echo
        self.result = BenchResult(csv_path=plan.csv_path, json_path=plan.json_path, plot_path=plan.plot_path,
                                  skipped=dict(plan.unavailable))
        self.floors = {}  # (B, D, C, dtype) -> the floor's row
        self.device_lost = False
        self.told = set()
        self.started = time.perf_counter()
        self.bar = tqdm(total=len(plan.configs) * len(plan.providers), desc=f"bench {plan.label}", unit="run",
                        disable=not plan.progress, file=sys.stderr, dynamic_ncols=True)

    def note(self, msg: str) -> None:
        if msg not in self.told:
            self.told.add(msg)
            (self.bar.write if self.plan.progress else self.echo)(msg)

    def emit(self, row: Row) -> None:
        self.result.rows.append(row)
        if row.status == "error":
            self.result.errors += 1
            self.note(f"error {row.method} C={row.C}: {row.note}")
        elif row.status == "oom":
            self.note(f"oom {row.method} B={row.B} D={row.D} C={row.C} {row.dtype}: recorded as an oom row")
        write_csv(self.result.rows, self.plan.csv_path)

    def stopped(self) -> bool:
        limit, result = self.plan.time_limit_s, self.result
        if result.stop_reason is None and limit is not None and time.perf_counter() - self.started > limit:
            result.stop_reason = f"time limit of {limit:g} s reached"
        if result.stop_reason is not None:
            self.note(f"{result.stop_reason}: runs from here on are not started (listed under not_run in the JSON)")
        return result.stop_reason is not None

    def run_shape(self, cfg, planned: set) -> None:
        inputs, input_failure = (None, None) if self.device_lost else make_cell_inputs(cfg, self.plan.seed)
        for cell in self.plan.cells(cfg, planned):
            self.bar.set_postfix_str(f"{cell.method} C={cfg.C}")
            self._run_one(cell, inputs, input_failure)
            self.bar.update(1)  # after the run: the bar counts runs finished, not started
        del inputs
        if not self.device_lost:
            cleanup(cfg.device)

    def _run_one(self, cell, inputs, input_failure) -> None:
        """One cell: skipped, not started (time limit, lost device), or run and emitted as a row."""
        cfg = cell.cfg
        floor_key = (cfg.B, cfg.D, cfg.C, cfg.dtype)
        if cell.skip:
            if cell.recorded:
                self.result.skipped[cell.recorded[0]] = cell.recorded[1]
            if not cell.quiet:
                self.note(cell.skip)
            return
        if self.stopped():
            self.result.not_run.append(f"{cell.method} B={cfg.B} D={cfg.D} C={cfg.C} "
                                       f"{dtype_name(cfg.dtype)} {cell.margin}")
            return
        row = new_row(cell, self.plan.label, self.plan.date)
        if input_failure:
            row.status, row.note = input_failure
        elif cell.method == FLOOR and floor_key in self.floors:
            copy_measurement(self.floors[floor_key], row)
        else:
            try:
                run_cell(cell, row, inputs, self.plan.timing)
            except DeviceLost:
                self.device_lost = True
                self.result.stop_reason = f"the device failed during {cell.method} at C={cfg.C}"
            if cell.method == FLOOR:
                self.floors[floor_key] = row
        floor = self.floors.get(floor_key)
        row.floor_ms = floor.ms_median if floor is not None else math.nan
        self.emit(row)


def run_plan(plan: SweepPlan, echo=print) -> BenchResult:
    """Run every cell of ``plan``, then write its reports."""
    for line in banner_lines(plan):
        echo(line)
    header = json_header(plan)
    sweep = _Sweep(plan, echo)
    planned = set()  # (method, shape, margin): no-margin peers run once per shape
    try:
        for cfg in plan.configs:
            sweep.run_shape(cfg, planned)
    finally:
        sweep.bar.close()
    write_reports(sweep.result, plan, header, echo)
    return sweep.result


def run_sweep(options: SweepOptions = None, *, echo=print, **keywords) -> BenchResult:
    """Plan and run a sweep: ``run_sweep(SweepOptions(...))`` or ``run_sweep(C="100K,1M", ...)``
    with :class:`SweepOptions`' fields as keywords. Sizes default to ``config.DEFAULTS[cpu|cuda]``."""
    if options is None:
        options = SweepOptions(**keywords)
    elif keywords:
        raise TypeError(f"run_sweep: pass options or keywords, not both (got {sorted(keywords)})")
    return run_plan(plan_sweep(options), echo=echo)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("what to run")
    g.add_argument("--device", default="auto", help="auto (CUDA if present, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--C", "-C", default=None,
                   help="classes, comma list (GPU 100K,1M,4M,10M; CPU 1K,100K,1M); K/M suffixes and 1e6 work")
    g.add_argument("--B", "-B", default=None, help="batch rows, comma list (GPU 1024, CPU 64)")
    g.add_argument("--D", "-D", default=None, help="embedding dim, comma list (GPU 512, CPU 64)")
    g.add_argument("--dtype", default=None, help="bf16, fp16, fp32, comma list (GPU bf16, CPU fp32)")
    g.add_argument("--margin", default=None, help=f"comma list of {', '.join(MARGINS)} (default arcface)")
    g.add_argument("--scale", type=float, default=64.0, help="s (default 64)")
    g.add_argument("--providers", default=None,
                   help=f"comma list from {', '.join(METHODS)} (default: all on CUDA; on CPU all but "
                        "torch-compile, marginkit-torch and the CUDA-only peers)")
    g.add_argument("--skip", default=None,
                   help="comma list of providers to leave out (not floor-3gemm: it always runs, every row's floor_ms)")
    g.add_argument("--compile", action="store_true", help="include torch-compile on CPU (opt-in: compiling is slow)")
    g.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("timing")
    t.add_argument("--reps", type=int, default=None,
                   help="fixed number of timed steps per run (default: do_bench on CUDA, a time budget on CPU)")
    t.add_argument("--warmup", type=int, default=1,
                   help="untimed steps before timing (default 1); the first call (which measures memory and "
                        "first-call time) always runs, so 0 and 1 both run one untimed step")
    t.add_argument("--budget-s", type=float, default=None,
                   help="seconds of timed steps per run for slow steps and CPU (default 3 on CUDA, 1 on CPU), "
                        "at most 50 timed steps whatever the budget (use --reps for more)")
    t.add_argument("--rep-ms", type=float, default=100.0, help="do_bench's rep (ms of timed steps, default 100)")
    t.add_argument("--time-limit-s", type=float, default=None,
                   help="start no new run after this many seconds (the JSON lists those not run); default none")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None,
                   help="CSV path (default ./marginkit-bench-<device>-<date>.csv); the .json sidecar and the .png go "
                        "beside it with its suffix replaced, so a path ending in .json or .png is an error")
    o.add_argument("--out-dir", default=None,
                   help="write <out-dir>/<device-slug>-<date>.csv (+ .png, .json); not with --out")
    o.add_argument("--plot", default=None, help="PNG path (default: the CSV's path with .png)")
    o.add_argument("--no-plot", action="store_true", help="write no PNG")
    o.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def options_from_args(args: argparse.Namespace) -> SweepOptions:
    device = resolve_device(args.device)
    out = args.out
    if out is not None and args.out_dir is not None:  # --out used to win silently
        raise ValueError("give --out (the CSV path) or --out-dir (a folder, file named by device and date), not both")
    if out is None and args.out_dir:
        out = Path(args.out_dir) / f"{device_slug(device)}-{_dt.date.today().isoformat()}.csv"
    return SweepOptions(
        device=device, B=args.B, D=args.D, C=args.C, dtype=args.dtype, margin=args.margin, scale=args.scale,
        providers=args.providers, skip=split_list(args.skip), include_compile=args.compile,
        reps=args.reps, warmup=args.warmup, budget_s=args.budget_s, rep_ms=args.rep_ms, seed=args.seed,
        time_limit_s=args.time_limit_s, out=out, plot=False if args.no_plot else (args.plot or True),
        progress=not args.no_progress,
    )


def run_from_args(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        plan = plan_sweep(options_from_args(args))
    except ValueError as exc:
        print(f"marginkit bench: error: {exc}", file=sys.stderr)
        return 2
    result = run_plan(plan)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 3 if result.errors else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="marginkit bench", description="Benchmark marginkit against its peers and the "
                                "three-GEMM floor (forward + backward per step).")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))
