"""Names, defaults and parsing shared by the CLI and the pytest-benchmark suite."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = [
    "CSV_COLUMNS",
    "METHODS",
    "MARGINS",
    "DTYPES",
    "BenchConfig",
    "DEFAULTS",
    "parse_size",
    "parse_sizes",
    "parse_dtype",
    "dtype_name",
    "make_spec",
    "resolve_device",
    "add_shape_arguments",
    "config_from_args",
    "device_label",
    "device_slug",
]

#: API.md "Benchmark results files": the columns, exactly and in this order.
CSV_COLUMNS = (
    "device",
    "date",
    "method",
    "B",
    "D",
    "C",
    "dtype",
    "margin",
    "ms_median",
    "ms_p20",
    "ms_p80",
    "peak_extra_mib",
    "floor_ms",
)

#: API.md: the allowed values of the ``method`` column (also the provider names).
METHODS = (
    "marginkit",
    "marginkit-fast",
    "marginkit-torch",
    "torch-textbook",
    "torch-compile",
    "pml",
    "cce",
    "liger",
    "floor-3gemm",
)

#: API.md: the allowed values of the ``margin`` column.
MARGINS = ("arcface", "cosface", "sphereface", "combined", "none")

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float": torch.float32,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class BenchConfig:
    """One measured shape: every provider runs on the same random inputs of this shape."""

    device: str  # "cpu" or "cuda" (or "cuda:N")
    B: int
    D: int
    C: int
    dtype: torch.dtype
    margin: str  # the sweep's margin family; no-margin peers run with "none"
    scale: float = 64.0

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def floor_flops(self) -> float:
        """Flops of the three GEMMs (logits, dX, dW): 3 × 2·B·D·C."""
        return 6.0 * self.B * self.D * self.C


#: the default sweeps. GPU: the issue's sizes. CPU: well under a minute on 2 cores, with one
#: size (C = 1M: 244 MiB per (B, C) float32 tensor) where the textbook loss's logits are large,
#: so the memory column shows the trade-off; 1K shows the fixed per-step overhead.
DEFAULTS = {
    "cuda": dict(B=[1024], D=[512], C=[100_000, 1_000_000, 4_000_000, 10_000_000], dtype=["bfloat16"], margin=["arcface"]),
    "cpu": dict(B=[64], D=[64], C=[1_000, 100_000, 1_000_000], dtype=["float32"], margin=["arcface"]),
}

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_size(text) -> int:
    """'100000', '100K', '1M', '4m', '1e6', '2**20' -> int."""
    if isinstance(text, int):
        return text
    s = str(text).strip().replace("_", "").lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)", s)
    if m:
        value = float(m.group(1)) * _SUFFIX[m.group(2)]
    elif re.fullmatch(r"\d+(?:\.\d+)?e\d+", s):
        value = float(s)
    elif re.fullmatch(r"\d+\*\*\d+", s):
        a, b = s.split("**")
        value = int(a) ** int(b)
    else:
        raise ValueError(f"not a size: {text!r} (use e.g. 1000, 100K, 1M, 1e6)")
    if value != int(value) or value < 1:
        raise ValueError(f"size must be a positive integer, got {text!r}")
    return int(value)


def parse_sizes(text, flag: str = "") -> list[int]:
    """A comma list (or a list) of sizes; ``flag`` (e.g. '--C') prefixes the error."""
    items = text if isinstance(text, (list, tuple)) else [t for t in str(text).split(",") if t.strip()]
    if not items:  # `--C ""` or `--C ,` would plan no shape and exit 0 having run nothing
        raise ValueError(f"{flag + ': ' if flag else ''}no size given in {text!r}; give at least one (e.g. 1000)")
    try:
        return [parse_size(t) for t in items]
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}" if flag else str(exc)) from None


def parse_dtype(text) -> torch.dtype:
    if isinstance(text, torch.dtype):
        return text
    key = str(text).strip().lower().replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {text!r}; use one of bf16, fp16, fp32")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The CSV spelling: bfloat16 / float16 / float32."""
    return str(dtype).replace("torch.", "")


def make_spec(margin: str):
    """The margin spec with its default parameters, for a CSV margin name."""
    from marginkit import specs

    table = {
        "arcface": specs.ArcFace,
        "cosface": specs.CosFace,
        "sphereface": specs.SphereFace,
        "combined": specs.CombinedMargin,
        "none": specs.NoMargin,
    }
    if margin not in table:
        raise ValueError(f"unknown margin {margin!r}; use one of {', '.join(MARGINS)}")
    return table[margin]()


def resolve_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' or 'cpu'; 'cpu', 'cuda', 'cuda:N' checked (ValueError naming --device otherwise)."""
    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name != "cpu" and match is None:  # torch.device("cuda:abc") would raise a RuntimeError later
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N (N a device index), got {name!r}")
    if match and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but torch sees no CUDA device")
    if match and match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                         f"indices 0..{torch.cuda.device_count() - 1}")
    return name


def device_label(device: str) -> str:
    """The CSV ``device`` value: torch.cuda.get_device_name() or 'cpu'."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def device_slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", device_label(device).lower()).strip("-") or "device"


def add_shape_arguments(parser) -> None:
    """One shape's flags for the single-shape GPU tools (profile_step.py, tune_sweep.py)."""
    parser.add_argument("--C", default="1M", help="classes (default 1M)")
    parser.add_argument("--B", default="1024", help="batch rows (default 1024)")
    parser.add_argument("--D", default="512", help="embedding dim (default 512)")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 (default bf16)")
    parser.add_argument("--margin", default="arcface", help=f"one of {', '.join(MARGINS)} (default arcface)")


def config_from_args(args, device: str) -> BenchConfig:
    return BenchConfig(device=device, B=parse_size(args.B), D=parse_size(args.D), C=parse_size(args.C),
                       dtype=parse_dtype(args.dtype), margin=args.margin, scale=64.0)
