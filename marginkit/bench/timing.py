"""Timing and peak-memory measurement of one provider's training step.

CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each step,
median and 20th/80th percentiles) after a warm-up call. Steps slower than
``slow_ms`` (liger at C = 10M takes seconds) are timed with the same CUDA
events in a loop bounded by ``budget_s`` instead, since do_bench would run at
least eight of them. CPU: a ``time.perf_counter`` loop after warm-up.

Peak extra memory, the memory a step needs beyond its inputs and their
gradients. CUDA: ``torch.cuda.max_memory_allocated`` during one step, minus what
was allocated before it (the inputs and anything the provider preallocated) and
minus the gradients the step leaves behind. CPU, where torch keeps no
high-water mark: the first (warm-up) call runs under
:class:`marginkit.bench.memory.LiveTensorBytes`, which counts the live bytes of
the tensors the step creates (see :data:`CPU_MEMORY_METHOD`); a case whose code
the tracker cannot see (a compiled graph) gets NaN.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from marginkit.bench.memory import CPU_MEMORY_METHOD, peak_extra_bytes

__all__ = ["Measurement", "measure", "quantiles", "CPU_MEMORY_METHOD", "CUDA_MEMORY_METHOD"]

CUDA_MEMORY_METHOD = (
    "CUDA peak_extra_mib: torch.cuda.max_memory_allocated during one step minus the memory allocated "
    "before it and the gradients it leaves"
)

_MIB = 1024.0 * 1024.0


@dataclass
class Measurement:
    ms_median: float
    ms_p20: float
    ms_p80: float
    peak_extra_mib: float  # NaN when not measured (a compiled case on the CPU)
    first_call_s: float  # wall time of the first call (includes compilation / autotuning)
    reps: int  # timed steps (an estimate for do_bench, which picks its own count)
    timer: str  # "do_bench", "cuda-events" or "perf_counter"


def quantiles(samples_ms) -> tuple[float, float, float]:
    """(median, p20, p80), linear interpolation as do_bench does."""
    t = torch.tensor(list(samples_ms), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _sync(device: str) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


def _clear_grads(params) -> None:
    for p in params:
        p.grad = None


def _grad_bytes(params) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


class _L2Flush:
    """Overwrite a buffer larger than L2 before each timed step (what do_bench does)."""

    def __init__(self, device: str):
        self.buf = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device) if _is_cuda(device) else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def _timed_once(step, device: str) -> float:
    """One step, in ms (CUDA events on CUDA, perf_counter on CPU)."""
    if _is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def _loop(step, params, device: str, n: int) -> list[float]:
    flush = _L2Flush(device)
    samples = []
    for _ in range(n):
        _clear_grads(params)
        flush()
        samples.append(_timed_once(step, device))
    return samples


def measure(
    case,
    device: str,
    *,
    reps: Optional[int] = None,
    warmup: int = 1,
    budget_s: float = 2.0,
    rep_ms: float = 100.0,
    warmup_ms: float = 25.0,
    slow_ms: float = 200.0,
    max_reps: int = 50,
    preexisting=(),
    warmed_up: bool = False,
) -> Measurement:
    """Time ``case.step`` (forward + backward) on ``device``.

    ``reps``: a fixed number of timed steps (CUDA events or perf_counter); None picks
    it: do_bench with ``rep_ms`` of timed steps on CUDA, else as many steps as fit in
    ``budget_s`` (at least one, at most ``max_reps``).
    ``warmup``: untimed steps first (the first one's wall time is ``first_call_s``; on the
    CPU it runs under the memory tracker, so it includes the tracker's per-op cost).
    ``preexisting``: tensors that exist before a step (the inputs), excluded from its memory.
    ``warmed_up``: the caller already ran (and on the CPU measured) a first call, as the
    float64 check does; no first call here, ``first_call_s`` and the CPU peak are NaN.
    """
    step, params = case.step, case.params
    cuda = _is_cuda(device)
    # on the CPU the tracked call doubles as the warm-up: one step fewer per run
    track_cpu = not cuda and getattr(case, "memory_traceable", True)
    cpu_peak_mib = first_call_s = math.nan

    # warm-up: the first call compiles / autotunes / fills the allocator's cache
    _clear_grads(params)
    _sync(device)
    t0 = time.perf_counter()
    if warmed_up:
        pass
    elif track_cpu:
        exclude = list(preexisting) + list(getattr(case, "keepalive", ()))
        cpu_peak_mib = peak_extra_bytes(step, params, exclude) / _MIB
    else:
        step()
    _sync(device)
    if not warmed_up:
        first_call_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        _clear_grads(params)
        step()
    _sync(device)

    # one step for the peak memory, also the time estimate
    _clear_grads(params)
    if cuda:
        dev = torch.device(device)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        est_ms = _timed_once(step, device)
        peak = torch.cuda.max_memory_allocated(dev) - base - _grad_bytes(params)
        peak_mib = max(0.0, peak / _MIB)
    else:
        est_ms = _timed_once(step, device)
        peak_mib = cpu_peak_mib
    est_ms = max(est_ms, 1e-3)

    if reps is not None:
        samples = _loop(step, params, device, max(1, int(reps)))
        timer = "cuda-events" if cuda else "perf_counter"
    elif cuda and est_ms < slow_ms:
        from triton.testing import do_bench

        def fresh_step():
            # do_bench resets grads only in its timed loop; its estimate and warm-up calls
            # would accumulate into .grad (a transient second W-sized gradient: an OOM the
            # provider itself would not hit). Setting .grad = None costs no GPU time.
            _clear_grads(params)
            step()

        med, p20, p80 = do_bench(
            fresh_step, warmup=warmup_ms, rep=rep_ms, grad_to_none=params or None, quantiles=[0.5, 0.2, 0.8]
        )
        _clear_grads(params)
        return Measurement(med, p20, p80, peak_mib, first_call_s, max(1, int(rep_ms / est_ms)), "do_bench")
    else:
        # slow steps (or CPU): the estimate is a valid sample (it ran after warm-up)
        n_total = max(1, min(max_reps, int(budget_s * 1e3 / est_ms)))
        samples = [est_ms] + _loop(step, params, device, n_total - 1)
        timer = "cuda-events" if cuda else "perf_counter"
    _clear_grads(params)
    med, p20, p80 = quantiles(samples)
    return Measurement(med, p20, p80, peak_mib, first_call_s, len(samples), timer)
