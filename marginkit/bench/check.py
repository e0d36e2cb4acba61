"""Correctness before timing: a marginkit row's loss and gradients against float64, at the benchmark shape.

The benchmark times whatever a provider computes, so each checked provider
(``Provider.checked``: marginkit's own rows) first runs one forward + backward
on the benchmark's inputs and is compared with an independent float64 path:

- the margin formula is the benchmark's textbook one
  (:func:`marginkit.bench.textbook.textbook_target_logit`, written from API.md,
  not :mod:`marginkit.specs`), the rest is written out here;
- W is read in chunks of classes, so no (B, C) tensor and no float64 copy of W
  exist (it runs at C = 10M on a GPU as on a CPU at C = 1M);
- one pass with an online log-sum-exp gives every row's loss and every row's
  d/dx; d/dW is compared on a sample of classes (every row's target class
  plus random others), since all B rows contribute to every class's gradient.

The error is the largest of three norm-wise relative errors (loss, d/dx, the
sampled d/dW rows); above :data:`TOLERANCE` for the dtype the row is an
``error`` row, never a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import math

import torch

from marginkit.bench.memory import LiveTensorBytes
from marginkit.bench.textbook import textbook_target_logit

__all__ = ["CheckResult", "TOLERANCE", "check_against_float64", "float64_loss_and_grads"]

#: largest relative error accepted per input dtype: a few units of what the dtype's rounding of
#: s·cos (s = 64) gives; a wrong formula or a missed chunk is off by percents or more.
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-3,
    torch.float16: 5e-2,
    torch.bfloat16: 5e-2,
}

#: float64 elements of one (B, chunk) block of logits (32 MiB): bounds the check's memory
CHUNK_ELEMENTS = 1 << 22
#: classes whose d/dW rows are compared besides the rows' own targets
SAMPLED_CLASSES = 256


@dataclass
class CheckResult:
    max_rel_err: float
    loss_rel_err: float
    grad_x_rel_err: float
    grad_w_rel_err: float
    tolerance: float
    step_s: float  # wall time of the checked forward + backward (the run's first call)
    peak_extra_mib: float = math.nan  # its peak extra memory, when tracked (CPU)

    @property
    def ok(self) -> bool:
        return self.max_rel_err <= self.tolerance

    def summary(self) -> str:
        return (f"max rel err {self.max_rel_err:.2g} vs float64 (loss {self.loss_rel_err:.2g}, "
                f"dX {self.grad_x_rel_err:.2g}, dW {self.grad_w_rel_err:.2g}; tolerance {self.tolerance:g})")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.double() - ref).norm()
    denom = ref.norm()
    return float(diff / denom) if denom > 0 else float(diff)


def _unit_rows(t: torch.Tensor):
    """(t / ‖t‖ row-wise, ‖t‖) in float64."""
    t = t.double()
    norms = t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return t / norms, norms


def _through_normalisation(grad_unit: torch.Tensor, unit: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """d/dt from d/d(t/‖t‖): (g − t̂ (t̂·g)) / ‖t‖."""
    return (grad_unit - unit * (unit * grad_unit).sum(1, keepdim=True)) / norms


def float64_loss_and_grads(x, w, labels, spec, scale: float, classes: torch.Tensor):
    """Mean margin cross-entropy in float64 and its gradients, W read in class chunks.

    x (B, D), w (C, D) any float dtype, labels (B,) in [0, C), classes (K,) int64.
    Returns (loss (), d/dx (B, D), d/dW at ``classes`` (K, D)), all float64.
    """
    B, C = x.shape[0], w.shape[0]
    rows = torch.arange(B, device=x.device)
    x_unit, x_norm = _unit_rows(x)
    w_target_unit, _ = _unit_rows(w[labels])
    cos_target = (x_unit * w_target_unit).sum(1).detach().requires_grad_(True)
    with torch.enable_grad():
        psi = textbook_target_logit(spec, cos_target)
        (dpsi,) = torch.autograd.grad(psi.sum(), cos_target)
    target_logit = scale * psi.detach()

    # online log-sum-exp over the non-target classes, with Σ exp(z − max)·ŵ alongside it
    # a finite start: a chunk holding only a target column (all −inf) must not make inf − inf
    run_max = torch.full((B,), -1e300, dtype=torch.float64, device=x.device)
    run_sum = torch.zeros(B, dtype=torch.float64, device=x.device)
    run_vec = torch.zeros_like(x_unit)
    chunk = max(1, CHUNK_ELEMENTS // B)
    for c0 in range(0, C, chunk):
        c1 = min(c0 + chunk, C)
        w_unit, _ = _unit_rows(w[c0:c1])
        logits = scale * (x_unit @ w_unit.T)
        here = (labels >= c0) & (labels < c1)
        logits[rows[here], labels[here] - c0] = -torch.inf  # the target column is ψ, added below
        new_max = torch.maximum(run_max, logits.max(1).values)
        rescale = torch.exp(run_max - new_max)
        probs = torch.exp(logits - new_max[:, None])
        run_sum = run_sum * rescale + probs.sum(1)
        run_vec = run_vec * rescale[:, None] + probs @ w_unit
        run_max = new_max
    lse = torch.logaddexp(run_max + torch.log(run_sum), target_logit)
    loss = (lse - target_logit).mean()

    # dL/dcos: s·p/B on other classes, s·(p_y − 1)·ψ'/B on the target
    p_target = torch.exp(target_logit - lse)
    grad_target = scale * (p_target - 1.0) * dpsi / B
    grad_x_unit = (scale / B) * run_vec * torch.exp(run_max - lse)[:, None] + grad_target[:, None] * w_target_unit
    grad_x = _through_normalisation(grad_x_unit, x_unit, x_norm)

    w_unit, w_norm = _unit_rows(w[classes])
    probs = torch.exp(scale * (x_unit @ w_unit.T) - lse[:, None])  # (B, K)
    is_target = labels[:, None] == classes[None, :]
    grad_cos = torch.where(is_target, grad_target[:, None], (scale / B) * probs)
    grad_w = _through_normalisation(grad_cos.T @ x_unit, w_unit, w_norm)
    return loss, grad_x, grad_w


def sampled_classes(labels: torch.Tensor, C: int, seed: int = 0) -> torch.Tensor:
    """Every row's target class and up to SAMPLED_CLASSES random others, sorted, unique."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    others = torch.randint(0, C, (min(SAMPLED_CLASSES, C),), generator=gen).to(labels.device)
    return torch.unique(torch.cat([labels, others]))


