"""Planning a sweep: from the options of ``marginkit bench`` to the list of cells to run.

:class:`SweepOptions` holds what a user asks for (sizes, providers, timing,
output); :func:`plan_sweep` checks it and resolves defaults into a
:class:`SweepPlan`: the device, the shapes, the providers that can run, the
output paths, and per shape the :class:`Cell` of each provider (or why it is
skipped). Running a cell is :mod:`marginkit.bench.cell`; writing the files is
:mod:`marginkit.bench.report`.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from marginkit.bench.config import (
    DEFAULTS,
    MARGINS,
    METHODS,
    BenchConfig,
    device_label,
    device_slug,
    dtype_name,
    parse_dtype,
    parse_sizes,
    resolve_device,
)
from marginkit.bench.providers import PROVIDERS

__all__ = ["FLOOR", "SweepOptions", "Cell", "SweepPlan", "plan_sweep", "select_providers", "split_list", "output_paths"]

FLOOR = "floor-3gemm"


def split_list(text) -> Optional[list]:
    """'a, b,,c' -> ['a', 'b', 'c']; None or '' -> None (the flag was not given)."""
    if text is None or isinstance(text, (list, tuple)):
        return list(text) if text else None
    return [s.strip() for s in str(text).split(",") if s.strip()] or None


@dataclass(frozen=True)
class SweepOptions:
    """What to run and how; None means the device's default (``config.DEFAULTS``)."""

    device: str = "auto"
    B: object = None  # sizes: an int, a list, or text such as "64,128" / "100K,1M"
    D: object = None
    C: object = None
    dtype: object = None  # "bf16,fp32", a torch.dtype or a list of either
    margin: object = None  # "arcface,cosface" or a list
    scale: float = 64.0
    providers: object = None  # names (list or comma text); None: every provider for the device (empty: error)
    skip: object = None
    include_compile: bool = False
    reps: Optional[int] = None
    warmup: int = 1
    budget_s: Optional[float] = None
    rep_ms: float = 100.0
    seed: int = 0
    time_limit_s: Optional[float] = None
    out: object = None  # CSV path; None: ./marginkit-bench-<device>-<date>.csv
    plot: object = True  # True: the CSV's path with .png; False/None: no plot; else a path
    progress: bool = True


@dataclass
class Cell:
    """One provider at one shape: run it, or say why not (``skip``; ``quiet``: not worth a line)."""

    cfg: BenchConfig
    method: str
    margin: str  # the margin of the row (a no-margin peer's is "none")
    skip: Optional[str] = None
    recorded: Optional[tuple] = None  # (key, reason) for the JSON's `skipped`: a shape past a provider's limit
    quiet: bool = False  # no line for it: the same run was already planned (no-margin peers)


@dataclass
class SweepPlan:
    device: str
    label: str  # the CSV's device column
    date: str
    configs: list
    providers: list  # runnable provider names, the floor first (every row's floor_ms comes from it)
    unavailable: dict  # provider -> why it cannot run here (package absent)
    timing: dict  # measure()'s keywords: reps, warmup, budget_s, rep_ms
    seed: int
    time_limit_s: Optional[float]
    csv_path: Path
    json_path: Path
    plot_path: Optional[Path]
    progress: bool
    sweep: dict = field(default_factory=dict)  # the resolved sweep, for the JSON and the banner

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def cells(self, cfg: BenchConfig, planned: set) -> list:
        """The cells of one shape; ``planned`` (method, shape, margin) keys are shared across shapes."""
        out = []
        for name in self.providers:
            prov = PROVIDERS[name]
            cell = Cell(cfg, name, prov.row_margin(cfg.margin))
            reason = prov.unsupported(self.device, cfg.margin)
            if reason:
                cell.skip = f"skip {name} ({cfg.margin}, {self.device}): {reason}"
            elif prov.too_large(cfg):
                shape = f"B={cfg.B} D={cfg.D} C={cfg.C}"
                cell.skip = f"skip {name} at {shape}: {prov.too_large(cfg)}"
                cell.recorded = (f"{name} {shape}", prov.too_large(cfg))
            else:
                key = (name, cfg.B, cfg.D, cfg.C, cfg.dtype, cell.margin)
                if key in planned and name != FLOOR:  # the floor is a column of every margin's rows
                    cell.skip, cell.quiet = "already run at this shape", True
                planned.add(key)
            out.append(cell)
        return out


def select_providers(names, skip, device: str, include_compile: bool) -> list:
    """Provider names to run, floor included, in METHODS order."""
    cuda = device.startswith("cuda")
    if names:
        chosen = []
        for n in names:
            if n not in PROVIDERS:
                raise ValueError(f"--providers: unknown provider {n!r}; choose from {', '.join(PROVIDERS)}")
            chosen.append(n)
    else:
        chosen = [n for n, p in PROVIDERS.items()
                  if cuda or (p.default_on_cpu and not p.cuda_only) or (n == "torch-compile" and include_compile)]
    if include_compile and "torch-compile" not in chosen:
        chosen.append("torch-compile")
    for n in skip or ():
        if n not in PROVIDERS:
            raise ValueError(f"--skip: unknown provider {n!r}; choose from {', '.join(PROVIDERS)}")
        if n == FLOOR:  # it would be added back below: say so rather than ignore the flag
            raise ValueError(f"--skip: {FLOOR} always runs (every row's floor_ms column is its time)")
    chosen = [n for n in chosen if n not in set(skip or ())]
    if FLOOR not in chosen:
        chosen.append(FLOOR)  # floor_ms is a column of every row
    order = list(METHODS) + [n for n in PROVIDERS if n not in METHODS]  # providers added later go last
    return [n for n in order if n in chosen]


