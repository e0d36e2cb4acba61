"""Launching the Triton kernels: the launcher with its caches, and the launch-shape rules.

``KernelLauncher`` launches one kernel three ways: under the interpreter with one fixed
small config; on a GPU through Triton's autotuner the first time a tuning key is seen;
afterwards with the autotuner's pick (or, in deterministic mode, the first config that
fits), through a cached ``CompiledKernel`` handle when Triton would specialise the call
exactly as an earlier one, else through ``JITFunction.run`` (which returns the handle).
The shape rules (class splits, backward chunk, dX split-K, B buckets) sit below it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from typing import Iterator

import torch
import triton

from marginkit.backends.triton.configs import pow2_at_least, pruner
from marginkit.cuda_graphs import refuse_cold_capture
from marginkit.triton_kernels import lse_partials_kernel

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the GEMMs keep their pointer loads
    TensorDescriptor = None

__all__ = ["INTERPRETED", "KernelLauncher", "tuning", "cdiv", "specialization_key"]

# Kernels are InterpretedFunction objects when TRITON_INTERPRET=1 was set before import.
INTERPRETED = type(lse_partials_kernel).__name__ == "InterpretedFunction"

#: Class granule: splits, chunks and split-K ranges are multiples of the largest class tile.
GPU_GRANULE = 256
GRANULE = 32 if INTERPRETED else GPU_GRANULE
#: Budget of the backward's dS workspace (elements of the compute dtype × their size).
WORKSPACE_BYTES = 32 << 20
#: Cap on the deterministic mode's per-split dX buffers.
MAX_SPLIT_BUFFER_BYTES = 16 << 20
#: Most dX split-K ways: past 8 the per-split fp32 traffic outweighs the extra SMs filled.
MAX_DX_SPLITS = 8
#: Largest B bucket of the autotuning key (larger batches tile alike).
MAX_B_BUCKET = 1 << 16
#: Rows per forward program in the split heuristic, and per dX output tile (the largest tiles).
ROWS_PER_TILE = 128
#: A TMA descriptor's tile until the launcher sets its config's (any valid tile).
_PLACEHOLDER_TILE = [16, 16]
#: SM count assumed off CUDA (only sizes the interpreter's grids).
CPU_SM_COUNT = 4

# Test/benchmark overrides of launcher choices (see ``tuning``).
_overrides: dict = {}
_TUNING_KEYS = {"class_splits", "chunk_classes", "dx_splits", "direct_launch", "compiled_launch", "colsum_mma", "tma"}


@contextlib.contextmanager
def tuning(**kwargs) -> Iterator[None]:
    """Temporarily override launcher choices (tests, benchmarks).

    Keys: ``class_splits`` (forward class splits), ``chunk_classes`` (backward chunk),
    ``dx_splits`` (split-K of the dX GEMM), ``direct_launch`` (False: every launch through
    Triton's autotuner), ``compiled_launch`` (False: no cached ``CompiledKernel`` handles,
    every direct launch through ``JITFunction.run``), ``colsum_mma`` (False: the scores kernel's
    column sums as a row reduction, as before it used the tensor cores), ``tma`` (True: the
    GEMM-shaped kernels take their operands through TMA descriptors where the operands allow it; off
    by default until a GPU A/B decides); the last four are for A/B timing.
    """
    unknown = set(kwargs) - _TUNING_KEYS
    if unknown:
        raise ValueError(f"tuning: unknown keys {sorted(unknown)}; allowed: {sorted(_TUNING_KEYS)}")
    saved = dict(_overrides)
    _overrides.update({k: v for k, v in kwargs.items() if v is not None})
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function in Triton 3.9: ~10 µs a host call


def _round_up(n: int, m: int) -> int:
    return cdiv(n, m) * m


# ----------------------------------------------------------------------------------------
# The launcher
# ----------------------------------------------------------------------------------------
def specialization_key(args, _tensor=torch.Tensor, _descriptor=TensorDescriptor or ()) -> tuple:
    """What Triton's binder specialises a launch's runtime arguments on, one entry per argument
    (a finer key is safe: it only splits the cache): a tensor's dtype and 16-byte alignment; an
    int's divisibility by 16, == 1 (then a constexpr) and width (v >> 31 is 0 or -1 in int32);
    a TMA descriptor's dtype and tile; a bool, float or None by type alone (Triton passes the first
    two as u1 / fp32 whatever their value). One comprehension, no call per argument: this runs on
    every launch."""
    return tuple([
        (a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, _tensor)
        else (a & 15 == 0, a == 1, a >> 31) if type(a) is int
        else a if a is None
        else (a.base.dtype, *a.block_shape) if isinstance(a, _descriptor)
        else type(a)
        for a in args
    ])


class KernelLauncher:
    """A kernel with its autotuner (GPU) or its fixed interpreter config, and its caches.

    ``picked``: tuning key -> the autotuner's config, recorded at the first launch of the key.
    ``plans``: per config and call-site keywords, the merged meta-parameters (built once).
    ``handles``: specialisation key -> the ``CompiledKernel`` of a direct launch; later
    launches with the same key call the handle (``handle[grid](*every argument in signature
    order)``), skipping the binder, the specialisation and the kernel-cache lookup of
    ``JITFunction.run`` (host µs per launch in notes/PERF.md). A key miss takes the normal
    path, whose return value fills the cache.

    ``pinned=True`` (deterministic mode) skips the autotuner and launches the first config
    that fits the shape: tile sizes fix the fp32 summation order, so pinning them makes the
    bits identical across processes, not only within one.

    Tile sets (``configs``, one autotuner each): "mma" (tensor cores), "fma" (fp32 without
    TF32) and, for a kernel with ``descriptors`` (argument name -> the meta-parameters of its tile),
    "tma": the "mma" tiles (or ``tma_configs``) with TMA=True, taken when the call passes
    descriptors for those arguments (``tma_operands``/``descriptor``) rather than None. A launch
    gives each descriptor its config's tile (a config's pre_hook under Triton's autotuner, the
    launcher itself otherwise).
    """

    def __init__(self, fn, configs, fma_configs, key, interp_meta, tiles, limits=None, restore_value=(),
                 descriptors=None, tma_configs=None):
        self.fn = fn
        self.name = fn.__name__
        self.interp_meta = interp_meta
        # TMA operands: (argument position, the meta-parameters of its tile)
        self.descriptor_tiles = [(fn.arg_names.index(name), dims) for name, dims in (descriptors or {}).items()]
        self.configs = {"mma": configs, "fma": fma_configs}
        if self.descriptor_tiles:
            self.configs["tma"] = [
                triton.Config({**c.kwargs, "TMA": True}, num_warps=c.num_warps, num_stages=c.num_stages,
                              pre_hook=self._tile_descriptors)
                for c in (tma_configs or configs)
            ]
        self.prune = pruner(limits or {}, tiles)
        self.key_positions = [(name, fn.arg_names.index(name)) for name in key]
        self.picked = {}
        self.pinned_configs = {}
        self.plans = {}  # (config id, call-site kwargs) -> (meta, constexpr values, plan id, the config)
        # parameters with a default (a config may leave them out): handles take every argument
        self.defaults = {
            name: p.default for name, p in inspect.signature(fn.fn).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        self.handles = {}
        self.tuned = None
        if not INTERPRETED:
            kwargs = dict(key=key, restore_value=list(restore_value),
                          prune_configs_by={"early_config_prune": self.prune}, **autotune_options())
            self.tuned = {name: triton.autotune(configs=c, **kwargs)(fn) for name, c in self.configs.items()}

    @staticmethod
    def uses_fma(args, kwargs) -> bool:
        """fp32 operands with an IEEE dot: no tensor cores, so the FMA tile set."""
        return kwargs.get("DOT_PRECISION") == "ieee" and args[0].dtype == torch.float32

    def tile_set(self, args, kwargs) -> str:
        """"tma" when the call passes TMA descriptors, "fma" for fp32 without TF32, else "mma"."""
        if self.descriptor_tiles:
            described = [args[position] is not None for position, _ in self.descriptor_tiles]
            if all(described):
                return "tma"
            if any(described):
                raise ValueError(f"{self.name}: pass a TMA descriptor for every operand or for none")
        return "fma" if self.uses_fma(args, kwargs) else "mma"

    def tuning_key(self, tile_set, args, kwargs) -> tuple:
        """What the autotuner keys on (its key arguments, the operands' dtypes) and the tile set."""
        values = tuple(args[i] if i < len(args) else kwargs[name] for name, i in self.key_positions)
        return (tile_set, args[0].dtype, args[1].dtype) + values

    def __call__(self, grid, *args, pinned=False, **kwargs):
        tile_set = self.tile_set(args, kwargs)
        if self.tuned is None:
            meta = {**self.interp_meta, **kwargs, **({"TMA": True} if tile_set == "tma" else {})}
            self.set_descriptor_tiles(args, meta)
            self.fn[grid(meta) if callable(grid) else grid](*args, **meta)
            return
        key = self.tuning_key(tile_set, args, kwargs)
        if pinned:
            config = self.pinned_configs.get(key)
            if config is None:
                config = self.prune(self.configs[tile_set], dict(zip(self.fn.arg_names, args)), **kwargs)[0]
                self.pinned_configs[key] = config
        else:
            config = self.picked.get(key) if _overrides.get("direct_launch", True) else None
            if config is None:
                refuse_cold_capture("Autotuning")  # it times every config: syncs
                tuner = self.tuned[tile_set]
                handle = tuner[grid](*args, **kwargs)
                self.picked[key] = tuner.best_config
                if handle is not None and _overrides.get("direct_launch", True):  # its last launch ran the pick:
                    _, _, plan_id, _ = self.plan(tuner.best_config, args, kwargs)  # the next one needs no compile
                    self.handles.setdefault(self.spec(args, plan_id), handle)
                return
        self.launch_config(config, grid, args, kwargs)

    def set_descriptor_tiles(self, args, meta):
        """Give each TMA descriptor argument the tile of the config being launched (a descriptor's
        tile is part of what the kernel is compiled for; it is made per call with a placeholder)."""
        for position, dims in self.descriptor_tiles:
            if args[position] is not None:
                args[position].block_shape = [meta[d] for d in dims]

    def _tile_descriptors(self, nargs):
        """A config's pre_hook under Triton's autotuner (``nargs``: every argument and meta-parameter)."""
        names = self.fn.arg_names
        self.set_descriptor_tiles([nargs.get(name) for name in names], nargs)

    def plan(self, config, args, kwargs) -> tuple:
        """(meta, the arguments after ``args`` in signature order, plan id, config), made once per config and
        call-site keywords."""
        plan_key = (id(config), *kwargs.items())
        plan = self.plans.get(plan_key)
        if plan is None or plan[3] is not config:  # the config kept in the plan: its id cannot be reused
            clash = set(kwargs) & set(config.kwargs)
            if clash:
                raise ValueError(f"{self.name}: {sorted(clash)} given both by the call and by a config")
            meta = {**self.defaults, **kwargs, **config.kwargs, "num_warps": config.num_warps,
                    "num_stages": config.num_stages}
            if config.num_ctas != 1:
                meta["num_ctas"] = config.num_ctas
            # CompiledKernel launches take every argument in signature order, constexprs included.
            constexprs = tuple(meta[name] for name in self.fn.arg_names[len(args):])
            plan = self.plans[plan_key] = (meta, constexprs, len(self.plans), config)
        return plan

    @staticmethod
    def spec(args, plan_id) -> tuple:
        """The handle cache's key: Triton caches kernels per device; the plan fixes every constexpr and option."""
        return (*specialization_key(args), plan_id, args[0].get_device())

    def launch_config(self, config, grid, args, kwargs):
        """Launch with ``config``'s meta-parameters: through a cached handle when one matches."""
        meta, constexprs, plan_id, _ = self.plan(config, args, kwargs)
        if "TMA" in config.kwargs:
            self.set_descriptor_tiles(args, meta)
        grid = grid(meta) if callable(grid) else grid
        if not _overrides.get("compiled_launch", True):
            self.fn[grid](*args, **meta)
            return
        spec = self.spec(args, plan_id)
        handle = self.handles.get(spec)
        if handle is not None:
            handle[(*grid, 1, 1)[:3]](*args, *constexprs)
            return
        refuse_cold_capture("Compiling or loading a kernel variant")  # module loads do not belong in a graph
        handle = self.fn[grid](*args, **meta)
        if handle is not None:
            self.handles[spec] = handle


# ----------------------------------------------------------------------------------------
# Launch-shape rules
# ----------------------------------------------------------------------------------------
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def b_bucket(num_rows: int) -> int:
    """Power-of-two bucket of B for the autotuning keys."""
    return min(pow2_at_least(num_rows), MAX_B_BUCKET)


def class_splits(num_rows: int, num_classes: int, device: torch.device) -> tuple[int, int]:
    """(number of class splits, classes per split) of the forward grid."""
    if "class_splits" in _overrides:
        wanted = int(_overrides["class_splits"])
    elif INTERPRETED:
        wanted = 2
    else:  # about two programs per SM, each over a long contiguous class range
        wanted = max(1, cdiv(2 * num_sms(device), cdiv(num_rows, ROWS_PER_TILE)))
    per_split = _round_up(cdiv(num_classes, max(wanted, 1)), GRANULE)
    return cdiv(num_classes, per_split), per_split


def chunk_classes(num_rows: int, num_classes: int, element_size: int) -> int:
    """Classes per backward chunk: the (B, chunk) workspace fits ``WORKSPACE_BYTES``."""
    if "chunk_classes" in _overrides:
        chunk = int(_overrides["chunk_classes"])
    else:
        chunk = (WORKSPACE_BYTES // max(num_rows * element_size, 1)) // GRANULE * GRANULE
        chunk = max(chunk, GRANULE)
    return max(1, min(chunk, _round_up(num_classes, GRANULE)))


def scores_block_b(num_rows: int) -> int:
    """Rows per program of the scores kernel (it sizes the column-sum buffer)."""
    if INTERPRETED:
        return 16
    return min(ROWS_PER_TILE, pow2_at_least(num_rows))


def dx_splits(num_rows: int, dim: int, chunk: int, deterministic: bool, device: torch.device) -> int:
    """Split-K ways of the dX GEMM; deterministic mode keeps its per-split buffers ≤ 16 MiB."""
    if "dx_splits" in _overrides:
        splits = int(_overrides["dx_splits"])
    elif INTERPRETED:
        splits = 1
    else:  # split K until the (B/128)·(D/128) output tiles fill the SMs
        tiles = cdiv(num_rows, ROWS_PER_TILE) * cdiv(dim, ROWS_PER_TILE)
        splits = max(1, min(MAX_DX_SPLITS, round(num_sms(device) / tiles)))
    splits = max(1, min(splits, cdiv(chunk, GRANULE)))
    if deterministic:
        while splits > 1 and splits * num_rows * dim * 4 > MAX_SPLIT_BUFFER_BYTES:
            splits -= 1
    return splits


def split_k_size(chunk: int, splits: int) -> int:
    """Classes per dX split, a multiple of the granule."""
    return _round_up(cdiv(chunk, splits), GRANULE)


def cache_autotuning() -> bool:
    """Whether autotune picks are kept on disk across processes: yes, unless Triton's own switch
    TRITON_CACHE_AUTOTUNING is set and not true (Triton reads 1/true/on/yes, any case, as true).
    The "tma" tile sets never are: Triton keeps no disk cache for configs with a pre_hook."""
    value = os.environ.get("TRITON_CACHE_AUTOTUNING")
    return value is None or value.strip().lower() in {"1", "true", "on", "yes"}


#: Milliseconds each autotune config is timed for, read when marginkit is imported (unset: Triton's
#: 25 ms warm-up + 100 ms). For test runs on a GPU, where a pick only has to be valid: every new
#: tuning key times every config, in every worker, on one shared GPU.
AUTOTUNE_MS_ENV = "MARGINKIT_AUTOTUNE_MS"


def autotune_bench():
    """The autotuner's timer: None (Triton's) unless ``MARGINKIT_AUTOTUNE_MS`` is set, then
    ``triton.testing.do_bench`` over that many milliseconds (and a quarter of it to warm up)."""
    value = os.environ.get(AUTOTUNE_MS_ENV, "").strip()
    if not value:
        return None
    try:
        rep = float(value)
    except ValueError:
        rep = float("nan")
    if not 0 < rep < float("inf"):
        raise ValueError(
            f"{AUTOTUNE_MS_ENV}={value!r}: give the milliseconds to time each autotune config for, a positive number "
            "(e.g. 5 for a test run), or unset it for Triton's 100 ms"
        )
    from triton.testing import do_bench

    return functools.partial(do_bench, warmup=rep / 4, rep=rep)


def autotune_options() -> dict:
    """``triton.autotune``'s keywords for disk caching and timing. Picks timed short
    (``MARGINKIT_AUTOTUNE_MS``) stay off the disk: Triton's cache key does not hold the timer, so
    a later fully timed run would load them (only ``TRITON_CACHE_AUTOTUNING=1`` overrides this)."""
    bench = autotune_bench()
    options = {} if bench is None else {"do_bench": bench}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = bench is None and cache_autotuning()
    return options


def colsum_mma(workspace_dtype: torch.dtype) -> bool:
    """Whether the scores kernel sums its column terms by a tensor-core product: for bf16 workspaces,
    whose E is rounded to bf16 anyway (fp16 keeps its 3 extra mantissa bits through a row reduction)."""
    return workspace_dtype == torch.bfloat16 and bool(_overrides.get("colsum_mma", True))


def tma_operands(*operands: torch.Tensor) -> bool:
    """Whether a GEMM-shaped kernel takes these operands through TMA descriptors: the TMA path is on
    (``tuning(tma=True)``; off by default until a GPU A/B decides; Triton ≥ 3.4 for host-side
    descriptors), and every operand is 16-bit, of one dtype (fp32 master weights take the pointer
    path) and follows the copy engine's rules (16-byte aligned base and row stride, unit inner stride)."""
    if TensorDescriptor is None or not _overrides.get("tma", False):
        return False
    dtype = operands[0].dtype
    return all(
        t.dtype == dtype and t.element_size() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
        and t.stride(0) * 2 % 16 == 0 and min(t.shape) > 0
        for t in operands
    )


def descriptor(t: torch.Tensor, shape=None):
    """A TMA descriptor of the 2-D ``t`` (an operand ``tma_operands`` accepted) over its leading
    ``shape`` block (default: all of it; the copy engine reads zeros outside). Its tile is set at
    launch, per config (``KernelLauncher(descriptors=...)``)."""
    return TensorDescriptor(t, list(shape or t.shape), [t.stride(0), 1], list(_PLACEHOLDER_TILE))


def described_pair(a, b) -> tuple:
    """(a, b) when both operands have TMA descriptors, else (None, None): a launch takes descriptors for
    every operand or for none (the pointer path)."""
    return (a, b) if a is not None and b is not None else (None, None)


def dot_meta(dtype: torch.dtype) -> dict:
    """The GEMM kernels' dtype-dependent constexprs."""
    # The interpreter multiplies bf16 tiles as raw bits: widen them there (see _mma).
    return dict(DOT_PRECISION=dot_precision(dtype), UPCAST=INTERPRETED and dtype == torch.bfloat16)


def dot_precision(dtype: torch.dtype) -> str:
    """'tf32' for fp32 when torch allows TF32 matmuls, else 'ieee'."""
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    if getattr(matmul, "fp32_precision", "none") == "tf32" or matmul.allow_tf32:
        return "tf32"
    return "ieee"


def device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
