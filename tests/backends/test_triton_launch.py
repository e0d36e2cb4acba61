"""The Triton backend's launch machinery, in pure Python (no kernel runs): the autotuner's
candidate configs and their pruning, and the launcher's caches (the autotuner's picks, then
cached CompiledKernel handles), tested with fake kernel objects since the interpreter has no
autotuner and no CompiledKernel. The GPU twin is test_triton_backend.py's
test_gpu_direct_launch_matches_the_autotuner_path.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from marginkit.backends import triton as tb  # noqa: E402
from marginkit.backends.triton import configs, launch, passes  # noqa: E402
from marginkit.cuda_graphs import CudaGraphWarmupError  # noqa: E402
from marginkit.triton_kernels import lse_partials_kernel, scores_kernel  # noqa: E402


def _fwd_args(dtype, B=1024, D=512):
    x = torch.empty(B, D, dtype=dtype)
    return dict(zip(lse_partials_kernel.arg_names, [x])) | {"B": B, "D": D}


def _tiles(configs_):
    return [(c.num_warps, c.num_stages, c.kwargs["BLOCK_B"], c.kwargs["BLOCK_C"], c.kwargs["BLOCK_K"]) for c in configs_]


def test_configs_whose_pipeline_exceeds_shared_memory_are_pruned(monkeypatch):
    """fp32 tiles take twice bf16's shared memory: on a 227 KiB device (H100/H200) three of the five
    forward configs cannot launch (Triton reports 263168 B and more for them when compiled for
    sm_90), so the autotuner must not spend a compile on each."""
    monkeypatch.setattr(configs, "shared_memory_limit", lambda t: configs.HOPPER_SHARED_MEMORY_BYTES)
    kept_fp32 = _tiles(passes.FWD.prune(configs.FWD_CONFIGS, _fwd_args(torch.float32)))
    assert kept_fp32 == [(8, 3, 128, 128, 64), (4, 4, 64, 128, 64)]  # 3·256·64·4 and 4·192·64·4 = 196608 B
    assert len(passes.FWD.prune(configs.FWD_CONFIGS, _fwd_args(torch.bfloat16))) == len(configs.FWD_CONFIGS)
    # fp32 master weights: W tiles sit in shared memory as fp32, so the fp32 limits apply
    master = _fwd_args(torch.bfloat16) | {"w_ptr": torch.empty(8, 512)}
    master = {k: master[k] for k in ["x_ptr", "w_ptr", "B", "D"]}
    assert _tiles(passes.FWD.prune(configs.FWD_CONFIGS, master)) == kept_fp32
    monkeypatch.setattr(configs, "shared_memory_limit", lambda t: None)  # off CUDA: shape limits only
    assert len(passes.FWD.prune(configs.FWD_CONFIGS, _fwd_args(torch.float32))) == len(configs.FWD_CONFIGS)


def test_fp32_without_tf32_uses_the_fma_tile_set():
    x32, x16 = torch.empty(4, 4), torch.empty(4, 4, dtype=torch.bfloat16)
    assert launch.KernelLauncher.uses_fma((x32,), dict(DOT_PRECISION="ieee"))
    assert not launch.KernelLauncher.uses_fma((x32,), dict(DOT_PRECISION="tf32"))
    assert not launch.KernelLauncher.uses_fma((x16,), dict(DOT_PRECISION="ieee"))
    for launcher in (passes.FWD, passes.SCORES, passes.DX, passes.DW):
        assert max(c.kwargs["BLOCK_K"] for c in launcher.configs["fma"]) == 32  # small K: FMA dot, fast ptxas


def test_pow2_at_least_matches_tritons_next_power_of_2():
    import triton

    for n in [*range(0, 300), 1023, 1024, 1025, 2**20 - 1, 2**20, 2**20 + 1]:
        assert configs.pow2_at_least(n) == max(16, triton.next_power_of_2(max(n, 1)))
        assert configs.pow2_at_least(n, 64) == max(64, triton.next_power_of_2(max(n, 1)))


class FakeCompiledKernel:
    """Stands in for Triton's CompiledKernel: ``handle[grid](*every argument in signature order)``.
    It computes what the fake JIT kernel computes, from the positional arguments alone."""

    def __init__(self, calls, arg_names):
        self.calls, self.arg_names = calls, arg_names

    def __getitem__(self, grid):
        def launch(*args):
            assert len(args) == len(self.arg_names), "every argument, constexprs included"
            self.calls.append(("handle", grid, dict(zip(self.arg_names, args))))
            fake_kernel_body(dict(zip(self.arg_names, args)))
        return launch


def fake_kernel_body(named):
    """What the fake kernels 'compute': ws += scale·BLOCK_C + D (depends on a runtime and a meta arg)."""
    named["ws_ptr"].add_(named["scale"] * named["BLOCK_C"] + named["D"])


def fake_launcher(calls, pick):
    class FakeAutotuner:
        best_config = None
        handle = None  # what its run returns (Triton's: the kernel its last launch ran)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append(("autotuner", kwargs["MODULATE"]))
                self.best_config = pick
                return self.handle
            return run

    class FakeJITKernel:
        arg_names = scores_kernel.arg_names

        def __getitem__(self, grid):
            def run(*args, **meta):
                calls.append(("jit", grid, meta))
                fake_kernel_body({**dict(zip(self.arg_names, args)), **meta})
                return FakeCompiledKernel(calls, self.arg_names)
            return run

    launcher = launch.KernelLauncher(
        scores_kernel, configs.SCORES_CONFIGS, configs.FMA_SCORES_CONFIGS,
        key=["D", "B_BUCKET", "MODULATE", "NORMALIZE"], interp_meta={}, tiles=("BLOCK_B", "BLOCK_C", "BLOCK_K"),
    )
    launcher.fn, launcher.tuned = FakeJITKernel(), {"mma": FakeAutotuner(), "fma": FakeAutotuner()}
    return launcher


def scores_args(chunk_start=0, ws=None):
    names = scores_kernel.arg_names
    args = [torch.empty(4, 8, dtype=torch.bfloat16)] + [0] * (names.index("B_BUCKET"))
    args[names.index("w_ptr")] = torch.empty(4, 8, dtype=torch.bfloat16)
    args[names.index("ws_ptr")] = ws if ws is not None else torch.zeros(3)
    args[names.index("D")] = 512
    args[names.index("chunk_start")] = chunk_start
    args[names.index("scale")] = 2.0
    return args + [None, None]  # x_desc, w_desc: the pointer path


def test_later_launches_of_a_tuning_key_skip_the_autotuner():
    """First launch per key: Triton's autotuner; then its pick, launched through JITFunction.run
    with the pick's meta-parameters, and from then on through the cached compiled handle
    (the GPU-only path, with fakes here)."""
    calls = []
    pick = configs.SCORES_CONFIGS[2]
    launcher = fake_launcher(calls, pick)

    def go(modulate, **over):
        with tb.tuning(**over):
            launcher(lambda meta: (1, 1000 // meta["BLOCK_C"]), *scores_args(), MODULATE=modulate, NORMALIZE=True,
                     BLOCK_B=128, DOT_PRECISION="ieee", UPCAST=False)

    go(False)
    go(False)
    go(False)
    go(True)  # another key: the autotuner again
    go(False, direct_launch=False)
    go(False, compiled_launch=False)
    assert [c[0] for c in calls] == ["autotuner", "jit", "handle", "autotuner", "autotuner", "jit"]
    _, grid, meta = calls[1]
    assert grid == (1, 1000 // pick.kwargs["BLOCK_C"])
    assert meta["num_warps"] == pick.num_warps and meta["num_stages"] == pick.num_stages
    assert meta["BLOCK_C"] == pick.kwargs["BLOCK_C"] and meta["MODULATE"] is False
    _, grid, named = calls[2]
    assert grid == (1, 1000 // pick.kwargs["BLOCK_C"], 1)  # the handle takes a 3-D grid
    assert named["BLOCK_C"] == pick.kwargs["BLOCK_C"] and named["MODULATE"] is False and named["D"] == 512


def test_cached_handle_computes_what_the_normal_launch_computes_and_misses_on_new_specialisation():
    """Same arguments: the handle gives the normal launch's result. A launch that Triton would
    specialise differently (an int no longer divisible by 16, an int equal to 1, a misaligned
    pointer, another dtype) misses the cache and takes the normal path, which adds a handle."""
    calls = []
    launcher = fake_launcher(calls, configs.SCORES_CONFIGS[0])
    meta = dict(MODULATE=False, NORMALIZE=True, BLOCK_B=128, DOT_PRECISION="ieee", UPCAST=False)
    grid = (2, 3)

    def go(**kw):
        launcher(grid, *scores_args(**kw), **meta)

    go()  # autotuner
    normal, cached = torch.zeros(3), torch.zeros(3)
    go(ws=normal)  # JITFunction.run
    go(ws=cached)  # the handle
    assert [c[0] for c in calls[1:]] == ["jit", "handle"] and torch.equal(normal, cached) and normal.abs().sum() > 0
    for variant in (dict(chunk_start=17), dict(chunk_start=1), dict(ws=torch.zeros(4)[1:])):
        before = len(launcher.handles)
        go(**variant)
        assert calls[-1][0] == "jit" and len(launcher.handles) == before + 1, variant
        go(**variant)
        assert calls[-1][0] == "handle", variant
    go(chunk_start=32)  # divisible by 16 like 0: Triton would reuse the kernel, so does the cache
    assert calls[-1][0] == "handle"


def test_specialization_key_follows_tritons_binder():
    """Every distinction Triton's binder makes is a distinction of the cache key (a finer key
    is safe; a coarser one would launch a kernel compiled for other arguments)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    from triton.tools.tensor_descriptor import TensorDescriptor

    operand = torch.zeros(64, 64, dtype=torch.bfloat16)
    descriptors = [TensorDescriptor(t, [64, 64], [64, 1], tile) for t in (operand, operand.half()) for tile in
                   ([16, 16], [16, 32], [32, 16])]
    values = [0, 1, 2, 16, 17, 32, 2**31 - 16, 2**31, 2**31 + 16, -16, -1, 2.5, True, False, None,
              torch.zeros(8), torch.zeros(8)[1:], torch.zeros(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.int64),
              *descriptors]
    for a in values:
        for b in values:
            if launch.specialization_key([a]) == launch.specialization_key([b]):
                triton_a = native_specialize_impl(BaseBackend, a, False, True, True)
                triton_b = native_specialize_impl(BaseBackend, b, False, True, True)
                assert triton_a == triton_b or (triton_a[0] == "constexpr" and a == b), (a, b)


