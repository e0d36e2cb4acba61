"""Does a CUDA graph pay? One marginkit training step eager against the same step captured and replayed.

    python benchmarks/cuda_graph_ab.py --C 100K                       # B=1024, D=512, bf16, arcface
    python benchmarks/cuda_graph_ab.py --C 1M --providers marginkit,marginkit-fast

A replay launches everything from the device with no Python in between, so eager − replay is
the host time the GPU waited for (issue 13 item 3): about 0 means the step is GPU-bound and a
graph buys nothing. The whole step is captured (``torch.cuda.graph`` after a warm-up on a side
stream), an upper bound for capturing only the backward's chunk loop. Both sides are timed with
do_bench as ``marginkit bench`` times its rows (L2 flushed, median, p20-p80); the replay's
gradients are checked against an eager step on the same inputs before it is timed.
"""

import argparse

import torch
from triton.testing import do_bench

from marginkit.bench.config import add_shape_arguments, config_from_args, make_spec
from marginkit.bench.providers import get_provider, make_inputs
from marginkit.bench.timing import measure

_MIB = 1024.0 * 1024.0


def warm_up(case, steps: int = 2) -> None:
    """Eager steps on a side stream (autotuning, first-call constants), as torch.cuda.graph's docs do."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(steps):
            for p in case.params:
                p.grad = None
            case.step()
    torch.cuda.current_stream().wait_stream(side)


def capture(case) -> torch.cuda.CUDAGraph:
    """``case.step`` captured, its gradients allocated in the graph's pool (the caller drops them first)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        case.step()
    return graph


def max_rel_diff(got, want) -> float:
    return max(float((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)) for g, w in zip(got, want))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p)
    p.add_argument("--providers", default="marginkit", help="comma list of marginkit providers (default marginkit)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("cuda_graph_ab.py needs a CUDA device")
    cfg = config_from_args(args, "cuda")
    inputs = make_inputs(cfg)
    print(f"B={cfg.B} D={cfg.D} C={cfg.C} {cfg.dtype} {cfg.margin} on {torch.cuda.get_device_name()}")
    print(f"{'provider':<16} {'eager ms':>9} {'replay ms':>10} {'host share':>11} {'pool MiB':>9} {'grad rel diff':>14}")
    for name in (n.strip() for n in args.providers.split(",") if n.strip()):
        try:
            print(row(name, inputs, cfg))
        except Exception as exc:  # one provider's failure (a capture error) must not hide the others' rows
            print(f"{name:<16} error: {type(exc).__name__}: {str(exc)[:300]}")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def row(name: str, inputs, cfg) -> str:
    """One provider's line: eager and replay ms, the host share, the graph's pool, the replay's gradient error."""
    provider = get_provider(name)
    case = provider.build(inputs, make_spec(provider.row_margin(cfg.margin)))
    eager = measure(case, "cuda")
    for param in case.params:
        param.grad = None
    case.step()
    want = [param.grad.clone() for param in case.params]
    warm_up(case)
    # read the baseline as capture() starts: grads dropped and the cache emptied (torch.cuda.graph
    # empties it too), or the freed grads and do_bench's flush buffer make the pool look negative
    for param in case.params:
        param.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    graph = capture(case)
    pool_mib = (torch.cuda.memory_reserved() - reserved) / _MIB
    graph.replay()
    diff = max_rel_diff([param.grad for param in case.params], want)
    replay_ms = do_bench(graph.replay, warmup=25, rep=100, quantiles=[0.5])
    replay_ms = replay_ms[0] if isinstance(replay_ms, (list, tuple)) else replay_ms
    share = 1.0 - replay_ms / eager.ms_median
    for param in case.params:
        param.grad = None
    return f"{name:<16} {eager.ms_median:>9.3f} {replay_ms:>10.3f} {share:>10.0%} {pool_mib:>9.0f} {diff:>14.2e}"


if __name__ == "__main__":
    main()
