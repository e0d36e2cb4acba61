"""The forward and backward passes over one weight: input rules, row norms and the kernel
sequence of each pass (the non-target share only; the target column is the caller's).

Public here: ``lse_partials`` and ``grads_from_lse`` of the backend protocol, and
``inverse_norms``. Dtypes: fp32, fp16, bf16 with a weight of the same dtype, or fp16/bf16
embeddings with a float32 (master) weight: the kernels compute in the embeddings' dtype,
casting W tiles in registers (no (C, D) copy), and the weight gradient comes back float32.
float64 inputs are computed in float32 kernels (see ``check_inputs``).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch

from marginkit.backends.common import NORM_EPS
from marginkit.backends.triton import launch
from marginkit.backends.triton.configs import pow2_at_least
from marginkit.backends.triton.launch import INTERPRETED, cdiv, device_guard
from marginkit.backends.triton.launchers import DW, DX, FWD, FWD_STORE, MERGE, PROJECT, ROW_NORMS, SCORES, STORED
from marginkit.cuda_graphs import refuse_cold_capture
from marginkit.errors import FLOAT_DTYPES, HALF_DTYPES, MarginKitTypeError
from marginkit.modulation import NegativeModulation, slope_bound
from marginkit.backends.triton.budget import STORE_GROUP, store_scale, store_width

__all__ = ["lse_partials", "grads_from_lse", "inverse_norms", "check_inputs", "compute_operands"]

#: fp16 workspace: the largest |E| after the κ scaling (well inside fp16's 65 504).
FP16_TARGET_MAX = 2.0**14
#: Rows per program of the lse merge kernel (a bandwidth-bound pass over splits·B floats).
MERGE_BLOCK_ROWS = 128
#: R elements per program of the projection of stored chunks (whole rows of D).
PROJECT_ELEMENTS = 4096
#: fp32 buffer of a stored chunk's raw weight gradient when dW is half precision: the
#: workspace's size, so B = 1024, D = 512 bf16 takes one piece (two launches) per chunk.
STORED_DW_BYTES = launch.WORKSPACE_BYTES


# ----------------------------------------------------------------------------------------
# Input rules
# ----------------------------------------------------------------------------------------
def check_inputs(embeddings: torch.Tensor, weight: torch.Tensor) -> None:
    """Shapes, dtypes and device the kernels take; typed errors naming the argument.

    float64 is accepted for parity with the torch backend but computed in float32 kernels
    (losses ~1e-8, gradients ~1e-6 relative to float64); use backend="torch" for float64 maths.
    """
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings (B, D) and weight (C, D) must share D; got {tuple(embeddings.shape)} and {tuple(weight.shape)}"
        )
    if embeddings.dtype not in FLOAT_DTYPES:
        raise MarginKitTypeError(
            f"embeddings dtype {embeddings.dtype} is not supported by the Triton backend; "
            f"allowed: float32, float16, bfloat16, float64"
        )
    master_weight = weight.dtype == torch.float32 and embeddings.dtype in HALF_DTYPES
    if weight.dtype != embeddings.dtype and not master_weight:
        raise MarginKitTypeError(
            f"weight dtype {weight.dtype} does not go with embeddings dtype {embeddings.dtype}; allowed: the "
            f"embeddings' dtype, or float32 (master weights) with float16/bfloat16 embeddings"
        )
    if weight.device != embeddings.device:
        raise MarginKitTypeError(f"weight is on {weight.device}, embeddings on {embeddings.device}; put both on one device")
    if not embeddings.is_cuda and not INTERPRETED:
        raise ValueError(
            f"the Triton backend needs CUDA tensors, got embeddings on {embeddings.device}; on the CPU it runs only "
            "under TRITON_INTERPRET=1 (set before triton is imported)"
        )


def compute_operands(embeddings: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 runs in float32 (a (C, D) float32 copy); every other dtype pair as it is."""
    if embeddings.dtype == torch.float64:
        return embeddings.float(), weight.float()
    return embeddings, weight


