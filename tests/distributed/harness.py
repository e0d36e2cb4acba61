"""Multi-process runs for the distributed tests: start ``world`` workers from a fork server,
each computes a dict of results that the test process then compares with one process."""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist

from tests.interpreter_rounding import round_bf16_casts_to_nearest_even

round_bf16_casts_to_nearest_even()  # the workers run Triton kernels too (the fork server imports this module)

# Workers start from a fork server, a fresh interpreter that imports these once (torch,
# torch._dynamo, which the first custom-op call imports, DCP, marginkit): each worker then
# starts in milliseconds instead of paying ~7 s of imports on a 2-core machine.
PRELOAD = ["torch", "torch._dynamo", "torch.distributed.checkpoint", "torch.nn.parallel",
           "marginkit", "marginkit.distributed", "marginkit.ops", __name__]


def caught(call: Callable[[], object]):
    """None if ``call()`` returns, else (error type name, message) of the ValueError/TypeError it raised."""
    try:
        call()
        return None
    except (ValueError, TypeError) as err:
        return type(err).__name__, str(err)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_results(compute: Callable[[], dict], world: int, rank: int, outdir: str) -> None:
    """In a worker with its process group up: write ``compute()`` to ``result_w{world}_r{rank}.pt``
    (or the traceback to ``error_w{world}_r{rank}.txt``), then tear the group down."""
    try:
        torch.save(compute(), os.path.join(outdir, f"result_w{world}_r{rank}.pt"))
        dist.barrier()
    except BaseException:
        with open(os.path.join(outdir, f"error_w{world}_r{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn_and_wait(worker, args: tuple, nprocs: int, timeout: float, outdir: str, error_prefix: str = "error_",
                   start_method: str = "forkserver") -> None:
    """Start ``nprocs`` workers ``worker(rank, *args)`` from the fork server (or ``start_method="spawn"``:
    workers that use CUDA, which a fork server whose imports initialised CUDA could not give them) and
    wait; after ``timeout`` s, or when one fails, kill the rest and raise with the tracebacks they left in
    ``outdir`` (files starting with ``error_prefix``)."""
    import multiprocessing

    import torch.multiprocessing as mp

    if start_method == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD + [worker.__module__])
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method=start_method)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nprocs} workers did not finish in {timeout:.0f} s (a hang?)")
    except Exception as err:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        errors = [open(os.path.join(outdir, f)).read() for f in sorted(os.listdir(outdir)) if f.startswith(error_prefix)]
        raise AssertionError(f"{nprocs} workers failed: {err}\n" + "\n".join(errors)) from err


def run_world(world: int, outdir: str, timeout: float, worker, start_method: str = "forkserver") -> list:
    """Start ``world`` workers ``worker(rank, world, port, outdir)`` (see ``spawn_and_wait``).
    Returns every rank's results, in rank order."""
    spawn_and_wait(worker, (world, free_port(), outdir), world, timeout, outdir, f"error_w{world}", start_method)
    return [torch.load(os.path.join(outdir, f"result_w{world}_r{r}.pt")) for r in range(world)]
