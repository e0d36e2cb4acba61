"""Where one forward + backward step of a bench provider spends its GPU time.

    python benchmarks/profile_step.py --provider marginkit --C 1M      # B=1024, D=512, bf16, arcface

Prints the step's wall time (CUDA events), the summed kernel time, and torch.profiler's
kernel table sorted by GPU time: the gap between wall and kernel time is launch/host
overhead (syncs, Python), the table says which kernels to work on. Same inputs and
providers as ``marginkit bench``.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from marginkit.bench.config import add_shape_arguments, config_from_args, make_spec
from marginkit.bench.providers import get_provider, make_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--provider", default="marginkit")
    add_shape_arguments(p)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--rows", type=int, default=25, help="kernel table rows")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA device")

    cfg = config_from_args(args, "cuda")
    provider = get_provider(args.provider)
    case = provider.build(make_inputs(cfg), make_spec(provider.row_margin(cfg.margin)))

    def step():
        for param in case.params:  # as the bench does: no step accumulates into the last one's gradients
            param.grad = None
        case.step()

    for _ in range(2):  # compile, autotune, allocator warm-up
        step()
    torch.cuda.synchronize()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / args.steps

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_us = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"{args.provider} B={cfg.B} D={cfg.D} C={cfg.C} {cfg.dtype} {cfg.margin}: "
          f"wall {wall_ms:.3f} ms/step (CUDA events), kernels {kernel_us / 1e3 / args.steps:.3f} ms/step")
    print(events.table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
