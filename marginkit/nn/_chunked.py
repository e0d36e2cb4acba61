"""Small shared pieces of the chunked pure-PyTorch heads in this folder.

CurricularFace (a hook on the negatives) and sub-center ArcFace (a max over K
sub-centers per class) change the non-target logits, which the fused backends
(margin-agnostic by contract: they skip the target column and take every other
logit as ``scale·cos``) cannot express. Those two heads therefore run their own
chunked loop here, following the torch backend's algorithm: an online
log-sum-exp over chunks of classes in the forward, a recompute in the backward,
and the target column's share in float64 through ``backends.common``. The largest
temporary is (B, chunk) with B·chunk ≤ ``CHUNK_ELEMENTS``; nothing (B, C) exists.
"""

from __future__ import annotations

import torch
from torch import nn

from marginkit.backends.common import compute_dtype, inverse_norms


def unit_rows(rows: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows / ‖rows‖ in the compute dtype, 1/‖rows‖)."""
    inv = inverse_norms(rows, normalize)
    return rows.to(compute_dtype(rows)) * inv[:, None], inv


class KeepBufferDtypes(nn.Module):
    """A module whose state buffers keep their dtype under ``.to(dtype)``, ``.half()``,
    ``.bfloat16()``...: running statistics, scales and margins stay float32/float64 while
    parameters follow the requested dtype. Device moves still apply to every buffer."""

    _keep_dtype_buffers: tuple = ()

    def _apply(self, fn, recurse=True):
        saved = {n: self._buffers[n] for n in self._keep_dtype_buffers if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return out