def modulation_args(modulation: Optional[NegativeModulation], fallback: torch.Tensor) -> dict:
    """The kernels' modulation arguments; ``fallback`` fills the unused threshold pointer."""
    if modulation is None:
        return dict(threshold=fallback, quadratic=0.0, linear=0.0, MODULATE=False)
    threshold = modulation.threshold.to(device=fallback.device, dtype=torch.float32).contiguous()
    return dict(
        threshold=threshold, quadratic=float(modulation.quadratic), linear=float(modulation.linear), MODULATE=True
    )


# ----------------------------------------------------------------------------------------
# Passes
# ----------------------------------------------------------------------------------------
def inverse_norms(rows: torch.Tensor, normalize: bool) -> torch.Tensor:
    """1/max(‖row‖, 1e-12) in fp32 for each row of (N, D) (ones when normalize=False).

    The Triton twin of ``common.inverse_norms`` (that one returns the compute dtype).
    """
    num = rows.shape[0]
    if not normalize:
        return torch.ones(num, dtype=torch.float32, device=rows.device)
    out = torch.empty(num, dtype=torch.float32, device=rows.device)
    if num == 0:
        return out
    if rows.shape[1] == 0:
        return out.fill_(1.0 / NORM_EPS)
    block_n = 16 if INTERPRETED else 32
    block_d = min(pow2_at_least(rows.shape[1]), 64 if INTERPRETED else 128)
    with device_guard(rows):
        ROW_NORMS(
            (cdiv(num, block_n),), rows, out, num, rows.shape[1], rows.stride(0), rows.stride(1), NORM_EPS,
            BLOCK_N=block_n, BLOCK_D=block_d, pinned=True,
        )
    return out


def forward(x, w, x_inv, w_inv, labels_local, scale, deterministic=False, modulation=None, store=None, combine=None):
    """(row_max, row_sumexp) (B,) fp32 over the non-target classes of w; x, w as the kernels take them.

    ``store`` (memory-budget mode): (stored (B, n) in x's dtype, tile_max (B, ⌈n/STORE_GROUP⌉)
    fp32, σ) filled for the classes [0, n) (see ``budget.py``); None stores nothing.
    ``combine`` (the single-shard loss): (ψ (B,) float64, losses (B,) float64, losses_out (B,),
    lse (B,) float64) that the merge fills with the loss instead (``lse_merge_kernel``'s COMBINE);
    returns None then.
    """
    num_rows, dim = x.shape
    num_classes = w.shape[0]
    device = x.device
    if combine is None:
        row_max = torch.full((num_rows,), float("-inf"), dtype=torch.float32, device=device)
        row_sumexp = torch.zeros(num_rows, dtype=torch.float32, device=device)
        if num_rows == 0 or num_classes == 0:
            return row_max, row_sumexp
    elif num_rows == 0:
        return None
    labels = _int64_contiguous(labels_local)
    n_splits, per_split = launch.class_splits(num_rows, num_classes, device) if num_classes else (0, 1)
    part_max = torch.empty((max(n_splits, 1), num_rows), dtype=torch.float32, device=device)
    part_sum = torch.empty((max(n_splits, 1), num_rows), dtype=torch.float32, device=device)
    mod = modulation_args(modulation, x_inv)
    storing = store is not None and store[0].shape[1] > 0
    stored, tile_max, sigma = store if storing else (x_inv, x_inv, 1.0)  # unused placeholders
    tma = not storing and launch.tma_operands(x, w)  # the storing forward has no TMA tile set (launchers.py)
    descriptors = (launch.descriptor(x), launch.descriptor(w)) if tma else (None, None)
    with device_guard(x):
        if n_splits:
            (FWD_STORE if storing else FWD)(
                lambda meta: (cdiv(num_rows, meta["BLOCK_B"]), n_splits),
                x, w, x_inv, w_inv, labels, part_max, part_sum, mod["threshold"], stored, tile_max,
                num_rows, num_classes, dim, per_split, stored.shape[1] if storing else 0,
                x.stride(0), x.stride(1), w.stride(0), w.stride(1), stored.stride(0) if storing else 0,
                tile_max.stride(0) if storing else 0,
                float(scale), mod["quadratic"], mod["linear"], float(sigma), launch.b_bucket(num_rows),
                *descriptors, MODULATE=mod["MODULATE"], STORE=storing, STORE_GROUP=STORE_GROUP,
                **launch.dot_meta(x.dtype), pinned=deterministic,
            )
        if combine is None:
            outputs = (row_max, row_sumexp, x_inv, labels, x_inv, x_inv, x_inv)  # the COMBINE pointers unused
        else:
            psi, losses, losses_out, lse = combine
            outputs = (x_inv, x_inv, psi, labels, losses, losses_out, lse)
        MERGE(
            (cdiv(num_rows, MERGE_BLOCK_ROWS),), part_max, part_sum, *outputs, num_rows, n_splits, float(scale),
            BLOCK=MERGE_BLOCK_ROWS, COMBINE=combine is not None, pinned=True,
        )
    return None if combine is not None else (row_max, row_sumexp)


