"""marginkit's benchmark suite: ``marginkit bench`` and ``pytest benchmarks --benchmark-only``.

A sweep is planned (:mod:`~marginkit.bench.plan`), run one cell at a time
(:mod:`~marginkit.bench.cell`: the float64 check of :mod:`~marginkit.bench.check`,
then :mod:`~marginkit.bench.timing` and, on the CPU, :mod:`~marginkit.bench.memory`),
and reported (:mod:`~marginkit.bench.report`, :mod:`~marginkit.bench.plot`);
:mod:`~marginkit.bench.runner` walks the plan. Providers live in
:mod:`marginkit.bench.providers`.
"""

from marginkit.bench.config import CSV_COLUMNS, DEFAULTS, MARGINS, METHODS, BenchConfig
from marginkit.bench.providers import PROVIDERS, Case, Inputs, get_provider, make_inputs
from marginkit.bench.runner import BenchResult, Row, SweepOptions, add_arguments, main, run_from_args, run_sweep
from marginkit.bench.timing import Measurement, measure

__all__ = [
    "CSV_COLUMNS",
    "DEFAULTS",
    "MARGINS",
    "METHODS",
    "BenchConfig",
    "PROVIDERS",
    "Case",
    "Inputs",
    "get_provider",
    "make_inputs",
    "BenchResult",
    "SweepOptions",
    "Row",
    "add_arguments",
    "main",
    "run_from_args",
    "run_sweep",
    "Measurement",
    "measure",
]
