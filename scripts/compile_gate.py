"""Ahead-of-time compile gate for fastlayers' Triton kernels: no GPU needed.

Compiles every kernel (GEMM, persistent TMA GEMM (sm_90 only) and the reductions, softmax: single
pass / streaming / split rows, gated linear, cross-entropy) x shipped config x layout x dtype x
epilogue the launchers (fastlayers/backends/triton/) can launch, for sm_90 (H100/H200) and sm_80
(A100), with the installed triton's own compiler and its bundled ptxas, and reports per compiled
kernel the registers per thread, spill bytes and shared memory. Fails (exit 1) when a shipped
config

* does not compile,
* spills registers (any spill store: the kernels are one loop plus an epilogue, and a spill in the
  epilogue of a GEMM tile is as much a sign of a tile too large as one in the loop), or
* needs more shared memory than one block may have on the target (227 KB on sm_90, 163 KB on
  sm_80: such a config fails at launch).

The arguments mimic the JIT's specialisation at a real launch (pointers 16-byte aligned, int
arguments equal to 1 become constants, ints divisible by 16 get the divisibility hint), with the
launcher's constexprs, so the code compiled here is the code a GPU would run.

usage: python scripts/compile_gate.py [--quick] [--targets 90,80] [--jobs N] [--out FILE.md]
           [--filter SUBSTRING]
  --quick   a subset for CI: sm_90 only; per GEMM class the largest config with the heaviest
            fused epilogue and the largest plain config, every split-K config, the reductions,
            four softmax plans (single pass, streaming contiguous and strided, split rows), the
            largest bf16 and fp64 gated configs, the gated backward, the cross-entropy pair and
            the largest fused persistent TMA GEMM (60 kernels, 35 s on the 2-core machine when
            quiet, up to ~60 s when busy).
  --out     write the markdown table there (bench/results/sm90-compile.md for the full run).
  --filter  only the kernels whose "name config" contains SUBSTRING, e.g. a family: "gated",
            "ce_", "softmax", "_split", "gemm lp", "act_grad_bias".
Run from the repository root.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import re
import sys
import time

# Compile for a GPU, never interpret; re-run ptxas for every job so its log (registers, spills)
# is printed even when the kernel is in Triton's cache.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (silences its warning)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastlayers.activations import ACTIVATIONS, SAVE_INPUT, SAVE_OUTPUT  # noqa: E402
from fastlayers.kernels import activations as A  # noqa: E402
from fastlayers.kernels import attention_softmax as AK  # noqa: E402
from fastlayers.kernels import cross_entropy as CE  # noqa: E402
from fastlayers.kernels import gated as GL  # noqa: E402
from fastlayers.kernels import gemm as LA  # noqa: E402
from fastlayers.kernels import gemm_tma as TMA  # noqa: E402
from fastlayers.kernels import linear_grad as LG  # noqa: E402
from fastlayers.kernels import rotary as RT  # noqa: E402
from fastlayers.kernels import softmax as SM  # noqa: E402

# Shared memory one block may use (opt-in maximum), bytes.
SMEM_LIMIT = {90: 232448, 80: 166912}
KERNELS = {
    "gemm": LA.gemm_kernel, "gemm_tma": TMA.tma_gemm_kernel, "act_grad_bias": LG.act_grad_bias_kernel,
    "sum_rows": LG.sum_rows_kernel, "softmax_fwd": SM.softmax_fwd_kernel,
    "softmax_fwd_streaming": SM.softmax_fwd_streaming_kernel, "softmax_bwd": SM.softmax_bwd_kernel,
    "softmax_bwd_streaming": SM.softmax_bwd_streaming_kernel,
    "softmax_fwd_split_stats": SM.softmax_fwd_split_stats_kernel,
    "softmax_fwd_split": SM.softmax_fwd_split_kernel,
    "softmax_bwd_split_stats": SM.softmax_bwd_split_stats_kernel,
    "softmax_bwd_split": SM.softmax_bwd_split_kernel,
    "gated_gemm": GL._gated_gemm_kernel, "gated_grad": GL.gated_grad_kernel,
    "ce_fwd": CE.ce_fwd_kernel, "ce_bwd": CE.ce_bwd_kernel,
}


class Ptr:
    """A pointer argument of element type `dt` ("fp16", "bf16", "fp32", "fp64")."""

    def __init__(self, dt: str):
        self.dt = dt


def source(fn, args: dict) -> ASTSource:
    """ASTSource with the JIT's specialisation of these argument values."""
    missing = set(fn.arg_names) ^ set(args)
    if missing:
        raise TypeError(f"{fn.__name__}: arguments differ from the kernel's: {sorted(missing)}")
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = args[name]
        if param.is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, Ptr):
            sig[name] = "*" + v.dt
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "u1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name}={v!r}")
    return ASTSource(fn, sig, consts, attrs)


