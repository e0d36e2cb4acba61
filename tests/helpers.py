"""Shared test data: the margin specs every backend is checked with, error measures, a host-read counter and a GEMM counter."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import marginkit as mk

# Every spec family, with parameters that exercise their branches.
SPECS = [
    mk.NoMargin(),
    mk.CosFace(0.35),
    mk.ArcFace(0.5),
    mk.ArcFace(0.5, easy_margin=True),
    mk.SphereFace(4.0),
    mk.SphereFace(1.7, lambda_=2.0),
    mk.CombinedMargin(1.2, 0.3, 0.1),
]
GRADIENT_MODES = ["exact", "straight_through"]


def with_gradient(spec, gradient):
    """The same spec with another gradient mode (specs are frozen dataclasses)."""
    import dataclasses

    return dataclasses.replace(spec, gradient=gradient)


def spec_id(spec):
    return repr(spec).replace(" ", "")


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 (absolute error when ref is all zeros)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    diff = (out - ref).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def loss_and_grads(fn, x, w, y, *args, **kwargs):
    """(loss, d loss/d x, d loss/d w) for a loss function of (x, w, y, ...)."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(x, w, y, *args, **kwargs)
    gx, gw = torch.autograd.grad(loss.sum(), (x, w), allow_unused=False)
    return loss.detach(), gx, gw


def make_inputs(B, C, D, dtype=torch.float32, seed=0, ignored=0):
    """Random embeddings, weights (not normalised) and labels; the first `ignored` rows get -100."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, D, generator=g) * 3.0).to(dtype)
    w = (torch.randn(C, D, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    y[:ignored] = -100
    return x, w, y


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops that read a tensor's value on the host (a blocking sync on CUDA)."""

    SYNCS = ("_local_scalar_dense", "is_nonzero", "item", "equal")

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCS:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


class GemmCounter(TorchDispatchMode):
    """Counts the matrix products (mm, addmm, addmm_, bmm) run while it is active."""

    def __init__(self):
        super().__init__()
        self.gemms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.gemms += func.overloadpacket.__name__ in ("mm", "addmm", "addmm_", "bmm")
        return func(*args, **(kwargs or {}))