def _int64_contiguous(labels: torch.Tensor) -> torch.Tensor:
    """labels as the kernels read them; no op when they already are (each op is host work on CUDA)."""
    return labels if labels.dtype == torch.int64 and labels.is_contiguous() else labels.to(torch.int64).contiguous()


@functools.lru_cache(maxsize=None)
def _unit_scale(device: torch.device) -> torch.Tensor:
    """A (1,) fp32 one per device, read only: κ = 1 without an allocation per step."""
    refuse_cold_capture("Making the unit workspace scale")  # made in a capture, it would hold 1 only after a replay
    return torch.ones(1, dtype=torch.float32, device=device)


def workspace_scale(dtype, grad_rows, scale, x_inv, w_inv, max_slope: float = 1.0) -> torch.Tensor:
    """Power-of-two scale κ (1,) of the workspace: 1, except for fp16 (largest |E| → 2^14)."""
    device = x_inv.device
    if dtype != torch.float16 or grad_rows.numel() == 0 or w_inv.numel() == 0:
        return _unit_scale(device)
    # |dS| ≤ |g|·s·max|dN/dcos| since p ≤ 1
    row_bound = (grad_rows.float().abs() * scale * x_inv).amax() * max_slope
    bound = (row_bound.double() * w_inv.amax().double()).reshape(1)
    kappa = torch.exp2(torch.floor(torch.log2(FP16_TARGET_MAX / bound)))
    kappa = torch.nan_to_num(kappa, nan=1.0, posinf=2.0**60).clamp(2.0**-60, 2.0**60)
    return kappa.to(torch.float32)


