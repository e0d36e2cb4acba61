"""The opt-in study: every (skew, seed) cell of the demo in parallel processes, results as CSV rows."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from typing import Callable, List, Sequence

import torch

from .data import DataConfig, make_dataset
from .fair_paper import offline_phase
from .heads import PAPER_METHODS, TrainConfig
from .train import train_one

__all__ = ["SKEWS", "skew_config", "run_cell", "run_study"]

# Zipf exponents of the study; "balanced" is the control: every class the size of the
# Zipf-0.75 set's mean class (3962 samples / 300 classes ≈ 13), so totals are alike.
SKEWS = ("balanced", "0.5", "0.75", "1.0")
BALANCED_PER_CLASS = 13


def skew_config(base: DataConfig, skew: str, seed: int) -> DataConfig:
    if skew == "balanced":
        return replace(base, zipf_exponent=0.0, max_per_class=BALANCED_PER_CLASS, seed=seed)
    return replace(base, zipf_exponent=float(skew), seed=seed)


def run_cell(skew: str, seed: int, methods: Sequence[str], data_cfg: DataConfig, train_cfg: TrainConfig) -> List[dict]:
    """Train every method on one (skew, seed) dataset; one thread (cells run side by side)."""
    torch.set_num_threads(1)
    data = make_dataset(skew_config(data_cfg, skew, seed))
    cfg = replace(train_cfg, seed=seed)
    paper = offline_phase(data, cfg) if any(m in PAPER_METHODS for m in methods) else None
    rows = []
    for m in methods:
        row = train_one(m, data, cfg, progress=False, paper=paper)
        row.update(skew=skew, seed=seed)
        rows.append(row)
    return rows


def run_study(skews: Sequence[str], seeds: Sequence[int], methods: Sequence[str], data_cfg: DataConfig,
              train_cfg: TrainConfig, jobs: int, on_cell: Callable[[List[dict]], None]) -> List[dict]:
    """All cells, ``jobs`` processes at a time (the largest datasets first); ``on_cell`` sees each
    finished cell's rows (to save partial results). Rows come back seed by seed."""
    cells = [(k, s) for k in skews for s in seeds]
    size = {k: int(make_dataset(replace(skew_config(data_cfg, k, 0), open_classes=1)).class_counts.sum()) for k in skews}
    cells.sort(key=lambda c: (seeds.index(c[1]), -size[c[0]]))  # whole seeds first (a cut-short study stays usable)
    results = {}
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as pool:
        futures = {pool.submit(run_cell, k, s, tuple(methods), data_cfg, train_cfg): (k, s) for k, s in cells}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            on_cell(results[futures[fut]])
    return [row for cell in cells for row in results[cell]]