def test_the_autotuners_own_launch_leaves_a_handle_so_one_eager_step_warms_a_capture(monkeypatch):
    """Triton's Autotuner.run returns the kernel its last launch ran (the pick): kept as the handle of the
    pick's plan, so the second launch of the key (inside a CUDA-graph capture, after one eager step)
    compiles and loads nothing."""
    calls = []
    launcher = fake_launcher(calls, configs.SCORES_CONFIGS[1])
    for tuner in launcher.tuned.values():
        tuner.handle = FakeCompiledKernel(calls, scores_kernel.arg_names)
    meta = dict(MODULATE=False, NORMALIZE=True, BLOCK_B=128, DOT_PRECISION="ieee", UPCAST=False)
    launcher((2, 3), *scores_args(), **meta)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    launcher((2, 3), *scores_args(), **meta)  # capturing: a miss would raise CudaGraphWarmupError
    assert [c[0] for c in calls] == ["autotuner", "handle"]
    with pytest.raises(CudaGraphWarmupError, match="Compiling or loading"):
        launcher((2, 3), *scores_args(chunk_start=17), **meta)  # another specialisation: not warm


def test_a_meta_parameter_given_by_the_call_and_a_config_is_an_error():
    launcher = fake_launcher([], configs.SCORES_CONFIGS[0])
    meta = dict(MODULATE=False, NORMALIZE=True, BLOCK_B=128, DOT_PRECISION="ieee", UPCAST=False)
    with pytest.raises(ValueError, match=r"\['BLOCK_C'\] given both by the call and by a config"):
        launcher.launch_config(configs.SCORES_CONFIGS[0], (1, 1), scores_args(), dict(meta, BLOCK_C=64))