def backward(
    x, w, x_inv, w_inv, labels_local, lse, grad_rows, scale, normalize, deterministic,
    modulation=None, need_weight_grad=True, store=None, deferred_dw=None, finish_grad_x=True,
):
    """Non-target share: (grad_x fp32 (B, D), grad_w (C, D) in w's dtype or None).

    ``store``: the forward's (stored, tile_max, σ) of the memory-budget mode; the chunks it
    covers skip the recompute (``stored_to_workspace_kernel`` fills the workspace instead).
    ``deferred_dw``: a list that receives, instead of running them, the dW work of the stored
    chunks (their dS written over their own columns of ``stored``: the store is spent) and of
    the last chunk processed (a full one: the leftover chunk, if any, is processed first); the
    caller runs them after grad_x is final (``grads_from_lse``).
    ``finish_grad_x=False``: returns (G, grad_w, κ) with G the raw κ-scaled (B, D) fp32 sum, before
    1/κ and the chain rule of x̂ (``target_backward_kernel`` applies both with the target share).
    """
    num_rows, dim = x.shape
    num_classes = w.shape[0]
    device = x.device
    grad_x = torch.zeros((num_rows, dim), dtype=torch.float32, device=device)
    grad_w = torch.empty((num_classes, dim), dtype=w.dtype, device=device) if need_weight_grad else None
    if num_classes == 0 or dim == 0 or num_rows == 0:
        empty = (grad_x, (grad_w.zero_() if need_weight_grad else None))
        return empty if finish_grad_x else (*empty, torch.ones(1, dtype=torch.float32, device=device))

    labels = _int64_contiguous(labels_local)
    lse32 = lse.contiguous()  # float32 or float64: the kernels cast on load (no (B,) copy, no host op)
    grad = grad_rows.contiguous()  # fp32 or fp64: the kernels cast on load and multiply by scale
    mod = modulation_args(modulation, x_inv)
    kappa = workspace_scale(x.dtype, grad, scale, x_inv, w_inv, slope_bound(modulation))
    dot_meta = launch.dot_meta(x.dtype)
    bucket = launch.b_bucket(num_rows)
    n_stored = store[0].shape[1] if store is not None else 0
    column_sums = normalize and need_weight_grad and n_stored < num_classes  # stored chunks need none

    chunk = launch.chunk_classes(num_rows, num_classes, x.element_size())
    block_b = launch.scores_block_b(num_rows)
    row_blocks = cdiv(num_rows, block_b)
    workspace = torch.empty((num_rows, chunk), dtype=x.dtype, device=device)
    colsum = torch.empty((row_blocks, chunk) if column_sums else (1, 1), dtype=torch.float32, device=device)

    splits = launch.dx_splits(num_rows, dim, chunk, deterministic, device)
    k_per_split = launch.split_k_size(chunk, splits)
    use_atomics = (not deterministic) and splits > 1
    if deterministic and splits > 1:
        dx_acc = torch.zeros((splits, num_rows, dim), dtype=torch.float32, device=device)
        dx_strides = (dx_acc.stride(1), dx_acc.stride(2), dx_acc.stride(0))
    else:  # every split adds into grad_x (split stride 0)
        dx_acc, dx_strides = grad_x, (grad_x.stride(0), grad_x.stride(1), 0)

    # TMA operands (tuning(tma=True)): X and W described once per call (each launch sets its own
    # tile on them: a launch encodes a descriptor by value), the workspace per chunk. dW reads only
    # E and X; the recompute and dX read W too (fp32 master weights: dW alone takes descriptors).
    x_desc = launch.descriptor(x) if launch.tma_operands(workspace, x) else None
    w_desc = launch.descriptor(w) if x_desc is not None and launch.tma_operands(w, x) else None
    xw_descs = launch.described_pair(x_desc, w_desc)

    starts = list(range(0, num_classes, chunk))
    if deferred_dw is not None and num_classes % chunk and len(starts) > 1:
        starts = starts[-1:] + starts[:-1]  # the leftover chunk first: the one left live for deferral is full
    with device_guard(x):
        for start in starts:
            n_chunk = min(chunk, num_classes - start)
            n_splits_here = cdiv(n_chunk, k_per_split)
            from_store = start + n_chunk <= n_stored
            # Deferring, a stored chunk's dS overwrites its own columns of `stored` (the STORED kernel
            # reads each element before writing it): still there after the loop, with no second copy
            # and no re-conversion (at B = 1024, 32K bf16 classes a re-run would move 134 MB, ~30 µs
            # at ~4.5 TB/s, 60 % of the ~50 µs dW GEMM it would hide). The last chunk's workspace
            # and column sums stay live too; every other chunk's dW must run before the next chunk.
            ws = store[0][:, start : start + n_chunk] if from_store and deferred_dw is not None else workspace
            if from_store:
                stored, tile_max, sigma = store
                STORED(
                    lambda meta: (cdiv(num_rows, meta["BLOCK_B"]), cdiv(n_chunk, meta["BLOCK_C"])),
                    stored, tile_max, lse32, grad, x_inv, w_inv, kappa, ws,
                    num_rows, start, n_chunk, stored.stride(0), tile_max.stride(0), ws.stride(0),
                    float(scale) / sigma, STORE_GROUP=STORE_GROUP, pinned=True,
                )
            else:
                SCORES(
                    lambda meta: (row_blocks, cdiv(n_chunk, meta["BLOCK_C"])),
                    x, w, x_inv, w_inv, labels, lse32, grad, kappa,
                    workspace, colsum, mod["threshold"],
                    num_rows, dim, start, n_chunk,
                    x.stride(0), x.stride(1), w.stride(0), w.stride(1), workspace.stride(0), colsum.stride(0),
                    float(scale), mod["quadratic"], mod["linear"], bucket,
                    *xw_descs, MODULATE=mod["MODULATE"], NORMALIZE=column_sums, BLOCK_B=block_b, **dot_meta,
                    COLSUM_MMA=column_sums and launch.colsum_mma(workspace.dtype), pinned=deterministic,
                )
            # a stored chunk's slice moves the base: checked again
            described = x_desc is not None and (ws is workspace or launch.tma_operands(ws))
            ws_desc = launch.descriptor(ws, (num_rows, n_chunk)) if described else None
            DX(
                lambda meta: (cdiv(num_rows, meta["BLOCK_M"]), cdiv(dim, meta["BLOCK_N"]), n_splits_here),
                ws, w, dx_acc,
                num_rows, dim, start, n_chunk, k_per_split,
                ws.stride(0), w.stride(0), w.stride(1),
                *dx_strides,
                bucket, *launch.described_pair(ws_desc, w_desc),
                USE_ATOMICS=use_atomics, **dot_meta, pinned=deterministic,
            )
            if not need_weight_grad:
                continue

            def chunk_weight_grad(ws=ws, start=start, n_chunk=n_chunk, from_store=from_store, ws_desc=ws_desc):
                if from_store and normalize:
                    stored_weight_grad(ws, x, w, w_inv, kappa, grad_w, start, n_chunk, deterministic, x_desc)
                    return
                # the same descriptor as dX's: a launch encodes it with its own tile (host side, by value)
                DW(
                    lambda meta: (cdiv(n_chunk, meta["BLOCK_M"]), cdiv(dim, meta["BLOCK_N"])),
                    ws, x, w, w_inv, colsum, kappa, grad_w,
                    num_rows, dim, start, n_chunk, row_blocks,
                    ws.stride(0), x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                    colsum.stride(0), grad_w.stride(0), grad_w.stride(1),
                    bucket, *launch.described_pair(ws_desc, x_desc),
                    NORMALIZE=bool(normalize), **dot_meta, pinned=deterministic,
                )

            if deferred_dw is not None and (from_store or start == starts[-1]):
                deferred_dw.append(chunk_weight_grad)
            else:
                chunk_weight_grad()

    if deterministic and splits > 1:
        grad_x = dx_acc[0].clone()
        for s in range(1, splits):  # fixed order
            grad_x += dx_acc[s]
    if not finish_grad_x:  # the caller's target kernel applies 1/κ and the chain rule (ops.py)
        return grad_x, grad_w, kappa
    grad_x.mul_(1.0 / kappa)  # κ is a power of two: exact
    if normalize:  # dx = G − x̂ (x̂·G): the chain rule of x̂ = x/‖x‖ (G already carries 1/‖x‖)
        x_unit = x.to(torch.float32) * x_inv[:, None]
        grad_x -= x_unit * (x_unit * grad_x).sum(dim=1, keepdim=True)
    return grad_x, grad_w