def check_writable(path: Path) -> None:
    """ValueError now, before any timing, if the CSV cannot be written at ``path`` (its directory,
    created here if missing, also takes the .json and the default .png)."""
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; give a file path (or use --out-dir {path})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the output directory {path.parent} ({exc.strerror or exc}); "
                         "choose another --out / --out-dir") from None
    probe = path.with_name(path.name + ".tmp")  # the name the CSV is first written under
    try:
        probe.open("w").close()
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write {path} ({exc.strerror or exc}); choose another --out / --out-dir") from None


def _given_list(value, flag: str) -> Optional[list]:
    """None (not given) -> None; a list or comma text -> its items, ValueError naming ``flag`` if none."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else split_list(value)
    if not items:  # `--dtype ""` would otherwise plan nothing, or fall back to the default unasked
        raise ValueError(f"{flag}: empty list {value!r}; give at least one value or leave the flag out")
    return items


def _dtypes(value, default) -> list:
    items = _given_list(value, "--dtype")
    try:
        return list(dict.fromkeys(parse_dtype(t) for t in (default if items is None else items)))
    except ValueError as exc:
        raise ValueError(f"--dtype: {exc}") from None


def _sizes(value, default, flag: str) -> list:
    """Distinct sizes in the order given (a repeated size would repeat every row)."""
    return list(dict.fromkeys(parse_sizes(value, flag) if value is not None else default))


def output_paths(out: Path, plot) -> tuple:
    """(csv, json, png or None) for ``--out`` and ``--plot`` (True: beside the CSV); ValueError if any
    two would be the same file (``--out r.png`` wrote the CSV, then the plot over it)."""
    if out.suffix.lower() in (".json", ".png"):
        raise ValueError(f"--out {out} names the CSV, but ends in {out.suffix} (the JSON sidecar and the plot are "
                         f"written beside it with .json and .png): give a .csv path such as {out.with_suffix('.csv')}")
    json_path = out.with_suffix(".json")
    plot_path = out.with_suffix(".png") if plot is True else (Path(plot) if plot else None)
    if plot_path is not None and plot_path.resolve() in (out.resolve(), json_path.resolve()):
        raise ValueError(f"--plot {plot_path} is the CSV or the JSON sidecar of --out {out}; give another PNG path")
    return out, json_path, plot_path


def plan_sweep(options: SweepOptions) -> SweepPlan:
    """Check ``options`` and resolve them into a plan (raises ValueError naming the bad option)."""
    device = resolve_device(options.device)
    cuda = device.startswith("cuda")
    default = DEFAULTS["cuda" if cuda else "cpu"]
    Bs = _sizes(options.B, default["B"], "--B")
    Ds = _sizes(options.D, default["D"], "--D")
    Cs = _sizes(options.C, default["C"], "--C")
    dtypes = _dtypes(options.dtype, default["dtype"])
    margins = list(dict.fromkeys(_given_list(options.margin, "--margin") or default["margin"]))
    for m in margins:
        if m not in MARGINS:
            raise ValueError(f"--margin: unknown margin {m!r}; use one of {', '.join(MARGINS)}")
    if not (0 < options.scale < math.inf):  # inf passed here, then failed every marginkit row
        raise ValueError(f"--scale must be finite and > 0, got {options.scale}")
    if options.reps is not None and options.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {options.reps}")
    if options.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {options.warmup}")
    for flag, value in (("--budget-s", options.budget_s), ("--rep-ms", options.rep_ms)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    if options.time_limit_s is not None and not options.time_limit_s >= 0:
        raise ValueError(f"--time-limit-s must be >= 0, got {options.time_limit_s}")
    names = select_providers(_given_list(options.providers, "--providers"), split_list(options.skip), device,
                             options.include_compile)
    unavailable = {n: PROVIDERS[n].unavailable() for n in names}
    unavailable = {n: why for n, why in unavailable.items() if why}
    runnable = sorted((n for n in names if n not in unavailable), key=lambda n: n != FLOOR)

    date = _dt.date.today().isoformat()
    out = Path(options.out) if options.out is not None else Path(f"marginkit-bench-{device_slug(device)}-{date}.csv")
    out, json_path, plot = output_paths(out, options.plot)
    check_writable(out)
    budget_s = options.budget_s if options.budget_s is not None else (3.0 if cuda else 1.0)
    # C in the order given: a time-boxed run can put its headline size first
    configs = [BenchConfig(device=device, B=B, D=D, C=C, dtype=dtype, margin=margin, scale=options.scale)
               for margin, dtype, B, D in itertools.product(margins, dtypes, Bs, Ds) for C in Cs]
    return SweepPlan(
        device=device, label=device_label(device), date=date, configs=configs, providers=runnable,
        unavailable=unavailable,
        timing=dict(reps=options.reps, warmup=options.warmup, budget_s=budget_s, rep_ms=options.rep_ms),
        seed=options.seed, time_limit_s=options.time_limit_s, csv_path=out, json_path=json_path,
        plot_path=plot, progress=options.progress,
        sweep={"B": Bs, "D": Ds, "C": Cs, "dtype": [dtype_name(t) for t in dtypes], "margin": margins,
               "scale": options.scale, "providers": names, "seed": options.seed},
    )