def test_autotune_picks_stay_on_disk_unless_tritons_switch_says_no(monkeypatch):
    for value, cached in ((None, True), ("1", True), ("TRUE", True), ("on", True), ("0", False), ("false", False),
                          ("off", False), ("", False)):
        if value is None:
            monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
        else:
            monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", value)
        assert launch.cache_autotuning() is cached, value


def test_marginkit_autotune_ms_shortens_the_autotuners_timing(monkeypatch):
    """The GPU test phase's knob: each config timed for that many ms and its pick kept off the disk;
    Triton's timer when unset."""
    from triton.testing import do_bench

    monkeypatch.delenv(launch.AUTOTUNE_MS_ENV, raising=False)
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    assert launch.autotune_bench() is None
    assert launch.autotune_options() == {"cache_results": True}
    monkeypatch.setenv(launch.AUTOTUNE_MS_ENV, "8")
    bench = launch.autotune_bench()
    assert bench.func is do_bench and bench.keywords == {"warmup": 2.0, "rep": 8.0}
    options = launch.autotune_options()  # short-timed picks never reach the disk cache
    assert options["cache_results"] is False and options["do_bench"].keywords == bench.keywords
    monkeypatch.setattr(launch, "INTERPRETED", False)  # autotuners are built only off the interpreter
    launcher = launch.KernelLauncher(
        scores_kernel, configs.SCORES_CONFIGS, configs.FMA_SCORES_CONFIGS,
        key=["D", "B_BUCKET", "MODULATE", "NORMALIZE"], interp_meta={}, tiles=("BLOCK_B", "BLOCK_C", "BLOCK_K"),
    )
    assert set(launcher.tuned) == {"mma", "fma"}
    for tuner in launcher.tuned.values():
        assert tuner.do_bench.func is do_bench and tuner.do_bench.keywords["rep"] == 8.0
    for bad in ("fast", "0", "-5", "inf", "nan"):
        monkeypatch.setenv(launch.AUTOTUNE_MS_ENV, bad)
        with pytest.raises(ValueError, match=f"MARGINKIT_AUTOTUNE_MS='{bad}': give the milliseconds"):
            launch.autotune_bench()


def test_dw_prefetch_variants_are_timed_only_where_the_projection_runs():
    from marginkit.backends.triton.launchers import DW

    named = {name: 4096 for name in DW.fn.arg_names}
    named["ws_ptr"] = named["x_ptr"] = torch.empty(2, 2, dtype=torch.bfloat16)
    kept = {normalize: DW.prune(configs.DW_CONFIGS, named, NORMALIZE=normalize) for normalize in (True, False)}
    assert len(kept[True]) == len(configs.DW_CONFIGS) and sum(bool(c.kwargs.get("PREFETCH")) for c in kept[True]) == 3
    assert kept[False] == [c for c in configs.DW_CONFIGS if not c.kwargs.get("PREFETCH")]
