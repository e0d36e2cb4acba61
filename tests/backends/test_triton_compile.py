"""The Triton kernels compile for Hopper (sm_90a) on a machine without a GPU: guards on what
the compiler produced.

The interpreter runs the kernels' arithmetic on the CPU but never sees the GPU code generator.
Here every kernel goes through Triton's real compiler (TTIR → TTGIR → PTX → cubin with the
ptxas bundled in the Triton wheel) for an sm_90 target, with the specialisations a real launch
gets (16-byte aligned pointers, unit inner strides, sizes divisible by 16), and the SASS is read
back with the wheel's cuobjdump. Guards:

1. the GEMM-shaped kernels come out as pipelined wgmma (async copies into multi-stage buffers);
2. no autotune config of any kernel spills registers (local memory / stack = 0), with wgmma;
3. the GEMMs' TMA variants (``tuning(tma=True)``) load their operands with UTMALDG, the pointer
   variants with cp.async;
4. the epilogue of each config the autotuner picked on the H200 stays within a SASS
   instruction budget per output element. Instruction counts are deterministic for one Triton
   version, so the budgets are pinned to the version they were measured with and skipped on any
   other (re-measure with /work/shared/perf-tools' compile_probe.py + epilogue_count.py).

One subprocess compiles everything (the test session imports the kernels in interpreter
mode); a Triton without its CUDA backend, or without cuobjdump for the SASS checks, skips.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from marginkit.backends.triton import configs as tc
from marginkit.backends.triton import launchers

#: The Triton version the epilogue budgets below were measured with (its bundled ptxas).
BUDGET_TRITON_VERSION = "3.9.0"

SCRIPT = textwrap.dedent(
    r"""
    import inspect, json, os, re, subprocess, sys, tempfile
    from concurrent.futures import ProcessPoolExecutor

    UNIT = {"stride_xd", "stride_wd", "stride_od", "stride_dwd", "stride_d"}
    DIV16 = {"B", "D", "n_chunk", "chunk_start", "k_per_split", "classes_per_split", "stride_xb", "stride_wc",
             "stride_ws", "stride_q", "stride_ob", "stride_os", "stride_dwc", "stride_n", "n_stored",
             "stride_stored", "stride_tile_max"}

    def ops_of(sass):
        out = []
        for line in sass.splitlines():
            m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*?);", line)
            if m:
                out.append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
        return out

    def epilogue_length(ops):
        # Forward kernels (epilogue inside the flat loop): the loop body after its last
        # WARPGROUP.DEPBAR ... 0x0 (the wait that drains the MMAs); others: from the main
        # loop's back-branch to EXIT (the method of perf-tools' epilogue_count.py).
        for addr, op, args in ops:
            m = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
            if m and int(m.group(1), 16) < addr:
                lo, hi = int(m.group(1), 16), addr
                body = [o for o in ops if lo <= o[0] <= hi]
                if not any(o[1].startswith("HGMMA") for o in body):
                    continue
                drains = [i for i, o in enumerate(body) if o[1].startswith("WARPGROUP.DEPBAR") and o[2].endswith("0x0")]
                if drains:
                    return len(body) - drains[-1]
                after = [o for o in ops if o[0] > hi]
                return next((i for i, o in enumerate(after) if o[1] == "EXIT"), len(after))
        return None

    def main_loop_length(ops):
        # SASS instructions in the first backward branch's body that holds an HGMMA: one k step
        for addr, op, args in ops:
            m = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
            if m and int(m.group(1), 16) < addr:
                body = [o for o in ops if int(m.group(1), 16) <= o[0] <= addr]
                if any(o[1].startswith("HGMMA") for o in body):
                    return len(body)
        return None

    def compile_job(job):
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        import marginkit.triton_kernels as K

        fn = getattr(K, job["kernel"])
        defaults = {n: p.default for n, p in inspect.signature(fn.fn).parameters.items()
                    if p.default is not inspect.Parameter.empty}  # as the launcher passes them
        consts = dict(defaults, **job["consts"], **{n: 1 for n in fn.arg_names if n in UNIT})
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
                continue
            sig[name] = job["types"].get(name, "i32")
            if sig[name].startswith("*") or name in DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=job["warps"], num_stages=job["stages"]))
        ptx = k.asm["ptx"]
        res = {"wgmma": "wgmma" in ptx, "cp_async": "cp.async" in ptx, "smem": k.metadata.shared}
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(tool):
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "k.cubin")
                with open(path, "wb") as f:
                    f.write(k.asm["cubin"])
                sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
                usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
            ops = ops_of(sass)
            field = lambda name: int(re.search(name + r":(\d+)", usage).group(1))
            length = epilogue_length(ops)
            m, n = job["tile"]
            res.update(regs=field("REG"), stack=field("STACK"), local=field("LOCAL"),
                       hgmma=sum(1 for o in ops if o[1].startswith("HGMMA")),
                       utmaldg=sum(1 for o in ops if o[1].startswith("UTMALDG")),
                       ldgsts=sum(1 for o in ops if o[1].startswith("LDGSTS")), main_loop=main_loop_length(ops),
                       epilogue_per_element=None if length is None else length / (m * n / (32 * job["warps"])))
        return res

    if __name__ == "__main__":
        jobs = json.loads(sys.stdin.read())
        with ProcessPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            results = list(pool.map(compile_job, jobs.values()))
        import triton
        print("RESULT" + json.dumps({"triton": triton.__version__, "jobs": dict(zip(jobs, results))}))
    """
)

# ------------------------------------------------------------------------------------------
# The jobs: kernel, argument types, constexprs, warps/stages, the output tile (for per-element)
# ------------------------------------------------------------------------------------------
F = "*fp32"


def _types(kind, dt, w_dt=None):
    p, wp = "*" + dt, "*" + (w_dt or dt)
    vectors = dict(x_inv_ptr=F, w_inv_ptr=F, threshold_ptr=F, scale="fp32", quadratic="fp32", linear="fp32")
    return {
        "fwd": dict(vectors, x_ptr=p, w_ptr=wp, labels_ptr="*i64", part_max_ptr=F, part_sum_ptr=F, stored_ptr=p,
                    tile_max_ptr=F, store_scale="fp32"),
        "scores": dict(vectors, x_ptr=p, w_ptr=wp, labels_ptr="*i64", lse_ptr=F, grad_ptr=F, kappa_ptr=F,
                       ws_ptr=p, q_ptr=F),
        "dx": dict(ws_ptr=p, w_ptr=wp, out_ptr=F),
        "dw": dict(ws_ptr=p, x_ptr=p, w_ptr=wp, w_inv_ptr=F, q_ptr=F, kappa_ptr=F, dw_ptr=wp),
    }[kind]


KERNELS = {"fwd": "lse_partials_kernel", "scores": "scores_kernel", "dx": "dx_gemm_kernel", "dw": "dw_gemm_kernel"}
FIXED = {  # the constexprs a bf16 ArcFace step passes unless a job says otherwise
    "fwd": dict(MODULATE=False, STORE=False, STORE_GROUP=32, x_desc=None, w_desc=None),
    "scores": dict(MODULATE=False, NORMALIZE=True, BLOCK_B=128, COLSUM_MMA=True, x_desc=None, w_desc=None),
    "dx": dict(USE_ATOMICS=True, a_desc=None, b_desc=None),  # None: the pointer path (no TMA descriptors)
    "dw": dict(NORMALIZE=True, a_desc=None, b_desc=None),
}



def _tile(kind, meta):
    if kind in ("fwd", "scores"):
        return [meta.get("BLOCK_B", 128), meta["BLOCK_C"]]
    return [meta["BLOCK_M"], meta["BLOCK_N"]]


def job(kind, config, dt="bf16", prec="ieee", w_dt=None, **consts):
    meta = dict(config.kwargs)
    merged = dict(FIXED[kind], DOT_PRECISION=prec, UPCAST=False, **meta)
    merged.update(consts)
    return dict(kernel=KERNELS[kind], types=_types(kind, dt, w_dt), consts=merged, warps=config.num_warps,
                stages=config.num_stages, tile=_tile(kind, merged))


def tma_job(kind, config, launcher, dt="bf16", **consts):
    """A config of ``launcher``'s "tma" tile set: its descriptor arguments typed with the config's tiles."""
    spec = job(kind, config, dt, **consts)
    meta = {**spec["consts"], **config.kwargs}
    for position, dims in launcher.descriptor_tiles:
        name = launcher.fn.arg_names[position]
        del spec["consts"][name]
        spec["types"][name] = f"tensordesc<{dt}[{', '.join(str(meta[d]) for d in dims)}]>"
    return spec


def _cfg(warps, stages, **meta):
    return tc.triton.Config(meta, num_warps=warps, num_stages=stages)


def _name(kind, config, suffix=""):
    return f"{kind}{suffix} w{config.num_warps}s{config.num_stages} " + " ".join(
        f"{k[6:]}{v}" if k.startswith("BLOCK_") else k.lower() for k, v in sorted(config.kwargs.items()) if v
    )


def coverage_jobs():
    """Every kernel and variant a launch can ask for, bf16 and fp32 (TF32), master weights, IEEE fp32."""
    jobs = {}
    wide = _cfg(8, 3, BLOCK_B=128, BLOCK_C=128, BLOCK_K=64)
    gemm = _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    for dt, prec in (("bf16", "ieee"), ("fp32", "tf32")):
        for modulate in (False, True):
            suffix = "_modulated" if modulate else ""
            jobs[f"{dt} lse_partials{suffix}"] = job("fwd", wide, dt, prec, MODULATE=modulate)
            jobs[f"{dt} scores{suffix}"] = job("scores", _cfg(8, 3, BLOCK_C=128, BLOCK_K=64), dt, prec, MODULATE=modulate,
                                             COLSUM_MMA=dt == "bf16")
        jobs[f"{dt} lse_partials_store"] = job("fwd", wide, dt, prec, STORE=True)
        jobs[f"{dt} dx_gemm_atomic"] = job("dx", gemm, dt, prec)
        jobs[f"{dt} dx_gemm_owned"] = job("dx", gemm, dt, prec, USE_ATOMICS=False)
        jobs[f"{dt} dw_gemm"] = job("dw", gemm, dt, prec)
    # fp32 master weights: W tiles loaded as fp32, cast to bf16 before wgmma
    jobs["bf16 lse_partials_master"] = job("fwd", wide, "bf16", w_dt="fp32")
    jobs["bf16 scores_master"] = job("scores", _cfg(8, 3, BLOCK_C=128, BLOCK_K=64), "bf16", w_dt="fp32")
    jobs["bf16 dx_gemm_master"] = job("dx", gemm, "bf16", w_dt="fp32")
    jobs["bf16 dw_gemm_master"] = job("dw", gemm, "bf16", w_dt="fp32")
    jobs["bf16 dw_gemm_master_prefetch"] = job("dw", gemm, "bf16", w_dt="fp32", PREFETCH=True)
    # with fp32 master weights dW alone takes TMA operands (E and X are bf16; W is read by pointer)
    master_tma = tma_job("dw", launchers.DW.configs["tma"][0], launchers.DW)
    master_tma["types"].update(w_ptr="*fp32", dw_ptr="*fp32")
    jobs["bf16 dw_gemm_master tma"] = master_tma
    # bandwidth kernels
    jobs["bf16 row_inv_norm"] = dict(kernel="row_inv_norm_kernel", types=dict(x_ptr="*bf16", out_ptr=F, eps="fp32"),
                                     consts=dict(BLOCK_N=32, BLOCK_D=128), warps=4, stages=1, tile=[32, 128])
    merge_types = dict(part_max_ptr=F, part_sum_ptr=F, max_out_ptr=F, sum_out_ptr=F, target_ptr="*fp64",
                       labels_ptr="*i64", loss_ptr="*fp64", loss_out_ptr=F, lse_ptr="*fp64", scale="fp32")
    jobs["bf16 lse_merge"] = dict(kernel="lse_merge_kernel", types=merge_types, consts=dict(BLOCK=128, COMBINE=False),
                                  warps=4, stages=1, tile=[128, 1])
    jobs["bf16 lse_merge_combine"] = dict(kernel="lse_merge_kernel", types=merge_types,
                                          consts=dict(BLOCK=128, COMBINE=True), warps=4, stages=1, tile=[128, 1])
    # the target column (float64 per-row work): ArcFace's form with the label check, and the backward
    # at D = 512 with fp32 master weights
    jobs["bf16 target_terms"] = dict(
        kernel="target_terms_kernel",
        types=dict(x_ptr="*bf16", w_ptr="*fp32", labels_ptr="*i64", margins_ptr="*fp32", labels_out_ptr="*i64",
                   psi_ptr="*fp64", dpsi_ptr="*fp64", cos_ptr="*fp64", flag_ptr="*i64", ignore_index="i64",
                   consts_ptr="*fp64"),
        consts=dict(BLOCK_B=16, BLOCK_D=128, NORMALIZE=True, ANGLE=True, FALLBACK=1, ROW_MARGIN=0,
                    STRAIGHT_THROUGH=False, CHECK_LABELS=True), warps=4, stages=1, tile=[16, 1])
    jobs["bf16 target_backward"] = dict(
        kernel="target_backward_kernel",
        types=dict(x_ptr="*bf16", w_ptr="*fp32", g_ptr=F, kappa_ptr=F, sorted_ptr="*i64", order_ptr="*i64",
                   losses_ptr="*fp64", dpsi_ptr="*fp64", grad_rows_ptr=F, dx_ptr="*bf16", dw_ptr=F,
                   scale="fp32", eps="fp32"),
        consts=dict(BLOCK_D=512, NORMALIZE=True, WEIGHT_GRAD=True), warps=4, stages=1, tile=[1, 512])
    jobs["bf16 masked_mean"] = dict(kernel="masked_mean_kernel", types=dict(losses_ptr=F, labels_ptr="*i64", out_ptr=F),
                                    consts=dict(BLOCK=1024), warps=4, stages=1, tile=[1024, 1])
    jobs["bf16 masked_mean_backward"] = dict(
        kernel="masked_mean_backward_kernel", types=dict(grad_ptr=F, labels_ptr="*i64", grad_rows_ptr=F),
        consts=dict(BLOCK=1024), warps=4, stages=1, tile=[1024, 1])
    jobs["bf16 stored_to_workspace"] = dict(
        kernel="stored_to_workspace_kernel",
        types=dict(stored_ptr="*bf16", tile_max_ptr=F, lse_ptr=F, grad_ptr=F, x_inv_ptr=F, w_inv_ptr=F,
                   kappa_ptr=F, ws_ptr="*bf16", scale_over_sigma="fp32"),
        consts=dict(STORE_GROUP=32, BLOCK_B=128, BLOCK_C=128), warps=4, stages=1, tile=[128, 128])
    jobs["bf16 project_weight_rows"] = dict(
        kernel="project_weight_rows_kernel", types=dict(r_ptr=F, w_ptr="*bf16", w_inv_ptr=F, out_ptr="*bf16"),
        consts=dict(BLOCK_M=8, BLOCK_D=512), warps=4, stages=1, tile=[8, 512])
    # fp32 without TF32: the FMA tile set (first config of each), as the launcher picks it
    jobs["fp32_fma lse_partials"] = job("fwd", tc.FMA_FWD_CONFIGS[0], "fp32")
    jobs["fp32_fma scores"] = job("scores", tc.FMA_SCORES_CONFIGS[0], "fp32", COLSUM_MMA=False)
    jobs["fp32_fma dx_gemm_atomic"] = job("dx", tc.FMA_GEMM_CONFIGS[0], "fp32")
    jobs["fp32_fma dw_gemm"] = job("dw", tc.FMA_GEMM_CONFIGS[0], "fp32")
    return jobs


def autotune_jobs():
    """Every bf16 autotune config of every kernel, with each flag that changes its epilogue."""
    jobs = {}
    for config in tc.FWD_CONFIGS:
        jobs[_name("fwd", config)] = job("fwd", config)
        jobs[_name("fwd", config, "_modulated")] = job("fwd", config, MODULATE=True)
    for config in tc.FWD_STORE_CONFIGS:
        jobs[_name("fwd", config, "_store")] = job("fwd", config, STORE=True)
    for config in tc.SCORES_CONFIGS:
        jobs[_name("scores", config)] = job("scores", config)
        jobs[_name("scores", config, "_modulated")] = job("scores", config, MODULATE=True)
        # fp16 workspaces (and the A/B's colsum_mma=False) sum their columns by a row reduction
        jobs[_name("scores", config, "_fp16")] = job("scores", config, "fp16", COLSUM_MMA=False)
        jobs[_name("scores", config, "_fp16_modulated")] = job("scores", config, "fp16", MODULATE=True,
                                                               COLSUM_MMA=False)
    for config in tc.GEMM_CONFIGS:
        jobs[_name("dx", config)] = job("dx", config)
    for config in tc.DW_CONFIGS:
        jobs[_name("dw", config)] = job("dw", config)
    # the TMA tile sets (tuning(tma=True)): the same tiles with X, W, E through descriptors
    for config in launchers.FWD.configs["tma"]:
        jobs[_name("fwd", config)] = tma_job("fwd", config, launchers.FWD)
        jobs[_name("fwd", config, "_modulated")] = tma_job("fwd", config, launchers.FWD, MODULATE=True)
    for config in launchers.SCORES.configs["tma"]:
        jobs[_name("scores", config)] = tma_job("scores", config, launchers.SCORES)
        jobs[_name("scores", config, "_modulated")] = tma_job("scores", config, launchers.SCORES, MODULATE=True)
        jobs[_name("scores", config, "_fp16")] = tma_job("scores", config, launchers.SCORES, "fp16", COLSUM_MMA=False)
        jobs[_name("scores", config, "_fp16_modulated")] = tma_job("scores", config, launchers.SCORES, "fp16",
                                                                   MODULATE=True, COLSUM_MMA=False)
    for config in launchers.DX.configs["tma"]:
        jobs[_name("dx", config)] = tma_job("dx", config, launchers.DX)
    for config in launchers.DW.configs["tma"]:
        jobs[_name("dw", config)] = tma_job("dw", config, launchers.DW)
    return jobs


#: The autotuner's picks on the H200 (Triton 3.6; benchmarks/results/nvidia-h200-2026-11-27), the
#: forward's with STORE (its pick is not measured yet: the largest non-spilling tile), and the SASS
#: instructions per output element of each one's epilogue measured with Triton 3.9.0 (in
#: parentheses; before the exp2/log2-unit/int32-compare epilogues: forward 18.97, scores 29.48,
#: forward modulated 22.01, scores modulated 35.95), rounded up by ~3 % so that any added
#: instruction per element shows.
PICKED_EPILOGUE_BUDGETS = {
    "fwd": (_cfg(8, 3, BLOCK_B=128, BLOCK_C=256, BLOCK_K=64), {}, 11.8),  # (11.45)
    "fwd_modulated": (_cfg(8, 3, BLOCK_B=128, BLOCK_C=256, BLOCK_K=64), dict(MODULATE=True), 15.9),  # (15.46)
    "fwd_store": (_cfg(8, 3, BLOCK_B=128, BLOCK_C=128, BLOCK_K=64), dict(STORE=True), 17.0),  # (16.52)
    "scores": (_cfg(8, 3, BLOCK_C=128, BLOCK_K=128), {}, 18.8),  # (18.20; 23.17 with a row-reduced colsum)
    "scores_modulated": (_cfg(8, 3, BLOCK_C=128, BLOCK_K=128), dict(MODULATE=True), 27.8),  # (26.95; 30.64)
    "dx": (_cfg(8, 4, BLOCK_M=64, BLOCK_N=256, BLOCK_K=64), {}, 4.5),  # (4.31)
    "dw": (_cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), {}, 10.9),  # (10.52)
}


def picked_jobs():
    return {
        f"picked {name}": job(name.split("_")[0], config, **consts)
        for name, (config, consts, _) in PICKED_EPILOGUE_BUDGETS.items()
    }


@pytest.fixture(scope="module")
def compiled():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as err:  # pragma: no cover - a Triton build without the CUDA backend
        pytest.skip(f"Triton's CUDA backend is not available: {err}")
    jobs = {**coverage_jobs(), **autotune_jobs(), **picked_jobs()}
    unique = {}  # the same kernel specialisation under several names is compiled once
    for name, spec in jobs.items():
        unique.setdefault(json.dumps(spec, sort_keys=True), []).append(name)
    todo = {names[0]: json.loads(key) for key, names in unique.items()}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], input=json.dumps(todo), env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    out = json.loads(line[len("RESULT"):])
    out["jobs"] = {name: out["jobs"][names[0]] for names in unique.values() for name in names}
    return out


def _needs_sass(results):
    if "stack" not in next(iter(results["jobs"].values())):
        pytest.skip("Triton's wheel has no cuobjdump: the SASS checks need it")


def test_kernels_compile_for_hopper_as_pipelined_wgmma(compiled):
    results = compiled["jobs"]
    for dtype in ("bf16", "fp32"):
        names = ["lse_partials", "scores", "lse_partials_modulated", "scores_modulated", "lse_partials_store",
                 "dx_gemm_atomic", "dx_gemm_owned", "dw_gemm"]
        if dtype == "bf16":
            names += ["lse_partials_master", "scores_master", "dx_gemm_master", "dw_gemm_master"]
        for name in names:
            info = results[f"{dtype} {name}"]
            assert info["cp_async"], f"{dtype} {name}: loads not pipelined ({info})"
            assert info["smem"] >= 2 * 128 * 64 * 2, f"{dtype} {name}: fewer than 2 pipeline stages ({info})"
            assert info["wgmma"], f"{dtype} {name}: not lowered to wgmma ({info})"  # fp32: tf32 wgmma
    for name in ("row_inv_norm", "lse_merge", "lse_merge_combine", "stored_to_workspace", "project_weight_rows",
                 "target_terms", "target_backward", "masked_mean", "masked_mean_backward"):  # no MMA, no spill
        info = results[f"bf16 {name}"]
        assert not info["wgmma"] and info.get("stack", 0) == 0, (name, info)
    for name in ("lse_partials", "scores", "dx_gemm_atomic", "dw_gemm"):  # IEEE fp32: FMAs, inside 227 KiB
        info = results[f"fp32_fma {name}"]
        assert not info["wgmma"] and info["smem"] <= tc.HOPPER_SHARED_MEMORY_BYTES, f"fp32 FMA {name}: {info}"


def test_no_autotune_config_spills_and_each_is_wgmma(compiled):
    """Every config the autotuner may try, for each flag that changes the epilogue: no local
    memory (a spill costs ~2x on the kernels' epilogues), HGMMA in the SASS, inside 227 KiB."""
    _needs_sass(compiled)
    jobs = autotune_jobs()
    plain = 2 * len(tc.FWD_CONFIGS) + len(tc.FWD_STORE_CONFIGS) + 4 * len(tc.SCORES_CONFIGS) + len(
        tc.GEMM_CONFIGS
    ) + len(tc.DW_CONFIGS)
    tma = 2 * len(tc.FWD_CONFIGS) + 4 * len(tc.SCORES_TMA_CONFIGS) + len(
        tc.GEMM_CONFIGS
    ) + len(tc.DW_CONFIGS)
    assert len(jobs) == plain + tma
    bad = {}
    for name in jobs:
        info = compiled["jobs"][name]
        if info["stack"] or info["local"] or not info["hgmma"] or info["smem"] > tc.HOPPER_SHARED_MEMORY_BYTES:
            bad[name] = {k: info[k] for k in ("regs", "stack", "local", "hgmma", "smem")}
    assert not bad, f"configs that spill, miss wgmma or exceed shared memory (prune them in configs.py): {bad}"


def test_tma_configs_fetch_their_operands_with_the_copy_engine(compiled):
    """Every TMA config loads its operand tiles with UTMALDG (no per-thread cp.async left), every
    pointer config the reverse, and for the two pure GEMMs what TMA buys shows in the SASS: each k step
    of the main loop issues at most 3/4 of the pointer variant's instructions (Triton 3.9: 0.36-0.61;
    notes/PERF.md)."""
    _needs_sass(compiled)
    for name, info in compiled["jobs"].items():
        if name.endswith(" tma") or " tma " in name:
            assert info["utmaldg"] > 0 and info["ldgsts"] == 0, (name, info)
    for kind, pointer_configs, tma_configs in (("dx", tc.GEMM_CONFIGS, launchers.DX.configs["tma"]),
                                               ("dw", tc.DW_CONFIGS, launchers.DW.configs["tma"])):
        for pointer_config, tma_config in zip(pointer_configs, tma_configs, strict=True):
            pointer = compiled["jobs"][_name(kind, pointer_config)]
            tma = compiled["jobs"][_name(kind, tma_config)]
            assert pointer["utmaldg"] == 0 and pointer["ldgsts"] > 0, (kind, pointer_config, pointer)
            assert tma["main_loop"] <= 0.75 * pointer["main_loop"], (kind, tma_config, tma, pointer)
    for kind, config in (("fwd", tc.FWD_CONFIGS[0]), ("scores", tc.SCORES_CONFIGS[0])):
        info = compiled["jobs"][_name(kind, config)]
        assert info["utmaldg"] == 0 and info["ldgsts"] > 0, (kind, config, info)


def test_picked_configs_stay_within_their_epilogue_budget(compiled):
    """SASS instructions per output element after the main loop's last MMA drain (the forward)
    or after the main loop (the others), as perf-tools' epilogue_count.py counts them."""
    _needs_sass(compiled)
    if compiled["triton"] != BUDGET_TRITON_VERSION:
        pytest.skip(
            f"epilogue budgets were measured with Triton {BUDGET_TRITON_VERSION}, this is {compiled['triton']}: "
            "re-measure them (perf-tools' compile_probe.py --set picked, then epilogue_count.py)"
        )
    over = {}
    for name, (_, _, budget) in PICKED_EPILOGUE_BUDGETS.items():
        info = compiled["jobs"][f"picked {name}"]
        assert info["stack"] == 0 and info["hgmma"] > 0, (name, info)
        per_element = info["epilogue_per_element"]
        assert per_element is not None, f"{name}: no epilogue found in the SASS"
        if per_element > budget:
            over[name] = (round(per_element, 2), budget)
    assert not over, f"epilogues over their instruction budget (per element, budget): {over}"
