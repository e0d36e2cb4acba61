"""What the loss does while a CUDA graph is being captured (``torch.cuda.graph``,
``torch.compile(mode="reduce-overhead")``).

A replay runs no Python, so nothing the host would do per step can happen in it:
- nothing is reported, as under ``torch.compile``: a row with an out-of-range label or a bad
  class/sample margin is still left out on the device, but no error is ever raised for it;
- what is made once per shape or margin on the first eager call (the autotuner's pick, the
  target column's float64 constants) cannot be made during capture: a capture that would need
  it raises :class:`CudaGraphWarmupError` instead of failing inside CUDA;
- what reads the host every step refuses to be captured: CurricularFace and AdaCos (their t and
  scale are kernel arguments), the heads that check each batch on the host before it can change
  their state or their margin (online LDAM in training, MagFace and AdaFace always, IRSoftmax and
  FairLoss in training), RangeLoss and the partitioned head (every rank's input is checked alike on
  the host).
"""

from __future__ import annotations

import torch

__all__ = ["capturing", "CudaGraphWarmupError", "refuse_cold_capture", "refuse_capture", "keep_for_replays"]

#: Tensors a captured graph reads whose only other owner is a bounded cache (they must outlive it).
_READ_BY_GRAPHS: list = []


class CudaGraphWarmupError(RuntimeError):
    """A CUDA-graph capture reached work that runs once, on the first eager call of a shape."""


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def refuse_cold_capture(what: str) -> None:
    """Raise :class:`CudaGraphWarmupError` if a capture reached ``what`` (first-call work)."""
    if capturing():
        raise CudaGraphWarmupError(
            f"{what} runs on the first eager call with these shapes and margins, not during CUDA-graph "
            "capture: run the step eagerly once (on a side stream, as torch.cuda.graph's docs warm up) "
            "before capturing it"
        )


def keep_for_replays(t: torch.Tensor) -> torch.Tensor:
    """``t``, kept alive for the process's lifetime if a capture is reading it (a cache may drop it)."""
    if capturing():
        _READ_BY_GRAPHS.append(t)
    return t


def refuse_capture(module: torch.nn.Module, why: str, instead: str = "") -> None:
    """Raise ``RuntimeError`` if ``module``, which needs the host every step (``why``), is called
    during capture."""
    if capturing():
        raise RuntimeError(
            f"{type(module).__name__} {why}, which a CUDA-graph replay cannot do: run it eagerly{instead}"
        )
