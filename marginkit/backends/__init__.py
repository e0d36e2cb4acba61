"""The backend registry: which engine computes the (B, C) part of the loss.

Every backend module offers the same three functions (the protocol):

- ``lse_partials(embeddings, weight, labels_local, scale, normalize, *, modulation=None,
  deterministic=False) -> (row_max (B,), row_sumexp (B,))``: non-target softmax partials;
- ``grads_from_lse(embeddings, weight, labels_local, lse, grad_rows, scale, normalize, *,
  need_weight_grad=True, modulation=None, deterministic=False) -> (grad_x, grad_w)``;
- ``row_losses(embeddings, weight, labels_local, target_logit, dtarget, scale, normalize, *,
  modulation=None, deterministic=False) -> losses (B,)``, differentiable in both inputs.

Optional (``_pipeline`` uses them where a backend has them; the Triton backend does):

- ``target_rows(embeddings, weight, labels, ignore_index, form, row_margins, normalize,
  check_labels) -> (labels_local, ψ, dψ/dcos, cos θ_y, label flag)``: the label check and the
  target terms of a spec with an ``angle_form``, in one launch;
- ``mean_loss(losses, labels_local) -> ()``: reduction='mean' over the rows with labels_local >= 0.

``labels_local`` (B,) int64 is the column of each row's target in this weight, -1 when it is
not here. The two phases also take the memory-budget mode and the overlap hook (keywords):
``lse_partials(..., memory_budget=0, store=None)`` appends to the list ``store`` the tensors
its backward can reuse (the exp-scaled logits of the chunks the budget holds: Triton's are
overwritten by the backward, torch's only read), and ``grads_from_lse(..., store=(),
grad_x_ready=None)`` takes them back and calls ``grad_x_ready(grad_x)`` once, as soon as
grad_x is final (Triton: before the deferred dW GEMMs; torch: just before returning). Each backend
says which with ``STORE_SURVIVES_BACKWARD`` (a retained graph's next backward may reuse the store only
where it is True). ``resolve`` is the only place that chooses a backend;
nothing outside this package and ``marginkit._pipeline`` imports a backend module by name.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from marginkit.errors import check_choice

__all__ = ["BACKENDS", "resolve", "resolve_name"]

BACKENDS = ("auto", "triton", "torch")


def resolve_name(name: str, device: torch.device, *, sub_centers: int = 1) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere; check that the choice can run here.

    Sub-center weights (``sub_centers > 1``) run on the torch backend whatever the name:
    the Triton kernels take one weight row per class.
    """
    check_choice("backend", name, BACKENDS)
    if sub_centers > 1:
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors; on the CPU it runs only under the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing triton), or use backend='torch'"
        )
    return name


def resolve(name: str, device: torch.device, *, sub_centers: int = 1) -> ModuleType:
    """The backend module for ``name`` on ``device``; Triton is imported only when chosen."""
    if resolve_name(name, device, sub_centers=sub_centers) == "triton":
        from marginkit.backends import triton as triton_backend  # deferred: importing Triton costs seconds

        return triton_backend
    from marginkit.backends import torch_chunked

    return torch_chunked
