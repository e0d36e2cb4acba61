"""Benchmark providers: one training step (forward + backward) of each loss.

A provider turns shared random inputs into a :class:`Case`: a ``step()`` closure
that runs the loss forward and backward, a ``forward()`` closure that returns
the loss alone (for correctness checks), and the leaf tensors whose gradients a
step produces (reset to ``None`` before each timed step so that no step
accumulates into the last one's gradients).

Every provider uses the inputs it is given without copying them (leaves share
storage with the shared tensors), so a sweep holds one copy of W per shape.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from marginkit.bench.config import BenchConfig
from marginkit.bench.textbook import textbook_margin_loss

__all__ = ["Inputs", "Case", "Provider", "PROVIDERS", "get_provider", "make_inputs", "FLOOR_CHUNK"]


@dataclass
class Inputs:
    """Random inputs of one shape (never zeros): embeddings, class weights, labels."""

    cfg: BenchConfig
    x: torch.Tensor  # (B, D)
    w: torch.Tensor  # (C, D)
    labels: torch.Tensor  # (B,) int64

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.w, self.labels))


def make_inputs(cfg: BenchConfig, seed: int = 0) -> Inputs:
    gen = torch.Generator(device=cfg.device)
    gen.manual_seed(seed)
    x = torch.randn(cfg.B, cfg.D, device=cfg.device, dtype=cfg.dtype, generator=gen)
    w = torch.randn(cfg.C, cfg.D, device=cfg.device, dtype=cfg.dtype, generator=gen)
    labels = torch.randint(0, cfg.C, (cfg.B,), device=cfg.device, generator=gen)
    return Inputs(cfg, x, w, labels)


@dataclass
class Case:
    step: Callable[[], None]
    forward: Callable[[], torch.Tensor]
    params: list = field(default_factory=list)  # [embeddings, weight] leaves for checked providers
    margin: str = "none"  # the margin this case computes (the row's margin column)
    note: str = ""
    keepalive: tuple = ()  # buffers the provider preallocated: inputs, not step memory
    memory_traceable: bool = True  # False: the CPU memory tracker cannot see its code (compiled)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A new leaf that shares ``t``'s storage and requires grad."""
    return t.detach().requires_grad_(True)