def check_against_float64(case, inputs, spec, *, track_memory: bool = False) -> CheckResult:
    """Run ``case`` forward + backward once and compare with :func:`float64_loss_and_grads`.

    ``case.params`` must be the [embeddings, weight] leaves (as marginkit's providers build them).
    ``track_memory`` (CPU): that step runs under the live-tensor tracker, so it is also the
    run's memory measurement (one step fewer per checked run).
    """
    x_leaf, w_leaf = case.params
    x_leaf.grad = w_leaf.grad = None
    device = inputs.x.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tracker = LiveTensorBytes(exclude=[inputs.x, inputs.w, inputs.labels, x_leaf, w_leaf])
    t0 = time.perf_counter()
    if track_memory:
        with tracker:
            loss = case.forward()
            loss.backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in case.params if p.grad is not None)
        peak_extra_mib = max(0, tracker.peak - grads) / 2**20
    else:
        loss = case.forward()
        loss.backward()
        peak_extra_mib = math.nan
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = time.perf_counter() - t0
    classes = sampled_classes(inputs.labels, inputs.cfg.C)
    with torch.no_grad():
        ref_loss, ref_gx, ref_gw = float64_loss_and_grads(inputs.x, inputs.w, inputs.labels, spec,
                                                          inputs.cfg.scale, classes)
        errors = (
            _rel(loss.detach().reshape(()), ref_loss),
            _rel(x_leaf.grad, ref_gx) if x_leaf.grad is not None else float("inf"),
            _rel(w_leaf.grad[classes], ref_gw) if w_leaf.grad is not None else float("inf"),
        )
    x_leaf.grad = w_leaf.grad = None
    worst = max(errors) if all(e == e for e in errors) else float("nan")
    tolerance = TOLERANCE.get(inputs.x.dtype, 5e-2)
    return CheckResult(worst, *errors, tolerance=tolerance, step_s=step_s, peak_extra_mib=peak_extra_mib)
