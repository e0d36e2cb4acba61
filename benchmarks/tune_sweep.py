"""A/B the Triton backend's launch choices on one shape: time and peak memory per variant.

    python benchmarks/tune_sweep.py --C 1M --chunk-classes 0,32768,65536 --dx-splits 0,1,4 --direct-launch 1,0
    python benchmarks/tune_sweep.py --C 100K --compiled-launch 1,0   # the host-overhead A/B
    python benchmarks/tune_sweep.py --C 1M --colsum-mma 1,0          # scores' column sums: tensor cores vs rows
    python benchmarks/tune_sweep.py --C 1M --tma 0,1                 # GEMM operands: pointer loads vs TMA

Each variant is a ``tuning(...)`` override of the Triton backend (0 = the launcher's
own choice; the backend comes from ``marginkit.backends.resolve``, so on a CPU, where the
torch backend runs, the overrides do nothing), checked against float64 as ``marginkit bench``
checks its rows (a mismatch prints ``error``, never a time: a variant that computes something
else must not win an A/B), then timed with the bench's ``measure`` on the bench's inputs, so its
numbers line up with ``marginkit bench``. The backward's workspace is B · chunk_classes
elements: bigger chunks mean fewer launches and more memory.
"""

import argparse
import contextlib
import itertools

import torch

from marginkit.backends import resolve
from marginkit.bench.check import check_against_float64
from marginkit.bench.config import add_shape_arguments, config_from_args, make_spec, parse_size, resolve_device
from marginkit.bench.providers import get_provider, make_inputs
from marginkit.bench.timing import measure


def choices(text: str) -> list[int]:
    """'0,32K,65536' -> [0, 32000, 65536]; 0 leaves the choice to the launcher."""
    return [0 if v.strip() == "0" else parse_size(v) for v in text.split(",") if v.strip()]


def variants(chunk_classes, dx_splits, direct_launch=(1,), compiled_launch=(1,), colsum_mma=(1,), tma=(0,)):
    """Every combination; 0 leaves a choice to the launcher (direct_launch 0: through the autotuner;
    compiled_launch 0: direct launches through ``JITFunction.run`` instead of cached handles;
    colsum_mma 0: the scores kernel's column sums by a row reduction instead of a tensor-core product;
    tma 1: the GEMM-shaped kernels' operands through TMA descriptors)."""
    for chunk, splits, direct, compiled, colsum, descriptors in itertools.product(
        chunk_classes, dx_splits, direct_launch, compiled_launch, colsum_mma, tma
    ):
        override = {k: v for k, v in (("chunk_classes", chunk), ("dx_splits", splits)) if v}
        for key, on in (("direct_launch", direct), ("compiled_launch", compiled), ("colsum_mma", colsum)):
            if not on:
                override[key] = False
        if descriptors:
            override["tma"] = True
        yield override


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    add_shape_arguments(p)
    p.add_argument("--chunk-classes", default="0", help="comma list; 0 = the launcher's choice")
    p.add_argument("--dx-splits", default="0", help="comma list; 0 = the launcher's choice")
    p.add_argument("--direct-launch", default="1",
                   help="comma list of 1 (the autotuner's pick launched directly) and 0 (every launch through it)")
    p.add_argument("--compiled-launch", default="1",
                   help="comma list of 1 (cached CompiledKernel handles) and 0 (JITFunction.run per launch)")
    p.add_argument("--colsum-mma", default="1",
                   help="comma list of 1 (bf16 column sums on the tensor cores) and 0 (a row reduction)")
    p.add_argument("--tma", default="0",
                   help="comma list of 0 (the GEMM-shaped kernels' pointer loads) and 1 (TMA descriptors)")
    p.add_argument("--reps", type=int, default=None, help="fixed timed steps (default: do_bench on CUDA)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    cfg = config_from_args(args, device)
    provider = get_provider("marginkit")  # backend="auto": Triton on CUDA
    # the torch backend (CPU) has no launch choices: the variants then time the same code
    tuning = getattr(resolve("auto", torch.device(device)), "tuning", lambda **_: contextlib.nullcontext())
    inputs = make_inputs(cfg)
    print(f"marginkit B={cfg.B} D={cfg.D} C={cfg.C} {cfg.dtype} {cfg.margin} on {device}")
    print(f"{'variant':<40} {'ms median':>10} {'p20-p80':>17} {'peak extra MiB':>15} {'rel err vs f64':>15}")
    direct = [int(v) for v in args.direct_launch.split(",") if v.strip()]
    compiled = [int(v) for v in args.compiled_launch.split(",") if v.strip()]
    colsum = [int(v) for v in args.colsum_mma.split(",") if v.strip()]
    tma = [int(v) for v in args.tma.split(",") if v.strip()]
    spec = make_spec(provider.row_margin(cfg.margin))
    for override in variants(choices(args.chunk_classes), choices(args.dx_splits), direct, compiled, colsum, tma):
        name = ", ".join(f"{k}={v}" for k, v in override.items()) or "launcher's choice"
        with tuning(**override):
            case = provider.build(inputs, spec)
            check = check_against_float64(case, inputs, spec)  # also the first call (compile, autotuning)
            if not check.ok:
                print(f"{name:<40} error: {check.summary()}", flush=True)
                continue
            m = measure(case, device, reps=args.reps, warmed_up=True)
        print(f"{name:<40} {m.ms_median:>10.3f} {m.ms_p20:>8.3f}-{m.ms_p80:<8.3f} {m.peak_extra_mib:>15.1f} "
              f"{check.max_rel_err:>15.2g}", flush=True)


if __name__ == "__main__":
    main()
