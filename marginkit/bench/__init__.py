"""marginkit's benchmark suite: ``marginkit bench`` and ``pytest benchmarks --benchmark-only``.

One runner (:mod:`marginkit.bench.runner`) serves both; providers live in
:mod:`marginkit.bench.providers`, timing in :mod:`marginkit.bench.timing`.
"""

from marginkit.bench.config import CSV_COLUMNS, DEFAULTS, MARGINS, METHODS, BenchConfig
from marginkit.bench.providers import PROVIDERS, Case, Inputs, get_provider, make_inputs
from marginkit.bench.runner import BenchResult, Row, add_arguments, main, run_from_args, run_sweep
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
    "Row",
    "add_arguments",
    "main",
    "run_from_args",
    "run_sweep",
    "Measurement",
    "measure",
]