def stored_weight_grad(workspace, x, w, w_inv, kappa, grad_w, start, n_chunk, deterministic, x_desc=None):
    """dW rows [start, start + n_chunk) of a stored chunk with normalised weights.

    The stored path has no column sums (they came from the recompute), so: R = Eᵀ·X/κ with the
    dW GEMM (fp32), then dW_j = R_j − w_inv_j²·(w_j·R_j)·w_j, since w_j·R_j = Σ_i dS_ij·cos_ij
    (algebraically the recompute path's formula), in fp32 and rounded once into grad_w
    (``project_weight_rows_kernel``: one launch per ≤ 32 MiB piece).
    workspace (B, ≥ n_chunk) holds the chunk's E; ``x_desc``: X's TMA descriptor (None: pointer loads).
    """
    num_rows, dim = x.shape
    in_place = grad_w.dtype == torch.float32  # R goes straight into grad_w
    step = n_chunk if in_place else max(launch.GRANULE, STORED_DW_BYTES // (4 * dim) // launch.GRANULE * launch.GRANULE)
    unused = torch.empty((1, 1), dtype=torch.float32, device=x.device)
    for off in range(0, n_chunk, step):
        n = min(step, n_chunk - off)
        rows = slice(start + off, start + off + n)
        raw = grad_w[rows] if in_place else torch.empty((n, dim), dtype=torch.float32, device=x.device)
        ws = workspace[:, off:]
        ws_desc = launch.descriptor(ws, (num_rows, n)) if x_desc is not None and launch.tma_operands(ws) else None
        DW(
            lambda meta: (cdiv(n, meta["BLOCK_M"]), cdiv(dim, meta["BLOCK_N"])),
            ws, x, w, w_inv, unused, kappa, raw,
            num_rows, dim, 0, n, 1,
            ws.stride(0), x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            unused.stride(0), raw.stride(0), raw.stride(1),
            launch.b_bucket(num_rows), *launch.described_pair(ws_desc, x_desc),
            NORMALIZE=False, **launch.dot_meta(x.dtype), pinned=deterministic,
        )
        out = grad_w[rows]
        block_m, block_d = project_tile(dim)
        PROJECT(
            (cdiv(n, block_m),),
            raw, w[rows], w_inv[rows], out, n, dim, raw.stride(0), w.stride(0), w.stride(1), out.stride(0),
            BLOCK_M=block_m, BLOCK_D=block_d, pinned=True,
        )


def project_tile(dim: int) -> tuple[int, int]:
    """(rows, columns) per program of the projection: whole rows, ~4096 fp32 of R per program
    (2 × 32 registers a thread at 4 warps for D = 512)."""
    block_d = pow2_at_least(dim)
    return max(1, PROJECT_ELEMENTS // block_d), block_d


# ----------------------------------------------------------------------------------------
# The backend protocol's two phases
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def lse_partials(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    scale: float,
    normalize: bool,
    *,
    modulation: Optional[NegativeModulation] = None,
    deterministic: bool = False,
    memory_budget: Optional[float] = 0,
    store: Optional[list] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (max, Σ exp(logit − max)) over this weight's NON-TARGET classes, (B,) float32.

    embeddings (B, D), weight (C, D) (see the module docstring for dtypes); labels_local (B,)
    int64, -1 where the row's target is not here. logit_ij = scale·N(cos_ij) for
    j ≠ labels_local[i] (N the modulation, identity without one); a row with no such class
    gets (−inf, 0). The forward is deterministic either way; ``deterministic=True`` also
    pins the launch config (the bits then match across processes).

    The memory-budget mode: with ``store`` (a list) and ``memory_budget`` (bytes; 0 keeps
    nothing, None: no limit), the exp-scaled logits of as many whole backward chunks of this
    weight as fit (``budget.stored_classes``) are appended to ``store`` as two tensors,
    (B, n) in the compute dtype (a view whose row stride is padded to a multiple of 16
    elements, ``store_width``) and their (B, ⌈n/32⌉) float32 tile maxima (this call's local
    maxima: the backward converts them with the global lse). Hand them to ``grads_from_lse``.
    """
    check_inputs(embeddings, weight)
    x, w = compute_operands(embeddings, weight)
    kept = None
    n_stored, row_stride = (0, 0) if store is None else store_width(
        x.shape[0], w.shape[0], x.element_size(), memory_budget
    )
    if n_stored:
        # a view of (B, row_stride): the deferred GEMMs read it as their dS operand (aligned loads)
        stored = x.new_empty((x.shape[0], row_stride))[:, :n_stored]
        tile_max = x.new_empty((x.shape[0], cdiv(n_stored, STORE_GROUP)), dtype=torch.float32)
        kept = (stored, tile_max, store_scale(x.dtype, slope_bound(modulation)))
        store.extend((stored, tile_max))
    return forward(
        x, w, inverse_norms(x, normalize), inverse_norms(w, normalize), labels_local, scale, deterministic, modulation,
        store=kept,
    )


@torch.no_grad()
def grads_from_lse(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels_local: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    scale: float,
    normalize: bool,
    *,
    need_weight_grad: bool = True,
    modulation: Optional[NegativeModulation] = None,
    deterministic: bool = False,
    store: Sequence[torch.Tensor] = (),
    grad_x_ready: Optional[Callable[[torch.Tensor], None]] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Non-target share of the gradients of Σ_i grad_rows_i·loss_i given the global ``lse`` (B,).

    d loss/d cos_ij = grad_rows_i·scale·exp(scale·N(cos_ij) − lse_i)·N'(cos_ij) for
    j ≠ labels_local[i] (0 on the target column), then the chain rule through both
    normalisations. Returns (grad_embeddings (B, D) float32, grad_weight (C, D) in
    weight.dtype, or None with ``need_weight_grad=False``, which skips the dW GEMM). The
    embedding gradient is this weight's share (sum it over shards). Rows with
    grad_rows == 0 contribute nothing. ``deterministic=True``: bitwise-reproducible dX
    (per-split buffers summed in a fixed order instead of fp32 atomics) and pinned configs.

    ``store``: what ``lse_partials(..., store=[...])`` appended; its chunks skip the recompute.
    ``grad_x_ready``: called once with grad_embeddings as soon as it is final, before the dW
    GEMMs of the stored chunks and of the last chunk processed (a full one when C has more
    than one chunk: the leftover goes first), which run after it returns (a collective started
    there runs behind them). With both, the stored logits are overwritten
    by the gradient in place: a store serves one such backward only.
    """
    check_inputs(embeddings, weight)
    x, w = compute_operands(embeddings, weight)
    kept = None
    if len(store):
        stored, tile_max = store
        if stored.dtype != x.dtype or stored.shape[0] != x.shape[0] or stored.shape[1] > w.shape[0]:
            raise ValueError(
                f"store holds {tuple(stored.shape)} {stored.dtype} logits; this backward needs ({x.shape[0]}, ≤ "
                f"{w.shape[0]}) in {x.dtype}: pass what lse_partials stored for these inputs"
            )
        kept = (stored, tile_max, store_scale(x.dtype, slope_bound(modulation)))
    deferred = [] if grad_x_ready is not None else None
    grad_x, grad_w = backward(
        x, w, inverse_norms(x, normalize), inverse_norms(w, normalize), labels_local,
        lse, grad_rows, scale, normalize, deterministic, modulation, need_weight_grad, store=kept, deferred_dw=deferred,
    )
    if grad_x_ready is not None:
        grad_x_ready(grad_x)
        with device_guard(x):
            for weight_grad in deferred:
                weight_grad()
    return grad_x, (grad_w.to(weight.dtype) if grad_w is not None else None)