def _step_of(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        forward().backward()

    return step


class Provider:
    """Base class. ``name`` is the CSV ``method`` value."""

    name: str = ""
    description: str = ""
    #: margin families it computes; None means all
    margins: Optional[tuple] = None
    #: margin it runs with when it has no margin (cce, liger): "none"
    fixed_margin: Optional[str] = None
    cuda_only: bool = False
    #: run by default on CPU (torch-compile is opt-in there: compiling takes long)
    default_on_cpu: bool = True
    #: loss and gradients checked against float64 before timing (marginkit's own rows)
    checked: bool = False

    def unavailable(self) -> Optional[str]:
        """Why the provider cannot run at all here (missing package), or None."""
        return None

    def unsupported(self, device: str, margin: str) -> Optional[str]:
        """Why it cannot run this device/margin, or None."""
        if self.cuda_only and not device.startswith("cuda"):
            return f"{self.name} runs on CUDA only"
        if self.margins is not None and self.row_margin(margin) not in self.margins:
            return f"{self.name} has no {margin} loss with marginkit's meaning"
        return None

    def too_large(self, cfg: BenchConfig) -> Optional[str]:
        """Why this shape is past a known limit of the provider (a crash, not an OOM), or None."""
        return None

    def row_margin(self, margin: str) -> str:
        return self.fixed_margin or margin

    def build(self, inputs: Inputs, spec) -> Case:
        raise NotImplementedError


def _import_error(module: str, pip_name: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{module} is not importable ({type(exc).__name__}: {exc}); install with `pip install {pip_name}`"
    return None


# --------------------------------------------------------------------------------------
# marginkit
# --------------------------------------------------------------------------------------


def _margin_cross_entropy():
    import marginkit

    fn = getattr(marginkit, "margin_cross_entropy", None)
    if fn is None:
        raise ImportError("marginkit does not export margin_cross_entropy (yet)")
    return fn


class MarginKit(Provider):
    name = "marginkit"
    description = "marginkit.margin_cross_entropy, backend='auto' (Triton on CUDA, torch elsewhere)"
    backend = "auto"
    #: ``memory_budget`` of the call: 0 = the default bounded workspace
    memory_budget = 0
    checked = True

    def unavailable(self):
        try:
            _margin_cross_entropy()
        except Exception as exc:
            return f"marginkit.margin_cross_entropy is not importable ({type(exc).__name__}: {exc})"
        return None

    def resolved_backend(self, device: str) -> str:
        if self.backend != "auto":
            return self.backend
        return "triton" if device.startswith("cuda") else "torch"  # API.md: auto = Triton on CUDA, torch elsewhere

    def build(self, inputs, spec):
        fn = _margin_cross_entropy()
        x, w, y = _leaf(inputs.x), _leaf(inputs.w), inputs.labels
        scale, backend, budget = inputs.cfg.scale, self.backend, self.memory_budget

        def forward():
            return fn(x, w, y, margin=spec, scale=scale, backend=backend, memory_budget=budget)

        note = ""
        if self.backend == "auto":
            note = f"backend=auto -> {self.resolved_backend(inputs.cfg.device)}"
        return Case(_step_of(forward), forward, [x, w], inputs.cfg.margin, note)


class MarginKitTorch(MarginKit):
    name = "marginkit-torch"
    description = "marginkit.margin_cross_entropy, backend='torch' (chunked PyTorch)"
    backend = "torch"
    default_on_cpu = False  # on the CPU backend='auto' is this same code: the marginkit row times it


class MarginKitFast(MarginKit):
    name = "marginkit-fast"
    description = (
        "marginkit.margin_cross_entropy, memory_budget=None (the forward keeps every class's exp-scaled "
        "logits, B*C*2 bytes in bf16 on Triton, B*C*4 in fp32 on the torch backend: no recompute GEMM "
        "in the backward)"
    )
    memory_budget = None


# --------------------------------------------------------------------------------------
# PyTorch baselines
# --------------------------------------------------------------------------------------


class TorchTextbook(Provider):
    name = "torch-textbook"
    description = "normalise, F.linear, margin on the target column, F.cross_entropy (insightface style)"

    def build(self, inputs, spec):
        x, w, y = _leaf(inputs.x), _leaf(inputs.w), inputs.labels
        scale = inputs.cfg.scale

        def forward():
            return textbook_margin_loss(x, w, y, spec, scale)

        return Case(_step_of(forward), forward, [x, w], inputs.cfg.margin)


class TorchCompile(Provider):
    name = "torch-compile"
    description = "torch-textbook under torch.compile (static shapes, recompiled per shape)"
    default_on_cpu = False

    def unavailable(self):
        if not hasattr(torch, "compile"):
            return "torch.compile is not available in this torch"
        return None

    def build(self, inputs, spec):
        x, w, y = _leaf(inputs.x), _leaf(inputs.w), inputs.labels
        scale = inputs.cfg.scale

        def loss_fn(x_, w_, y_):
            return textbook_margin_loss(x_, w_, y_, spec, scale)

        torch._dynamo.reset()  # a fresh compile per shape: the first call's time is the compile time
        compiled = torch.compile(loss_fn, dynamic=False)

        def forward():
            return compiled(x, w, y)

        return Case(_step_of(forward), forward, [x, w], inputs.cfg.margin, "first call = compile",
                    memory_traceable=False)


# --------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------


class PML(Provider):
    name = "pml"
    description = "pytorch-metric-learning ArcFaceLoss / CosFaceLoss (W is (D, C); ArcFace margin in degrees)"
    margins = ("arcface", "cosface", "none")

    def unavailable(self):
        return _import_error("pytorch_metric_learning.losses", "pytorch-metric-learning")

    def unsupported(self, device, margin):
        if margin == "sphereface":
            return "pml's SphereFaceLoss scales logits by ‖x‖ and takes an integer m: not marginkit's SphereFace"
        return super().unsupported(device, margin)

    def build(self, inputs, spec):
        from pytorch_metric_learning import losses

        cfg = inputs.cfg
        if getattr(spec, "easy_margin", False):
            raise ValueError("pml's ArcFaceLoss has no easy_margin")
        # Built with one class so that its constructor does not allocate and initialise a
        # (D, C) float32 weight (20 GB at C = 10M); the real weight is put in place below.
        if cfg.margin == "arcface":
            loss = losses.ArcFaceLoss(1, cfg.D, margin=math.degrees(spec.m), scale=cfg.scale)
        elif cfg.margin == "cosface":
            loss = losses.CosFaceLoss(1, cfg.D, margin=spec.m, scale=cfg.scale)
        else:  # none: CosFace with m = 0 is the plain normalised softmax
            loss = losses.CosFaceLoss(1, cfg.D, margin=0.0, scale=cfg.scale)
        loss.num_classes = cfg.C
        loss.W = torch.nn.Parameter(inputs.w.detach().t())  # (D, C) view of the shared (C, D) weight
        x, y = _leaf(inputs.x), inputs.labels

        def forward():
            return loss(x, y)

        return Case(_step_of(forward), forward, [x, loss.W], cfg.margin)


def _normalised_logit_inputs(x, w, scale):
    """(s·x̂, ŵ): the inputs that make a plain linear cross-entropy compute s·cos θ."""
    return F.normalize(x, dim=1) * scale, F.normalize(w, dim=1)


class CCE(Provider):
    name = "cce"
    description = "cut_cross_entropy.linear_cross_entropy on s·cos (no margin; its default gradient filtering)"
    fixed_margin = "none"
    cuda_only = True

    def unavailable(self):
        return _import_error("cut_cross_entropy", "cut-cross-entropy")

    def too_large(self, cfg):
        # Seen on an H200 (cut-cross-entropy 25.1.1, 2026-11-27): C = 4M, D = 512 ran, C = 10M
        # raised an illegal memory access that breaks the CUDA context: 32-bit offsets into W.
        if cfg.C * cfg.D >= 2**31:
            return (f"C·D = {cfg.C * cfg.D:.3g} ≥ 2^31: cut-cross-entropy's kernels index the classifier with "
                    "32-bit offsets (an illegal memory access at C = 10M, D = 512 on an H200)")
        return None

    def build(self, inputs, spec):
        from cut_cross_entropy import linear_cross_entropy

        x, w, y = _leaf(inputs.x), _leaf(inputs.w), inputs.labels
        scale = inputs.cfg.scale

        def forward():
            e, c = _normalised_logit_inputs(x, w, scale)
            return linear_cross_entropy(e, c, y)

        return Case(_step_of(forward), forward, [x, w], "none", "no margin")


class Liger(Provider):
    name = "liger"
    description = "Liger-Kernel LigerFusedLinearCrossEntropyLoss on s·cos (no margin)"
    fixed_margin = "none"
    cuda_only = True

    def unavailable(self):
        return _import_error("liger_kernel.transformers", "liger-kernel")

    def build(self, inputs, spec):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        x, w, y = _leaf(inputs.x), _leaf(inputs.w), inputs.labels
        scale = inputs.cfg.scale

        def forward():
            e, c = _normalised_logit_inputs(x, w, scale)
            return loss(c, e, y)  # forward(lin_weight, _input, target)

        return Case(_step_of(forward), forward, [x, w], "none", "no margin")


# --------------------------------------------------------------------------------------
# The floor
# --------------------------------------------------------------------------------------

#: classes per GEMM of the floor. A 1024 × 512 × 2M GEMM runs at the tensor cores' peak
#: as well as an unchunked one does, and chunking keeps the floor's (B, C) buffers from
#: crowding the other providers out at C = 10M.
FLOOR_CHUNK = 1 << 21


class Floor3Gemm(Provider):
    name = "floor-3gemm"
    description = "the three GEMMs a fused loss cannot avoid: X·Wᵀ, G·W, Gᵀ·X (benchmark dtype)"

    def row_margin(self, margin):
        return margin  # a property of the shape, filed under the sweep's margin

    def build(self, inputs, spec):
        cfg = inputs.cfg
        x, w = inputs.x, inputs.w
        chunk = min(cfg.C, FLOOR_CHUNK)
        gen = torch.Generator(device=cfg.device)
        gen.manual_seed(1)
        # the incoming gradient of the logits: random, like everything else
        g = (torch.randn(cfg.B, chunk, device=cfg.device, dtype=cfg.dtype, generator=gen) * 1e-3)
        dx = torch.empty(cfg.B, cfg.D, device=cfg.device, dtype=cfg.dtype)
        dw = torch.empty(cfg.C, cfg.D, device=cfg.device, dtype=cfg.dtype)

        def step():
            for c0 in range(0, cfg.C, chunk):
                c1 = min(c0 + chunk, cfg.C)
                wc, gc = w[c0:c1], g[:, : c1 - c0]
                logits = torch.mm(x, wc.t())  # B×D · D×C
                if c0 == 0:
                    torch.mm(gc, wc, out=dx)  # B×C · C×D
                else:
                    dx.addmm_(gc, wc)
                torch.mm(gc.t(), x, out=dw[c0:c1])  # C×B · B×D
                del logits

        def forward():
            step()
            return torch.zeros((), device=cfg.device)

        # preallocated: the inputs' gradients and G count as inputs
        return Case(step, forward, [], cfg.margin, f"chunk={chunk}" if chunk < cfg.C else "", keepalive=(g, dx, dw))


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        MarginKit(),
        MarginKitFast(),
        MarginKitTorch(),
        TorchTextbook(),
        TorchCompile(),
        PML(),
        CCE(),
        Liger(),
        Floor3Gemm(),
    )
}
assert tuple(PROVIDERS) == (
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


def get_provider(name: str) -> Provider:
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
    return PROVIDERS[name]