def parse_ptxas(log: str) -> dict:
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    spill_st = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    spill_ld = [int(x) for x in re.findall(r"(\d+) bytes spill loads", log)]
    return {"regs": max(regs) if regs else None, "spill_stores": sum(spill_st) if spill_st else None,
            "spill_loads": sum(spill_ld) if spill_ld else None}


def run_job(job: dict) -> dict:
    out = {k: v for k, v in job.items() if k != "args"}
    t0 = time.time()
    log = io.StringIO()
    try:
        src = source(KERNELS[job["kernel"]], job["args"])
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                               options=dict(job["options"]))
        out.update(parse_ptxas(log.getvalue()))
        out["smem"] = int(k.metadata.shared)
        out["scratch"] = int(getattr(k.metadata, "global_scratch_size", 0) or 0)
        ttgir = k.asm.get("ttgir", "")
        out["mma"] = ("wgmma" if "warp_group_dot" in ttgir else
                      "mma" if "nvidia_mma" in ttgir else "fma" if "tt.dot" in ttgir else "")
        problems = []
        if out["regs"] is None or out["spill_stores"] is None:
            problems.append("no ptxas log")
        elif out["spill_stores"] > 0 or out["spill_loads"] > 0:
            problems.append(f"spills {out['spill_stores']}/{out['spill_loads']} B")
        if out["smem"] > SMEM_LIMIT[job["arch"]]:
            problems.append(f"shared memory {out['smem']} > {SMEM_LIMIT[job['arch']]}")
        out["ok"] = not problems
        out["problem"] = "; ".join(problems)
    except Exception as e:  # noqa: BLE001 - any compile failure fails the gate with its message
        msg = str(e).strip().splitlines()
        out.update(ok=False, problem=f"compile error: {type(e).__name__}: {msg[-1] if msg else ''}"[:300])
    out["secs"] = round(time.time() - t0, 1)
    return out


# ----------------------------------------------------------------------------- jobs
def cfg_tag(c) -> str:
    k = c.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{c.num_warps} s{c.num_stages}"


# (name, ACT, HAS_BIAS, STORE_Z): the epilogues the forward GEMM is launched with. Activations that
# save their output store no z; the others (and leaky_relu with a negative slope) store z when the
# backward needs it. Every activation of the one table (fastlayers/activations.py).
SAVES_Z = {a.code for a in ACTIVATIONS.values() if a.saves(-1.0) == SAVE_INPUT}
ACT_NAMES = {a.code: a.name for a in ACTIVATIONS.values()}


# The heaviest epilogues: erf GELU and tanh GELU with bias and z.
HEAVIEST = [(A.GELU.value, True, True), (A.GELU_TANH.value, True, True)]


def fused_epilogues(quick: bool):
    """Every activation with bias (and z where it saves one), and bias alone."""
    if quick:
        return HEAVIEST[:1]
    return [(act, True, act in SAVES_Z) for act in ACT_NAMES]


