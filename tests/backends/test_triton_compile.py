"""The Triton kernels compile for Hopper (sm_90a) on a machine without a GPU.

The interpreter runs the kernels' arithmetic on the CPU but never sees the GPU code
generator. Here every kernel goes through Triton's real compiler (TTIR → TTGIR → PTX →
cubin with the ptxas bundled in the Triton wheel) for an sm_90 target, with the
specialisations a real launch gets (16-byte aligned pointers, unit inner strides,
sizes divisible by 16), and the GEMM-shaped kernels must come out as pipelined wgmma
(async copies into multi-stage shared buffers). Runs in a subprocess because the test
session imports the kernels in interpreter mode.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from marginkit.triton_kernels import margin_ce as K

    target = GPUTarget("cuda", 90, 32)
    UNIT = {"stride_xd", "stride_wd", "stride_od", "stride_dwd", "stride_d"}
    DIV16 = {"B", "D", "n_chunk", "chunk_start", "k_per_split", "classes_per_split", "stride_xb", "stride_wc",
             "stride_ws", "stride_q", "stride_ob", "stride_os", "stride_dwc", "stride_n"}

    def compile_kernel(fn, types, consts, num_warps, num_stages):
        consts = dict(consts, **{n: 1 for n in fn.arg_names if n in UNIT})
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
                continue
            sig[name] = types.get(name, "i32")
            if sig[name].startswith("*") or name in DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
        k = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
        ptx = k.asm["ptx"]
        return {"wgmma": "wgmma" in ptx, "cp_async": "cp.async" in ptx, "smem": k.metadata.shared}

    out = {}
    for dt, prec in (("bf16", "ieee"), ("fp32", "tf32")):
        P, F = "*" + dt, "*fp32"
        gemm = dict(DOT_PRECISION=prec, UPCAST=False)
        tiles = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
        fwd_types = dict(x_ptr=P, w_ptr=P, x_inv_ptr=F, w_inv_ptr=F, labels_ptr="*i64", part_max_ptr=F,
                         part_sum_ptr=F, threshold_ptr=F, scale="fp32", quadratic="fp32", linear="fp32")
        scores_types = dict(x_ptr=P, w_ptr=P, x_inv_ptr=F, w_inv_ptr=F, labels_ptr="*i64", lse_ptr=F,
                            grad_scaled_ptr=F, kappa_ptr=F, ws_ptr=P, q_ptr=F, threshold_ptr=F, scale="fp32",
                            quadratic="fp32", linear="fp32")
        out[dt] = {}
        for modulate in (False, True):  # plain, and with the negative modulation
            suffix = "_modulated" if modulate else ""
            out[dt]["lse_partials" + suffix] = compile_kernel(
                K.lse_partials_kernel, fwd_types,
                dict(MODULATE=modulate, STORE=False, STORE_GROUP=32, BLOCK_B=128, BLOCK_C=128, BLOCK_K=64, **gemm), 8, 3)
            out[dt]["scores" + suffix] = compile_kernel(
                K.scores_kernel, scores_types,
                dict(MODULATE=modulate, NORMALIZE=True, BLOCK_B=128, BLOCK_C=128, BLOCK_K=64, **gemm), 8, 3)
        out[dt].update({
            "dx_gemm_atomic": compile_kernel(
                K.dx_gemm_kernel, dict(ws_ptr=P, w_ptr=P, out_ptr=F), dict(USE_ATOMICS=True, **tiles, **gemm), 8, 3),
            "dx_gemm_owned": compile_kernel(
                K.dx_gemm_kernel, dict(ws_ptr=P, w_ptr=P, out_ptr=F), dict(USE_ATOMICS=False, **tiles, **gemm), 8, 3),
            "dw_gemm": compile_kernel(
                K.dw_gemm_kernel,
                dict(ws_ptr=P, x_ptr=P, w_ptr=P, w_inv_ptr=F, q_ptr=F, kappa_ptr=F, dw_ptr=P),
                dict(NORMALIZE=True, **tiles, **gemm), 8, 3),
        })
        if dt == "bf16":  # fp32 master weights: W tiles loaded as fp32, cast to bf16 before wgmma
            master = dict(w_ptr=F)
            out[dt]["lse_partials_master"] = compile_kernel(
                K.lse_partials_kernel, dict(fwd_types, **master),
                dict(MODULATE=False, STORE=False, STORE_GROUP=32, BLOCK_B=128, BLOCK_C=128, BLOCK_K=64, **gemm), 8, 3)
            out[dt]["scores_master"] = compile_kernel(
                K.scores_kernel, dict(scores_types, **master),
                dict(MODULATE=False, NORMALIZE=True, BLOCK_B=128, BLOCK_C=128, BLOCK_K=64, **gemm), 8, 3)
            out[dt]["dx_gemm_master"] = compile_kernel(
                K.dx_gemm_kernel, dict(ws_ptr=P, w_ptr=F, out_ptr=F), dict(USE_ATOMICS=True, **tiles, **gemm), 8, 3)
            out[dt]["dw_gemm_master"] = compile_kernel(
                K.dw_gemm_kernel,
                dict(ws_ptr=P, x_ptr=P, w_ptr=F, w_inv_ptr=F, q_ptr=F, kappa_ptr=F, dw_ptr=F),
                dict(NORMALIZE=True, **tiles, **gemm), 8, 3)
            out[dt]["row_inv_norm"] = compile_kernel(
                K.row_inv_norm_kernel, dict(x_ptr=P, out_ptr=F, eps="fp32"), dict(BLOCK_N=32, BLOCK_D=128), 4, 1)
            out[dt]["lse_merge"] = compile_kernel(
                K.lse_merge_kernel, dict(part_max_ptr=F, part_sum_ptr=F, max_out_ptr=F, sum_out_ptr=F),
                dict(BLOCK=128), 4, 1)
    # fp32 without TF32: the FMA tile set (first config of each), as the launcher picks it
    from marginkit.backends.triton import configs as tc
    P, F, ieee = "*fp32", "*fp32", dict(DOT_PRECISION="ieee", UPCAST=False)
    fwd, sc, gm = tc.FMA_FWD_CONFIGS[0], tc.FMA_SCORES_CONFIGS[0], tc.FMA_GEMM_CONFIGS[0]
    fwd_types = dict(x_ptr=P, w_ptr=P, x_inv_ptr=F, w_inv_ptr=F, labels_ptr="*i64", part_max_ptr=F,
                     part_sum_ptr=F, threshold_ptr=F, scale="fp32", quadratic="fp32", linear="fp32")
    scores_types = dict(x_ptr=P, w_ptr=P, x_inv_ptr=F, w_inv_ptr=F, labels_ptr="*i64", lse_ptr=F,
                        grad_scaled_ptr=F, kappa_ptr=F, ws_ptr=P, q_ptr=F, threshold_ptr=F, scale="fp32",
                        quadratic="fp32", linear="fp32")
    out["fp32_fma"] = {
        "lse_partials": compile_kernel(K.lse_partials_kernel, fwd_types, dict(MODULATE=False, STORE=False, STORE_GROUP=32, **fwd.kwargs, **ieee),
                                       fwd.num_warps, fwd.num_stages),
        "scores": compile_kernel(K.scores_kernel, scores_types,
                                 dict(MODULATE=False, NORMALIZE=True, BLOCK_B=128, **sc.kwargs, **ieee),
                                 sc.num_warps, sc.num_stages),
        "dx_gemm_atomic": compile_kernel(K.dx_gemm_kernel, dict(ws_ptr=P, w_ptr=P, out_ptr=F),
                                         dict(USE_ATOMICS=True, **gm.kwargs, **ieee), gm.num_warps, gm.num_stages),
        "dw_gemm": compile_kernel(K.dw_gemm_kernel,
                                  dict(ws_ptr=P, x_ptr=P, w_ptr=P, w_inv_ptr=F, q_ptr=F, kappa_ptr=F, dw_ptr=P),
                                  dict(NORMALIZE=True, **gm.kwargs, **ieee), gm.num_warps, gm.num_stages),
    }
    print("RESULT" + json.dumps(out))
    """
)


