"""``marginkit demo`` / ``python -m examples.long_tail``: margin losses on a long-tailed identity set.

Trains the same small embedding MLP with each loss on a synthetic long-tailed identity
dataset (``data.py``: Zipf class sizes, identities as clusters on a sphere seen through a
frozen random non-linear map), then evaluates open-set verification on unseen identities
(TAR at FAR 1e-3 and 1e-2) and closed-set accuracy per third of the classes by size (head,
middle, tail), the head − tail gap and the spread of per-class accuracy; for heads with
per-class margins, the final margins per third.

The default run (2 seeds, 6 losses) takes about 40 s on one CPU core (longer on a busy machine). ``--study`` runs the longer opt-in
study (seeds × Zipf skews plus a balanced control, cells in parallel processes) that
answers whether Fair Loss's margins fall with class size and whether it beats the
frequency-scheduled CosFace. ``--tiny`` is a seconds-long smoke version.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import List, Optional

import torch

from .data import DataConfig, make_dataset
from .fair_paper import offline_phase
from .heads import DEFAULT_METHODS, METHODS, PAPER_METHODS, STUDY_METHODS, TrainConfig
from .report import (aggregate, format_gains, format_margins, format_table, paired_gains, read_rows, skew_order,
                     write_plot, write_rows, write_study_plot)
from .study import SKEWS, run_study
from .train import train_one

__all__ = ["main", "build_parser", "DEFAULT_DATA", "TINY_DATA", "TINY_TRAIN"]

DEFAULT_DATA = DataConfig()
TINY_DATA = DataConfig(num_classes=40, max_per_class=30, zipf_exponent=0.8, test_per_class=2, open_classes=20,
                       open_per_class=4)
TINY_TRAIN = TrainConfig(embedding_dim=16, hidden=64, epochs=2, batch_size=64, fair_update_every=3,
                         fair_pretrain_epochs=1, fair_finetune_epochs=1)
REFERENCE = "cosface-freq"  # the schedule Fair Loss has to beat
STUDY_JOBS = 2  # study processes by default: the 2 cores of CI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="marginkit demo",
        description="Train a small embedding network on a synthetic long-tailed identity set with several margin "
        "losses; report open-set TAR@FAR, head/middle/tail accuracy, the head-tail gap and Fair Loss's margins.",
    )
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, or 'all'. Known: {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)}; "
                   f"with --study: {','.join(STUDY_METHODS)})")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1; with --study: 0,1,2,3,4)")
    p.add_argument("--study", action="store_true",
                   help="the long opt-in study: every seed at every skew of --skews, cells in --jobs processes")
    p.add_argument("--skews", default=None,
                   help=f"with --study: Zipf exponents and/or 'balanced' (default: {','.join(SKEWS)})")
    p.add_argument("--jobs", type=int, default=None, help=f"with --study: processes (default: {STUDY_JOBS})")
    p.add_argument("--from-csv", default=None, metavar="CSV",
                   help="with --study: train nothing, report (tables, plot) from a study CSV written earlier")
    p.add_argument("--classes", type=int, default=None, help="training identities, at least 3 (default 300)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per method, at least 1 (default 30)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of a plain run, at least 1 (default 1: the model is small); not with "
                        "--study (each study cell uses one thread, set --jobs)")
    p.add_argument("--csv", default=None, help="results CSV (default: demo_results.csv; with --study: demo_study.csv)")
    p.add_argument("--plot", default=None, help="PNG plot (default: demo_results.png; with --study: demo_study.png)")
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke version (tiny data, 2 epochs, seed 0)")
    return p


def _check_args(args) -> None:
    """ValueError naming the flag, before any training, for a value the run would ignore or fail on late."""
    if not args.study:  # these flags only mean something to the study: say so rather than ignore them
        for flag, value in (("--skews", args.skews), ("--jobs", args.jobs), ("--from-csv", args.from_csv)):
            if value is not None:
                raise ValueError(f"{flag} applies only with --study")
    elif args.threads is not None:
        raise ValueError("--threads applies only without --study (each study cell uses one thread; set --jobs)")
    for flag, value, least in (("--epochs", args.epochs, 1), ("--classes", args.classes, 3),
                               ("--jobs", args.jobs, 1), ("--threads", args.threads, 1)):
        if value is not None and value < least:  # the thirds of the report need 3 classes
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if args.from_csv is not None and not os.path.isfile(args.from_csv):
        raise ValueError(f"--from-csv {args.from_csv}: no such file (a CSV an earlier --study run wrote)")
    csv_path, plot_path = output_paths(args)
    outputs = ([] if args.from_csv else [("--csv", csv_path)]) + ([] if args.no_plot else [("--plot", plot_path)])
    for flag, path in outputs:
        _check_writable(flag, path)


def output_paths(args) -> tuple:
    """(results CSV, plot PNG) of a run, defaults filled in."""
    if args.study:
        return args.csv or "demo_study.csv", args.plot or "demo_study.png"
    return args.csv or "demo_results.csv", args.plot or "demo_results.png"


def _check_writable(flag: str, path: str) -> None:
    """ValueError now if ``path`` cannot be written (it used to fail only after all the training)."""
    existed = os.path.exists(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot write it ({exc.strerror or exc}); choose another path") from None
    if not existed:
        os.remove(path)


def _parse(args) -> tuple[tuple, List[int], List[str]]:
    _check_args(args)
    default_methods = STUDY_METHODS if args.study else DEFAULT_METHODS
    spec = args.methods or ",".join(default_methods)
    methods = METHODS if spec.strip() == "all" else tuple(m.strip() for m in spec.split(",") if m.strip())
    if not methods:
        raise ValueError(f"--methods: no method in {args.methods!r}; known: {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if args.study and REFERENCE not in methods:
        raise ValueError(f"--study compares against {REFERENCE}: include it in --methods")
    default_seeds = "0" if args.tiny else ("0,1,2,3,4" if args.study else "0,1")
    try:
        seeds = [int(v) for v in (default_seeds if args.seeds is None else args.seeds).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise ValueError(f"--seeds: no seed in {args.seeds!r}")
    skews = [k.strip() for k in (",".join(SKEWS) if args.skews is None else args.skews).split(",") if k.strip()]
    if not skews:
        raise ValueError(f"--skews: no skew in {args.skews!r}")
    for k in skews:
        if k != "balanced":
            try:
                float(k)
            except ValueError:
                raise ValueError(f"--skews entries must be Zipf exponents or 'balanced', got {k!r}") from None
    return methods, seeds, skews


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        methods, seeds, skews = _parse(args)
    except ValueError as err:
        print(f"marginkit demo: error: {err}", file=sys.stderr)
        return 2
    data_cfg, train_cfg = (TINY_DATA, TINY_TRAIN) if args.tiny else (DEFAULT_DATA, TrainConfig())
    if args.classes is not None:
        data_cfg = replace(data_cfg, num_classes=args.classes)
    if args.epochs is not None:
        train_cfg = replace(train_cfg, epochs=args.epochs)
    if args.study:
        return _study(args, methods, seeds, skews, data_cfg, train_cfg)
    csv_path, plot_path = output_paths(args)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)
    try:
        t0 = time.perf_counter()
        rows = []
        for seed in seeds:
            data = make_dataset(replace(data_cfg, seed=seed))
            _describe(data, data_cfg, seed)
            cfg = replace(train_cfg, seed=seed)
            paper = offline_phase(data, cfg) if any(m in PAPER_METHODS for m in methods) else None
            if paper is not None:
                print(f"  Fair Loss offline phase: {paper['finetunes']} sample networks, {paper['seconds']:.1f} s", flush=True)
            for m in methods:
                row = train_one(m, data, cfg, progress=not args.no_progress, paper=paper)
                row.update(seed=seed, skew=str(data_cfg.zipf_exponent))
                rows.append(row)
        total = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous_threads)
    summary = aggregate(rows)
    print(format_table(summary))
    print()
    print(format_margins(summary))
    print(f"total time {total:.1f} s ({len(seeds)} seed(s) x {len(methods)} methods)")
    write_rows(rows, csv_path)
    print(f"wrote {csv_path}")
    if not args.no_plot:
        write_plot(summary, plot_path, f"long-tailed synthetic identities, Zipf {data_cfg.zipf_exponent}, "
                   f"mean over seeds {','.join(map(str, seeds))}")
        print(f"wrote {plot_path}")
    return 0


def _describe(data, data_cfg: DataConfig, seed: int) -> None:
    s = data.summary()
    counts = data.class_counts.sort(descending=True).values
    third = counts.numel() // 3
    print(f"seed {seed}: {s['classes']} training identities, {s['train_samples']} samples (Zipf exponent "
          f"{data_cfg.zipf_exponent}, largest class {s['largest_class']}; head third n >= {int(counts[third - 1])}, "
          f"tail third n <= {int(counts[-third])}); open set: {s['open_identities']} unseen identities x "
          f"{data_cfg.open_per_class}; torch threads: {torch.get_num_threads()}", flush=True)


def _study(args, methods, seeds, skews, data_cfg, train_cfg) -> int:
    csv_path, plot_path = output_paths(args)
    t0 = time.perf_counter()
    done: List[dict] = []

    def on_cell(rows):  # partial results survive an interrupted study
        done.extend(rows)
        write_rows(done, csv_path)
        print(f"  cell zipf {rows[0]['skew']} seed {rows[0]['seed']} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    if args.from_csv:
        rows = read_rows(args.from_csv)
        skews = skew_order(r["skew"] for r in rows)
    else:
        jobs = args.jobs or STUDY_JOBS
        print(f"study: skews {', '.join(skews)} x seeds {', '.join(map(str, seeds))} x {len(methods)} methods, "
              f"{jobs} processes", flush=True)
        rows = run_study(skews, seeds, methods, data_cfg, train_cfg, jobs, on_cell)
        write_rows(rows, csv_path)
    summary = aggregate(rows)
    order = skew_order(r["skew"] for r in rows)
    gains = sorted(paired_gains(rows, REFERENCE), key=lambda g: order.index(g["skew"]))
    for skew in skews:
        print(f"\n### {'Balanced control' if skew == 'balanced' else f'Zipf {skew}'}\n")
        print(format_table([r for r in summary if r["skew"] == skew]))
        print()
        print(format_margins([r for r in summary if r["skew"] == skew]))
    print()
    print(format_gains(gains, REFERENCE))
    if not args.from_csv:
        print(f"\ntotal time {time.perf_counter() - t0:.1f} s; wrote {csv_path}")
    if not args.no_plot:
        write_study_plot(summary, gains, REFERENCE, plot_path)
        print(f"wrote {plot_path}")
    return 0