def gemm_args(dt: str, layout: str, M: int, N: int, K: int, act: int, bias: bool, z: bool,
              precision: str, cfg, split: int = 1) -> dict:
    """The launcher's arguments for one GEMM (see fastlayers/backends/triton/gemm.py `launch_gemm`)."""
    if layout == "fwd":    # x (M, K) row-major @ W^T: W (N, K) row-major seen as (K, N)
        strides = dict(stride_am=K, stride_ak=1, stride_bk=1, stride_bn=K)
    elif layout == "dx":   # dz (M, N') row-major @ W (N', K') row-major
        strides = dict(stride_am=K, stride_ak=1, stride_bk=N, stride_bn=1)
    else:                  # dW: dz^T (N', M') = view of dz with strides (1, N') @ x (M', K')
        strides = dict(stride_am=1, stride_ak=M, stride_bk=N, stride_bn=1)
    acc = tl.float64 if dt == "fp64" else tl.float32
    c_dt = ("fp64" if dt == "fp64" else "fp32") if split > 1 else dt
    layout_code = 2 * int(strides["stride_ak"] == 1) + int(strides["stride_bn"] == 1)
    return dict(
        a_ptr=Ptr(dt), b_ptr=Ptr(dt), c_ptr=Ptr(c_dt), z_ptr=Ptr(dt), bias_ptr=Ptr(dt),
        M=M, N=N, K=K, **strides, stride_cm=N, stride_cn=1, slope_hi=0.01, slope_lo=0.0,
        k_per_split=(K // split if split > 1 else 0), stride_cs=(M * N if split > 1 else 0),
        M_BUCKET=M, N_BUCKET=N, K_BUCKET=K, LAYOUT=layout_code,
        HAS_BIAS=bias, ACT=act, STORE_Z=z, ACC_DTYPE=acc, PRECISION=precision, DOT_FP32=False,
        SPLIT_K=split, **cfg.kwargs)


# (dtype class, data dtype, tl.dot precision) of every GEMM class, main dtype of the class first.
GEMM_CLASSES = [("lp", "bf16", "ieee"), ("lp", "fp16", "ieee"), ("tf32", "fp32", "tf32"),
                ("ieee", "fp32", "ieee"), ("fp64", "fp64", "ieee")]


def gemm_jobs(quick: bool, arch: int):
    jobs = []
    classes = [c for c in GEMM_CLASSES if not (quick and c[1] == "fp16")]
    for dclass, dt, prec in classes:
        for m in (4096, 32, 16):
            n = k = 4096
            for plain in (False, True):
                configs = LA.gemm_configs(dclass, m, plain, arch)
                if quick:
                    configs = configs[:1]
                if plain:
                    work = [("fwd", A.NONE.value, False, False), ("dx", A.NONE.value, False, False),
                            ("dW", A.NONE.value, False, False)]
                else:
                    # every epilogue for the main dtype of the class at large M; elsewhere the
                    # heaviest two (the others need fewer registers)
                    full = not quick and m > LA.SMALL_M_MAX and dt != "fp16"
                    work = [("fwd",) + e for e in (fused_epilogues(False) if full else HEAVIEST)]
                if quick and m != 4096:
                    work = work[:1]
                for c in configs:
                    for layout, act, bias, z in work:
                        epi = ACT_NAMES[act] + ("+bias" if bias else "") + ("+z" if z else "")
                        jobs.append(dict(
                            kernel="gemm", arch=arch, name=f"gemm {dclass} {dt} M={m} {layout} {epi}",
                            config=cfg_tag(c),
                            args=gemm_args(dt, layout, m, n, k, act, bias, z, prec, c),
                            options=dict(num_warps=c.num_warps, num_stages=c.num_stages)))
        c = LA.SPLIT_K_CONFIG[dclass]
        jobs.append(dict(kernel="gemm", arch=arch, name=f"gemm split-K {dclass} {dt} dW", config=cfg_tag(c),
                         args=gemm_args(dt, "dW", 256, 256, 65536, A.NONE.value, False, False,
                                        prec, c, split=8),
                         options=dict(num_warps=c.num_warps, num_stages=c.num_stages)))
    return jobs


def tma_gemm_jobs(quick: bool, arch: int):
    """The persistent TMA GEMM (sm_90+ only): fp16 / bf16, the forward (B = W^T, K-major) and dx
    (B row-major) layouts, plain and fused epilogues. The TMA descriptors are made on the device,
    so nothing about them is needed at compile time (their global scratch is a launch-time
    allocation, reported by the kernel's metadata)."""
    if arch < 90:
        return []
    jobs = []
    M = N = K = 4096
    for dt in (["bf16"] if quick else ["bf16", "fp16"]):
        for plain in ((False,) if quick else (False, True)):
            configs = TMA.tma_gemm_configs(plain)
            if plain:
                work = [("fwd", A.NONE.value, False, False), ("dx", A.NONE.value, False, False)]
            else:
                work = [("fwd",) + e for e in (HEAVIEST[:1] if quick else fused_epilogues(False)
                                               if dt == "bf16" else HEAVIEST)]
            for c in configs[:1] if quick else configs:
                for layout, act, bias, z in work:
                    epi = ACT_NAMES[act] + ("+bias" if bias else "") + ("+z" if z else "")
                    args = dict(
                        a_ptr=Ptr(dt), b_ptr=Ptr(dt), c_ptr=Ptr(dt), z_ptr=Ptr(dt), bias_ptr=Ptr(dt),
                        M=M, N=N, K=K, stride_am=K, stride_b=K if layout == "fwd" else N,
                        stride_cm=N, stride_cn=1, slope_hi=0.01, slope_lo=0.0,
                        M_BUCKET=M, N_BUCKET=N, K_BUCKET=K, HAS_BIAS=bias, ACT=act, STORE_Z=z,
                        B_KMAJOR=layout == "fwd", DOT_FP32=False, **c.kwargs)
                    jobs.append(dict(kernel="gemm_tma", arch=arch, name=f"gemm_tma {dt} M={M} {layout} {epi}",
                                     config=cfg_tag(c), args=args,
                                     options=dict(num_warps=c.num_warps, num_stages=c.num_stages)))
    return jobs


def reduction_jobs(quick: bool):
    jobs = []
    for dt in (["bf16", "fp64"] if quick else ["fp16", "bf16", "fp32", "fp64"]):
        comp = tl.float64 if dt == "fp64" else tl.float32
        pdt = "fp64" if dt == "fp64" else "fp32"
        bm = LG.GRAD_BLOCK_M_FP64 if dt == "fp64" else LG.GRAD_BLOCK_M
        acts = [A.GELU.value] if quick else list(ACT_NAMES)
        for act in acts:
            args = dict(dy_ptr=Ptr(dt), saved_ptr=Ptr(dt), dz_ptr=Ptr(dt), partial_ptr=Ptr(pdt),
                        M=8192, N=4096, rows_per_prog=256, slope_hi=0.01, slope_lo=0.0, ACT=act,
                        STORE_DZ=act != A.NONE.value, NEED_DB=True, COMPUTE_DTYPE=comp,
                        BLOCK_M=bm, BLOCK_N=LG.GRAD_BLOCK_N)
            jobs.append(dict(kernel="act_grad_bias", name=f"act_grad_bias {dt} {ACT_NAMES[act]}",
                             config=f"{bm}x{LG.GRAD_BLOCK_N} w{LG.GRAD_NUM_WARPS}",
                             args=args, options=dict(num_warps=LG.GRAD_NUM_WARPS)))
        args = dict(partial_ptr=Ptr(pdt), out_ptr=Ptr(dt), P=256, N=4096,
                    BLOCK_P=LG.SUM_BLOCK_P, BLOCK_N=LG.SUM_BLOCK_N)
        jobs.append(dict(kernel="sum_rows", name=f"sum_rows {pdt}->{dt}",
                         config=f"{LG.SUM_BLOCK_P}x{LG.SUM_BLOCK_N} w{LG.SUM_NUM_WARPS}",
                         args=args, options=dict(num_warps=LG.SUM_NUM_WARPS)))
    return jobs


def gated_jobs(quick: bool, arch: int):
    """The gated forward GEMM (x and both weights row-major, as nn.Linear's) per dtype class and
    config with both biases and g, u stored: every activation for the main dtype of a class, the
    heaviest two for fp16; and the elementwise backward per dtype and activation."""
    jobs = []
    M = N = K = 4096
    for dclass, dt, prec in GEMM_CLASSES:
        if quick and dt not in ("bf16", "fp64"):
            continue
        configs = GL.GATED_CONFIGS[dclass][:1] if quick else GL.GATED_CONFIGS[dclass]
        acts = ([A.GELU.value] if quick else
                [a for a, _, _ in HEAVIEST] if dt == "fp16" else list(ACT_NAMES))
        for c in configs:
            for act in acts:
                args = dict(
                    x_ptr=Ptr(dt), wg_ptr=Ptr(dt), wu_ptr=Ptr(dt), h_ptr=Ptr(dt), g_ptr=Ptr(dt),
                    u_ptr=Ptr(dt), bg_ptr=Ptr(dt), bu_ptr=Ptr(dt), M=M, N=N, K=K,
                    stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1, stride_vn=K, stride_vk=1,
                    slope_hi=0.01, slope_lo=0.0, M_BUCKET=M, N_BUCKET=N, K_BUCKET=K,
                    HAS_BG=True, HAS_BU=True, ACT=act, STORE_GU=True,
                    ACC_DTYPE=tl.float64 if dt == "fp64" else tl.float32, PRECISION=prec,
                    DOT_FP32=False, **c.kwargs)
                jobs.append(dict(kernel="gated_gemm", arch=arch,
                                 name=f"gated_gemm {dclass} {dt} {ACT_NAMES[act]}+biases+gu",
                                 config=cfg_tag(c), args=args,
                                 options=dict(num_warps=c.num_warps, num_stages=c.num_stages)))
    for dt in (["bf16"] if quick else ["fp16", "bf16", "fp32", "fp64"]):
        pdt = "fp64" if dt == "fp64" else "fp32"
        bm = GL.GRAD_BLOCK_M_FP64 if dt == "fp64" else GL.GRAD_BLOCK_M
        for act in ([A.GELU.value] if quick else list(ACT_NAMES)):
            from_output = next(a for a in ACTIVATIONS.values() if a.code == act).saves(0.01) == SAVE_OUTPUT
            args = dict(dh_ptr=Ptr(dt), g_ptr=Ptr(dt), u_ptr=Ptr(dt), dg_ptr=Ptr(dt), du_ptr=Ptr(dt),
                        pg_ptr=Ptr(pdt), pu_ptr=Ptr(pdt), M=8192, N=4096, rows_per_prog=256,
                        slope_hi=0.01, slope_lo=0.0, ACT=act, FROM_OUTPUT=from_output,
                        NEED_DBG=True, NEED_DBU=True,
                        COMPUTE_DTYPE=tl.float64 if dt == "fp64" else tl.float32,
                        BLOCK_M=bm, BLOCK_N=GL.GRAD_BLOCK_N)
            jobs.append(dict(kernel="gated_grad", arch=arch, name=f"gated_grad {dt} {ACT_NAMES[act]}",
                             config=f"{bm}x{GL.GRAD_BLOCK_N} w{GL.GRAD_NUM_WARPS}",
                             args=args, options=dict(num_warps=GL.GRAD_NUM_WARPS)))
    return jobs


def ce_jobs(quick: bool):
    """Cross-entropy forward and backward per dtype, for class-index and probability targets, with
    and without class weights and label smoothing, at the smallest and the largest chunk."""
    jobs = []
    variants = [(p, w, sm) for p in (False, True) for w in (False, True) for sm in (False, True)]
    for dt in (["bf16"] if quick else ["fp16", "bf16", "fp32", "fp64"]):
        cdt = "fp64" if dt == "fp64" else "fp32"
        for probs, has_w, smooth in (variants[-1:] if quick else variants):
            for C in ((128256,) if quick else (10, 128256)):
                block = CE.block_for(C)
                base = dict(x_ptr=Ptr(dt), t_ptr=Ptr("i64"), q_ptr=Ptr(dt), w_ptr=Ptr(cdt), C=C,
                            ignore_index=-100, eps_hi=0.1, eps_lo=0.0, HAS_W=has_w, PROBS=probs,
                            SMOOTH=smooth, COMPUTE_DTYPE=tl.float64 if dt == "fp64" else tl.float32,
                            BLOCK=block)
                what = (f"{dt} {'probs' if probs else 'index'}{' weight' if has_w else ''}"
                        f"{' smooth' if smooth else ''} C={C}")
                jobs.append(dict(kernel="ce_fwd", name=f"ce_fwd {what}", config=f"block {block} w4",
                                 args=dict(base, loss_ptr=Ptr(cdt), stats_ptr=Ptr(cdt)),
                                 options=dict(num_warps=4)))
                jobs.append(dict(kernel="ce_bwd", name=f"ce_bwd {what}", config=f"block {block} w4",
                                 args=dict(base, stats_ptr=Ptr(cdt), scale_ptr=Ptr(cdt), dx_ptr=Ptr(dt),
                                           col0=C, classes=2 * C + 16, BF16_OUT=dt == "bf16"),
                                 options=dict(num_warps=4)))
    return jobs


# (rows, L, inner): contiguous rows from short to past the single-pass limit, and strided ones;
# long rows too few to fill an H100 / H200 take the split path (SOFTMAX_SMS SMs).
SOFTMAX_SHAPES = [(8192, 128, 1), (8192, 1000, 1), (4096, 4096, 1), (1024, 16384, 1),
                  (512, 32768, 1), (64, 131072, 1), (64, 1024, 3), (64, 1024, 100),
                  (64, 2048, 64), (64, 50257, 8), (8, 131072, 1), (1, 4194304, 1),
                  (4, 65536, 16)]
SOFTMAX_QUICK = [(4096, 4096, 1), (512, 32768, 1), (64, 2048, 64), (8, 131072, 1)]
SOFTMAX_SMS = 132


def softmax_jobs(quick: bool):
    """The kernels the launcher (fastlayers/backends/triton/softmax.py `_softmax_launch`) runs per shape:
    single pass, streaming, or the two kernels of split rows, forward and backward."""
    jobs = []
    for rows, L, inner in (SOFTMAX_QUICK if quick else SOFTMAX_SHAPES):
        for dt in (["bf16"] if quick else ["fp16", "bf16", "fp32", "fp64"]):
            single, br, bl, warps = SM.plan(rows * inner, L, inner, dt == "fp64")
            segments, seg = (1, L) if single else SM.split_plan(rows * inner, L, inner, br, bl, SOFTMAX_SMS)
            comp = tl.float64 if dt == "fp64" else tl.float32
            pdt = "fp64" if dt == "fp64" else "fp32"
            config = f"{br}x{bl} w{warps}"
            for kind in ("fwd", "bwd"):
                for log in ((False,) if quick else (False, True)):
                    base = dict(R=rows * inner, L=L, INNER=inner, COMPUTE_DTYPE=comp,
                                STRIDED=inner > 1, BLOCK_R=br, BLOCK_L=bl)
                    io = (dict(x_ptr=Ptr(dt), y_ptr=Ptr(dt)) if kind == "fwd" else
                          dict(dy_ptr=Ptr(dt), y_ptr=Ptr(dt), dx_ptr=Ptr(dt)))
                    if segments == 1:
                        launches = [(f"softmax_{kind}" + ("" if single else "_streaming"), config,
                                     dict(io, **base, LOG=log))]
                    else:
                        split = dict(base, part_ptr=Ptr(pdt), SEG=seg, S=segments)
                        if kind == "fwd":
                            stats = dict(x_ptr=Ptr(dt), **split)
                        else:
                            stats = dict(dy_ptr=Ptr(dt), y_ptr=Ptr(dt), **split, LOG=log)
                        bs = triton.next_power_of_2(segments)
                        launches = [(f"softmax_{kind}_split_stats", f"{config} S{segments}", stats),
                                    (f"softmax_{kind}_split", f"{config} S{segments}",
                                     dict(io, **split, LOG=log, BLOCK_S=bs))]
                        if kind == "fwd" and log:  # the stats kernel has no LOG: compiled once
                            launches = launches[1:]
                    for kernel, cfg, args in launches:
                        jobs.append(dict(kernel=kernel,
                                         name=f"{kernel} {dt} {'log_softmax' if log else 'softmax'} "
                                              f"L={L} inner={inner}",
                                         config=cfg, args=args, options=dict(num_warps=warps)))
    return jobs


# ----------------------------------------------------------------------------- rotary (kernels/rotary.py)
KERNELS["rotary"] = RT.rotary_kernel
# (R, D, interleaved): Llama 3 / Mistral (128), small models (64), Phi-2's partial rotary (32 of 80),
# GPT-J's interleaved partial rotary (64 of 256).
ROTARY_SHAPES = [(128, 128, False), (64, 64, False), (32, 80, False), (64, 256, True)]


def rotary_jobs(quick: bool):
    """The one rotary kernel, forward and backward (INVERSE), per dtype and head layout, on the
    strides of (B, H, S, D) = (1, 32, 2048, D) transposed views (KV heads 8) and (B, 1, S, R) cos / sin."""
    jobs = []
    shapes = [(128, 128, False), (64, 256, True)] if quick else ROTARY_SHAPES
    for dt in (["bf16"] if quick else ["fp16", "bf16", "fp32", "fp64"]):
        for r, d, il in shapes:
            br, bh, bp, warps = RT.plan(r, d, dt == "fp64")
            for inverse in (False, True):
                if quick and il and inverse:
                    continue
                h, kv, s = 32, 8, 2048
                args = dict(q_ptr=Ptr(dt), oq_ptr=Ptr(dt), cq_ptr=Ptr(dt), sq_ptr=Ptr(dt), k_ptr=Ptr(dt),
                            ok_ptr=Ptr(dt), ck_ptr=Ptr(dt), sk_ptr=Ptr(dt),
                            ROWS_Q=h * s, Q1=h, Q2=s, QS0=s * h * d, QS1=d, QS2=h * d, OQS0=s * h * d, OQS1=d,
                            OQS2=h * d, CQS0=s * r, CQS1=0, CQS2=r, SQS0=s * r, SQS1=0, SQS2=r, DQ=d,
                            ROWS_K=kv * s, K1=kv, K2=s, KS0=s * kv * d, KS1=d, KS2=kv * d, OKS0=s * kv * d,
                            OKS1=d, OKS2=kv * d, CKS0=s * r, CKS1=0, CKS2=r, SKS0=s * r, SKS1=0, SKS2=r, DK=d,
                            R=r, PROGS_Q=h * s // br, INTERLEAVED=il, INVERSE=inverse, BLOCK_ROWS=br,
                            BLOCK_H=bh, BLOCK_P=bp, COMPUTE_DTYPE=tl.float64 if dt == "fp64" else tl.float32)
                jobs.append(dict(kernel="rotary", name=f"rotary {'bwd' if inverse else 'fwd'} {dt} R={r} D={d}"
                                 f"{' interleaved' if il else ''}", config=f"{br}x{bh}+{bp} w{warps}",
                                 args=args, options=dict(num_warps=warps)))
    return jobs


# ----------------------------------------------------------------------------- attention softmax
# (kernels/attention_softmax.py, launched by backends/triton/softmax.py attention_softmax_forward / _backward
# with softmax's plan for inner == 1: single pass up to its limit, streaming beyond.)


KERNELS.update({"attn_fwd": AK.attn_softmax_fwd_kernel, "attn_fwd_streaming": AK.attn_softmax_fwd_streaming_kernel,
                "attn_bwd": AK.attn_softmax_bwd_kernel, "attn_bwd_streaming": AK.attn_softmax_bwd_streaming_kernel})
# (scores dtype, probabilities dtype): the launcher's pairs
ATTN_DTYPES = [("fp32", "fp32"), ("fp64", "fp64"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")]
ATTN_S = [512, 2048, 8192, 32768]  # (B*H*L rows of S): single pass ... streaming
ATTN_QUICK = [("bf16", "bf16", 4096, 1, True), ("bf16", "bf16", 32768, 1, True), ("fp64", "fp64", 4096, 2, False)]


def attn_jobs(quick: bool):
    """Forward and backward per dtype pair, mask kind (0 none, 1 bool, 2 float), causal, row length."""
    jobs = []
    if quick:
        combos = ATTN_QUICK
    else:
        combos = [(t, u, S, kind, causal) for t, u in ATTN_DTYPES for S in ATTN_S for kind in (0, 1, 2)
                  for causal in (False, True) if not (kind == 2 and t != u)]
    for t, u, S, kind, causal in combos:
        H, L = 16, S
        R = 2 * H * L
        single, br, bl, warps = SM.plan(R, S, 1, t == "fp64")
        comp = tl.float64 if t == "fp64" else tl.float32
        mdt = "u8" if kind == 1 else t
        strides = dict(SB=L * S, SH=0, SL=S, SS=1) if kind else dict(SB=0, SH=0, SL=0, SS=0)
        common = dict(R=R, L=L, H=H, S=S, scale_hi=0.125, scale_lo=0.0, **strides, MASK_KIND=kind, CAUSAL=causal,
                      COMPUTE_DTYPE=comp, BLOCK_R=br, BLOCK_L=bl)
        suffix = "" if single else "_streaming"
        what = f"{t}->{u} mask{kind}{' causal' if causal else ''} S={S}"
        cfg = f"{br}x{bl} w{warps}"
        jobs.append(dict(kernel="attn_fwd" + suffix, name=f"attn_fwd{suffix} {what}", config=cfg,
                         args=dict(common, x_ptr=Ptr(t), m_ptr=Ptr(mdt), y_ptr=Ptr(u), ROUND=t in ("bf16", "fp16")),
                         options=dict(num_warps=warps)))
        bwd_kind = 1 if kind == 1 else 0  # the backward reads only a bool mask
        bstrides = strides if bwd_kind else dict(SB=0, SH=0, SL=0, SS=0)
        bcommon = dict(common, **bstrides, MASK_KIND=bwd_kind)
        jobs.append(dict(kernel="attn_bwd" + suffix, name=f"attn_bwd{suffix} {what}", config=cfg,
                         args=dict(bcommon, dy_ptr=Ptr(u), y_ptr=Ptr(u), m_ptr=Ptr("u8" if bwd_kind else t),
                                   dx_ptr=Ptr(t)),
                         options=dict(num_warps=warps)))
    return jobs


def all_jobs(quick: bool, targets):
    jobs = []
    for t in targets:
        jobs += gemm_jobs(quick, t) + tma_gemm_jobs(quick, t) + gated_jobs(quick, t)
        jobs += [dict(j, arch=t) for j in reduction_jobs(quick) + softmax_jobs(quick) + ce_jobs(quick)
                 + rotary_jobs(quick) + attn_jobs(quick)]
    return jobs


# ----------------------------------------------------------------------------- report
def family(r: dict) -> str:
    parts = r["name"].split()
    if parts[0] == "gemm":
        return "gemm split-K " + parts[3] if parts[1] == "split-K" else f"gemm {parts[1]}"
    if parts[0] == "gated_gemm":
        return f"gated_gemm {parts[1]}"
    return parts[0]


def markdown(results, targets, quick: bool, secs: float) -> str:
    lines = [f"# Triton kernels compiled ahead of time for {', '.join(f'sm_{t}' for t in targets)}",
             "",
             f"`scripts/compile_gate.py{' --quick' if quick else ''}`, triton {triton.__version__}, "
             f"{len(results)} kernels in {secs:.0f} s, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             "No GPU involved: registers and spills from ptxas -v, shared memory from the kernel "
             "metadata (limit per block: sm_90 227 KB, sm_80 163 KB). GEMMs at M = N = K = 4096 "
             "(M = 16 / 32 for the small-M configs); `mma`: wgmma (Hopper), mma (mma.sync) or fma.",
             ""]
    bad = [r for r in results if not r["ok"]]
    lines.append(f"**{'FAIL' if bad else 'PASS'}**: {len(bad)} of {len(results)} kernels fail the gate.")
    lines += ["", "## Summary per kernel", "",
              "| target | kernel | compiled | configs | max regs | max spill B | max smem KB | mma |",
              "|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in results:
        groups.setdefault((r["arch"], family(r)), []).append(r)
    for (arch, fam), rs in sorted(groups.items()):
        ok = [r for r in rs if r.get("regs") is not None]
        lines.append(
            f"| sm_{arch} | {fam} | {len(rs)} | {len({r['config'] for r in rs})} | "
            f"{max((r['regs'] for r in ok), default='-')} | "
            f"{max((r['spill_stores'] for r in ok), default='-')} | "
            f"{max((r['smem'] for r in ok), default=0) / 1024:.1f} | "
            f"{', '.join(sorted({r.get('mma', '') for r in rs} - {''})) or '-'} |")
    lines += ["", "## Per config (worst case over the layouts and epilogues compiled with it)", "",
              "| target | kernel | config | compiled | regs | spill B | smem KB | mma | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    per = {}
    for r in results:
        per.setdefault((r["arch"], family(r), r["config"]), []).append(r)
    for (arch, fam, cfg), rs in sorted(per.items()):
        ok = [r for r in rs if r.get("regs") is not None]
        status = "ok" if all(r["ok"] for r in rs) else "; ".join(
            sorted({f"{r['name']}: {r['problem']}" for r in rs if not r["ok"]}))[:400]
        lines.append(
            f"| sm_{arch} | {fam} | {cfg} | {len(rs)} | {max((r['regs'] for r in ok), default='-')} | "
            f"{max((r['spill_stores'] for r in ok), default='-')} | "
            f"{max((r['smem'] for r in ok), default=0) / 1024:.1f} | "
            f"{', '.join(sorted({r.get('mma', '') for r in rs} - {''})) or '-'} | {status} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--targets", default=None, help="comma-separated compute capabilities")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=None)
    ap.add_argument("--filter", default="", metavar="SUBSTRING",
                    help='only kernels whose "name config" contains it (a family: "gated", "ce_", "softmax")')
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per compiled kernel")
    opts = ap.parse_args()
    targets = [int(t) for t in (opts.targets or ("90" if opts.quick else "90,80")).split(",")]
    jobs = [j for j in all_jobs(opts.quick, targets) if opts.filter in f"{j['name']} {j['config']}"]
    print(f"compile gate: {len(jobs)} kernels for {', '.join(f'sm_{t}' for t in targets)}, "
          f"triton {triton.__version__}, {opts.jobs} processes", flush=True)
    t0 = time.time()
    results = []
    with mp.get_context("fork").Pool(opts.jobs) as pool:
        for r in pool.imap_unordered(run_job, jobs):
            results.append(r)
            if opts.verbose or not r["ok"]:
                facts = (f"regs={r.get('regs')} spill={r.get('spill_stores')} "
                         f"smem={r.get('smem')} scratch={r.get('scratch')} {r.get('mma', '')}")
                print(f"[{r['secs']:5.1f}s] {'ok ' if r['ok'] else 'BAD'} sm_{r['arch']} {r['name']} "
                      f"{r['config']}: {facts} {r.get('problem', '')}", flush=True)
    secs = time.time() - t0
    report = markdown(results, targets, opts.quick, secs)
    if opts.out:
        os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
        with open(opts.out, "w") as f:
            f.write(report)
    summary = report.split("## Per config")[0]
    print(summary if not opts.quick else summary.split("## Summary")[0].strip())
    bad = [r for r in results if not r["ok"]]
    print(f"compile gate: {'FAIL' if bad else 'PASS'} ({len(results) - len(bad)}/{len(results)} ok, "
          f"{secs:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