def _compile_all():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as err:  # pragma: no cover - a Triton build without the CUDA backend
        pytest.skip(f"Triton's CUDA backend is not available: {err}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_kernels_compile_for_hopper_as_pipelined_wgmma():
    results = _compile_all()
    for dtype, kernels in ((d, results[d]) for d in ("bf16", "fp32")):
        names = ["lse_partials", "scores", "lse_partials_modulated", "scores_modulated", "dx_gemm_atomic",
                 "dx_gemm_owned", "dw_gemm"]
        if dtype == "bf16":
            names += ["lse_partials_master", "scores_master", "dx_gemm_master", "dw_gemm_master"]
        for name in names:
            info = kernels[name]
            assert info["cp_async"], f"{dtype} {name}: loads not pipelined ({info})"
            assert info["smem"] >= 2 * 128 * 64 * 2, f"{dtype} {name}: fewer than 2 pipeline stages ({info})"
            assert info["wgmma"], f"{dtype} {name}: not lowered to wgmma ({info})"  # fp32: tf32 wgmma
    assert "row_inv_norm" in results["bf16"] and "lse_merge" in results["bf16"]
    for name, info in results["fp32_fma"].items():  # IEEE fp32: FMAs, and well inside 227 KiB
        assert not info["wgmma"] and info["smem"] <= 232448, f"fp32 FMA {name}: {info}"
