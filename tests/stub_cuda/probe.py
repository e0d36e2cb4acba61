"""Count (and time) the host work of one marginkit training step on the CUDA code path, no GPU.

Run by ``tests.stub_cuda.run_probe`` with the stub libcuda first on LD_LIBRARY_PATH; prints
and writes one JSON row per class count. What runs for real: marginkit's Python, the torch ops
of the step (on CPU tensors: their dispatch, tiny compute at small B·D), Triton's CUDA host
launch path with kernels compiled for sm_90. What is emulated: the device (CPU tensors stand
in for CUDA ones: the Triton backend's "needs CUDA" check is bypassed, 132 SMs and 227 KiB of
shared memory are reported, the label check takes its CUDA branch, each autotuner keeps one
config so nothing is timed).

Per step it reports: Triton launches per kernel (counted in the C launcher's Python entry,
so cached-handle launches count too), those that went through ``JITFunction.run`` instead of a
cached handle (binder launches), aten calls made from Python (profiler events not nested
in another aten op), host syncs (ops that read a device value on the host: on CUDA each one
blocks until the GPU queue drains) and, with --steps, host ms per step (CPU time of this thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter

#: aten ops that read a tensor's value on the host: a blocking device-to-host sync on CUDA.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::allclose")
#: Tensor methods that copy to host memory without an aten op on a CPU tensor (a sync on CUDA).
HOST_COPY_METHODS = ("cpu", "tolist", "numpy", "__array__")
#: Profiler scope around reads of the label check's pinned host flag (host memory: no sync).
FLAG_SCOPE = "marginkit_probe::pinned_flag_read"


def install_stub_driver(launches: Counter, tma_launches: Counter | None = None) -> None:
    """Triton's CUDA driver answering like an H100/H200 (sm_90, 132 SMs) on stream 0, device 0,
    with a launcher class that counts launches per kernel name (and in ``tma_launches`` those of
    kernels compiled with TMA descriptor arguments)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver, CudaLauncher

    class CountingLauncher(CudaLauncher):
        def __init__(self, src, metadata):
            super().__init__(src, metadata)
            self.kernel_name = metadata.name
            self.tma = any(str(t).startswith("tensordesc") for t in src.signature.values())

        def __call__(self, *args):
            launches[self.kernel_name] += 1
            if self.tma and tma_launches is not None:
                tma_launches[self.kernel_name] += 1
            return super().__call__(*args)

    class StubCudaDriver(CudaDriver):
        def __init__(self):
            super().__init__()
            self.launcher_cls = CountingLauncher
            self.get_device_capability = lambda device=None: (9, 0)
            self.get_current_stream = lambda device=None: 0
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(StubCudaDriver())


def count_binder_launches(binder_launches: Counter) -> None:
    """Count launches through ``JITFunction.run`` (binder, specialisation, cache lookup) per kernel:
    the launches that did not go through a cached ``CompiledKernel`` handle."""
    import triton.runtime.jit as jit

    run = jit.JITFunction.run

    def counted_run(fn, *args, **kwargs):
        binder_launches[fn.__name__] += 1
        return run(fn, *args, **kwargs)

    jit.JITFunction.run = counted_run


def route_to_cuda_path(host_copies: Counter, counting: list) -> None:
    """Make CPU tensors take the code path CUDA tensors take (see the module docstring)."""
    import torch

    import marginkit.backends as backends
    from marginkit import _pipeline
    from marginkit.backends.triton import configs, launch, ops, passes

    resolve_name = backends.resolve_name
    backends.resolve_name = lambda name, device, **kw: resolve_name(name, torch.device("cuda"), **kw)

    check_inputs = passes.check_inputs

    def check_inputs_as_cuda(embeddings, weight):
        saved, passes.INTERPRETED = passes.INTERPRETED, True  # only silences "needs CUDA tensors"
        try:
            check_inputs(embeddings, weight)
        finally:
            passes.INTERPRETED = saved

    passes.check_inputs = ops.check_inputs = check_inputs_as_cuda
    launch.num_sms = lambda device: 132
    configs.shared_memory_limit = lambda t: configs.HOPPER_SHARED_MEMORY_BYTES  # the pruner drops what cannot fit
    _pipeline.DEFERRED_LABEL_CHECK_DEVICES = ("cpu",)
    check_pending = _pipeline.check_pending_labels
    in_flag_scope = [False]

    def check_pending_in_scope(wait: bool = False):
        with torch.profiler.record_function(FLAG_SCOPE):
            in_flag_scope[0] = True
            try:
                return check_pending(wait)
            finally:
                in_flag_scope[0] = False

    _pipeline.check_pending_labels = check_pending_in_scope
    for launcher in (passes.FWD, passes.FWD_STORE, passes.SCORES, passes.DX, passes.DW):
        for tuner in (launcher.tuned or {}).values():  # one config: the autotuner launches it untimed
            tuner.prune_configs = (lambda prune: (lambda kwargs: prune(kwargs)[:1]))(tuner.prune_configs)
            # Triton 3.6 still times a lone config (3.9 does not); timing would sync a device there is none of.
            tuner._bench = lambda *args, config, **kwargs: [0.0, 0.0, 0.0]
    for name in HOST_COPY_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if counting[0]:  # inside the label check's scope: a read of its pinned host flag
                host_copies[FLAG_SCOPE if in_flag_scope[0] else _name] += 1
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)


