"""Host cost per training step of the default CUDA path, measured on a CPU with the GPU stubbed.

    python benchmarks/host_cost.py          # C = 100K, 1M -> benchmarks/results/host-cost-cpu-<date>.txt
    python benchmarks/host_cost.py --C 100K --shape full --steps 5 --out -
    python benchmarks/host_cost.py --tma --out benchmarks/results/host-cost-cpu-<date>-tma.txt

A stub libcuda (tests/stub_cuda) makes Triton's real CUDA host launch path run with no GPU:
marginkit's Python, the torch ops of the step (on CPU tensors) and Triton's launcher all run;
no kernel does. Per step it reports Triton launches (and how many of them went through
``JITFunction.run`` rather than a cached handle), aten calls, host syncs and host ms (CPU
time of the main thread; the median over rounds). Times are reported, never asserted (the
guards on the counts are tests/backends/test_host_cost.py).

Shapes: ``small`` (default) is B = D = 64 with the backward chunk of B = 1024 bf16 forced
(16 384 classes), so launches and aten calls are the real shape's while the torch ops' CPU
compute is negligible: its ms is the host's dispatch cost. ``full`` is B = 1024, D = 512 bf16:
the same counts, but its ms also holds the CPU *compute* of the O(B·D) torch ops, which on a
GPU runs asynchronously, so it is an upper bound. Neither counts the real driver's
cuLaunchKernelEx (~2-4 µs a launch) nor cudaLaunchKernel behind each torch op on CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.stub_cuda import build_stub, run_probe  # noqa: E402

SHAPES = {"small": dict(B=64, D=64, chunk=16384), "full": dict(B=1024, D=512, chunk=0)}


def parse_count(text: str) -> int:
    """'100K' -> 100000, '1M' -> 1000000, '40000' -> 40000."""
    text = text.strip().upper()
    factor = {"K": 10**3, "M": 10**6}.get(text[-1:], 1)
    return int(float(text[:-1] if factor > 1 else text) * factor)


def format_rows(rows: list[dict], shape: str) -> str:
    lines = [
        f"{'C':>9} {'B':>5} {'D':>4} {'launches':>8} {'binder':>6} {'aten':>5} {'syncs':>5} {'host ms':>8}"
        f"  rounds (ms)   [shape {shape}]"
    ]
    for r in rows:
        rounds = " ".join(f"{t:.2f}" for t in r["host_ms_rounds"])
        lines.append(
            f"{r['C']:>9} {r['B']:>5} {r['D']:>4} {r['triton_launches']:>8} "
            f"{sum(r['binder_launches'].values()):>6} {r['aten_calls']:>5} "
            f"{r['host_syncs']:>5} {r['host_ms_median']:>8.2f}  {rounds}"
        )
    launches = rows[0]["launches"] if rows else {}
    lines.append("launches per kernel at the first C: " + ", ".join(f"{k} {v}" for k, v in launches.items()))
    top = sorted(rows[0]["aten_by_name"].items(), key=lambda kv: -kv[1])[:15] if rows else []
    lines.append("most frequent aten calls: " + ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in top))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--C", default="100K,1M", help="class counts (K/M suffixes)")
    p.add_argument("--shape", default="small", help="comma-separated: small, full")
    p.add_argument("--steps", type=int, default=20, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tma", action="store_true", help="tuning(tma=True): the GEMMs' operands through TMA descriptors")
    p.add_argument("--out", default="",
                   help="results file ('-': print only); default benchmarks/results/host-cost-cpu-<date>.txt")
    args = p.parse_args()
    counts = ",".join(str(parse_count(c)) for c in args.C.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        stub_dir, why_not = build_stub(Path(tmp))
        if stub_dir is None:
            print(f"host_cost: cannot build the stub libcuda: {why_not}", file=sys.stderr)
            return 2
        import torch
        import triton

        sections = ["\n".join([
            f"# host cost per training step, GPU stubbed (benchmarks/host_cost.py), {datetime.date.today()}",
            f"# {platform.processor() or platform.machine()}, {platform.python_version()}, torch {torch.__version__}, "
            f"triton {triton.__version__}; ArcFace(0.5), s = 64, bf16, one forward + backward, 1 torch thread"
            + ("; tuning(tma=True)" if args.tma else ""),
            "# host ms: CPU time of the main thread per step, median of rounds; reported, never asserted",
            "# binder: launches through JITFunction.run (no cached CompiledKernel handle) per step",
        ])]
        for shape in args.shape.split(","):
            cfg = SHAPES[shape]
            rows = run_probe(stub_dir, [
                "--C", counts, "--B", str(cfg["B"]), "--D", str(cfg["D"]), "--chunk", str(cfg["chunk"]),
                "--steps", str(args.steps), "--rounds", str(args.rounds), *(["--tma"] if args.tma else []),
            ], timeout=3600)
            sections.append(format_rows(rows, shape))
    text = "\n\n".join(sections) + "\n"
    print(text, end="")
    if args.out != "-":
        default = REPO / "benchmarks" / "results" / f"host-cost-cpu-{datetime.date.today()}.txt"
        out = Path(args.out) if args.out else default
        out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