def aten_counts(prof) -> tuple[Counter, Counter, int]:
    """(top-level aten calls by name, host syncs by name, pinned-flag reads) of a profile."""
    top, syncs, flag_reads = Counter(), Counter(), 0
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        parent, nested, in_flag, in_sync = ev.cpu_parent, False, False, False
        while parent is not None:
            nested = nested or parent.name.startswith("aten::")
            in_flag = in_flag or parent.name == FLAG_SCOPE
            in_sync = in_sync or parent.name in SYNC_OPS  # item -> _local_scalar_dense is one read
            parent = parent.cpu_parent
        if ev.name in SYNC_OPS and not in_sync:
            if in_flag:
                flag_reads += 1
            else:
                syncs[ev.name] += 1
        if not nested:
            top[ev.name] += 1
    return top, syncs, flag_reads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--C", default="16384,40000", help="class counts, comma-separated")
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--master-weights", action="store_true", help="float32 weight with the --dtype embeddings")
    p.add_argument("--filter", type=float, default=0.0, help="interclass_filtering_threshold (a NegativeModulation)")
    p.add_argument("--chunk", type=int, default=16384,
                   help="backward chunk forced (B = 1024 bf16 gets 16384); 0 = the code's own")
    p.add_argument("--tma", action="store_true", help="tuning(tma=True): the GEMMs' operands through TMA descriptors")
    p.add_argument("--steps", type=int, default=0, help="timed steps per round (0: count only)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("probe.py must run without TRITON_INTERPRET (use tests.stub_cuda.run_probe)")

    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    launches, tma_launches, binder_launches, host_copies, counting = Counter(), Counter(), Counter(), Counter(), [False]
    install_stub_driver(launches, tma_launches)
    count_binder_launches(binder_launches)
    import marginkit as mk
    from marginkit.backends.triton import tuning

    route_to_cuda_path(host_copies, counting)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = []
    for num_classes in [int(float(c)) for c in args.C.split(",")]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.B, args.D, generator=gen).to(dtype).requires_grad_(True)
        w = torch.randn(num_classes, args.D, generator=gen).to(torch.float32 if args.master_weights else dtype)
        w.requires_grad_(True)
        y = torch.randint(0, num_classes, (args.B,), generator=gen)
        y[0] = -100  # an ignored row, as in real batches

        def step(read_back=False):
            x.grad = w.grad = None
            loss = mk.margin_cross_entropy(
                x, w, y, mk.ArcFace(0.5), 64.0, backend="triton", interclass_filtering_threshold=args.filter
            )
            loss.backward()
            if read_back:
                float(loss), x.grad.cpu()

        with tuning(chunk_classes=args.chunk or None, tma=args.tma):
            step()  # compiles for sm_90 and records the autotuner's (single) picks
            step()  # first launches through cached handles
            launches.clear()
            tma_launches.clear()
            binder_launches.clear()
            host_copies.clear()
            counting[0] = True
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            counting[0] = False
            counted_launches, counted_binder, counted_tma = dict(launches), dict(binder_launches), dict(tma_launches)
            top, syncs, flag_reads = aten_counts(prof)
            flag_reads += host_copies.pop(FLAG_SCOPE, 0)
            syncs.update(host_copies)
            # The control: a step that reads the loss and copies a gradient to the host must count 2.
            host_copies.clear()
            counting[0] = True
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as control:
                step(read_back=True)
            counting[0] = False
            host_copies.pop(FLAG_SCOPE, 0)
            control_syncs = sum(aten_counts(control)[1].values()) + sum(host_copies.values())
            times = []
            for _ in range(args.rounds if args.steps else 0):
                c0 = time.thread_time()  # CPU time: robust to other processes on the cores
                for _ in range(args.steps):
                    step()
                times.append((time.thread_time() - c0) / args.steps * 1e3)
        row = dict(
            C=num_classes, B=args.B, D=args.D, dtype=args.dtype, chunk=args.chunk, tma=args.tma,
            master_weights=args.master_weights, filter=args.filter,
            triton_launches=sum(counted_launches.values()), launches=counted_launches, binder_launches=counted_binder,
            tma_launches=counted_tma,
            aten_calls=sum(top.values()), aten_by_name=dict(top.most_common()),
            host_syncs=sum(syncs.values()), syncs=dict(syncs),
            pinned_flag_reads=flag_reads, control_host_syncs=control_syncs,
            host_ms_median=round(statistics.median(times), 3) if times else None,
            host_ms_rounds=[round(t, 3) for t in times],
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
