"""The generic GEMM kernel (with the linear_act epilogue) that every GEMM-based op reuses:
``y = act(x @ W^T + b)`` forward, and both backward GEMMs; its configs and autotuning.

* ``gemm_kernel`` — one generic strided GEMM, ``C = epilogue(A @ B)``, A: (M, K), B: (K, N), any
  strides (so W^T, dz^T and non-contiguous x are views, never copies). Grouped tile order (GROUP_M
  row tiles share each column strip while it is in L2), fp32 accumulation (fp64 for fp64 data),
  and an epilogue (kernels/tiles.py ``gemm_epilogue``) that adds the bias, applies the activation
  and stores C in its own dtype, plus the pre-activation Z when the backward needs it. Used for the
  forward (A = x, B = W^T, with epilogue) and both backward GEMMs (dx = dz @ W, dW = dz^T @ x; no
  epilogue). With SPLIT_K > 1 each program sums one range of K into an fp32/fp64 partial tile
  (deterministic split-K for plain GEMMs with few output tiles and a long reduction, e.g. dW when
  M >> N x K; kernels/linear_grad.py's ``sum_rows_kernel`` adds the partials).
  Cost: 2*M*N*K flops; reads M*K + K*N elements once per tile row/column of the other operand
  (bounded by L2 reuse), writes M*N (+ M*N for Z).

The same GEMM for fp16 / bf16 on sm_90+ through TMA is kernels/gemm_tma.py; the elementwise
backward (``dz = dy * act'``, bias sums) is kernels/linear_grad.py. All launched by
fastlayers/backends/triton/gemm.py and linear_act.py.

Offsets are computed in int64 so tensors beyond 2^31 elements are addressed correctly.
Configs: one list per class of GEMM (``gemm_configs``: dtype / precision, decode-sized M, fused
or plain epilogue, sm_80 or sm_90), each passing scripts/compile_gate.py (no spills, shared
memory within the target's limit), autotuned with a key holding everything that changes the best config (the
powers of two of M, N, K, the layout, activation, bias, z, precision, dtypes; a new batch size
re-uses the tuned config of its bucket); ``heuristic_config`` picks one without benchmarking.
Exactly one config per class under TRITON_INTERPRET=1, where autotuning cannot benchmark. On a
GPU every tile dimension is >= 16 (``tl.dot``'s minimum).
"""
import inspect

import triton
import triton.language as tl

from .tiles import INTERPRET, config, gemm_epilogue, grouped_tile


# GEMM configs, one list per class of GEMM, largest tiles first. Each list passes the compile
# gate (scripts/compile_gate.py: sm_90 and sm_80, no spills, shared memory within the limit) for
# every layout and epilogue it is used with. The classes:
#   dtype class: "lp" (fp16 / bf16 operands, tensor cores), "tf32" (fp32 data, TF32 tensor cores),
#                "ieee" (fp32 data, exact fp32: FMA dots, register-hungry), "fp64".
#   size class:  "large" (M > 32) or "small" (M <= 32, decode-sized: BLOCK_M 16 / 32, so most of
#                each tile is not wasted on rows that do not exist).
#   epilogue:    "plain" (no activation, no saved z: dx / dW / linear without activation) or
#                "fused" (activation and / or z): the fused epilogue needs registers of its own,
#                so the largest tiles are kept for plain GEMMs only.
#   target:      entries marked sm90 only are used on compute capability >= 9.0 (wgmma keeps the
#                accumulator of the 128x256 tiles in registers without spilling; mma.sync on
#                sm_80 spills there).
# Entries: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, plain_only, sm90_only); GROUP_M 8.
GEMM_CONFIGS = {
    "lp": [(128, 256, 64, 8, 3, True, True), (256, 128, 64, 8, 3, True, True),
           (128, 128, 64, 8, 4, False, False), (128, 128, 32, 4, 4, True, False),
           (128, 64, 64, 4, 4, False, False), (64, 128, 64, 4, 4, False, False),
           (64, 64, 64, 4, 4, False, False)],
    "tf32": [(128, 128, 32, 8, 3, False, False), (128, 64, 32, 4, 4, False, False),
             (64, 128, 32, 4, 4, False, False), (64, 64, 16, 4, 4, False, False)],
    "ieee": [(128, 64, 16, 8, 3, False, False), (64, 64, 16, 4, 3, False, False),
             (64, 32, 16, 4, 3, False, False)],
    "fp64": [(64, 64, 16, 8, 3, False, False), (64, 32, 16, 4, 3, False, False),
             (32, 64, 16, 4, 3, False, False), (32, 32, 16, 4, 3, False, False)],
}
# Decode-sized M (<= 32): BLOCK_M is 16 or 32 (the M bucket), wide N tiles, deep K steps.
# Entries: (BLOCK_N, BLOCK_K, num_warps, num_stages, sm90_only) per dtype class.
SMALL_M_CONFIGS = {
    "lp": [(256, 64, 4, 3, True), (128, 64, 4, 4, False), (64, 128, 8, 4, False),
           (64, 64, 4, 4, False)],
    "tf32": [(128, 32, 4, 4, False), (64, 64, 4, 3, False), (64, 32, 8, 4, False)],
    "ieee": [(128, 16, 8, 3, False), (64, 16, 4, 2, False), (32, 16, 4, 3, False)],
    "fp64": [(64, 16, 4, 3, False), (32, 16, 4, 3, False)],
}
SMALL_M_MAX = 32

# The interpreter runs one program at a time (~2 ms each): one config per class (autotuning
# cannot benchmark there), few, large-ish tiles; BLOCK_M 16 for the small class so its code path
# is the one tested.
INTERPRETER_GEMM_CONFIG = config(64, 64, 32, 4, 4, 1)
INTERPRETER_SMALL_M_CONFIG = config(16, 64, 32, 1, 4, 1)


def dtype_class(dtype_name: str, precision: str) -> str:
    """"lp", "tf32", "ieee" or "fp64" for data of torch dtype name `dtype_name`."""
    if dtype_name in ("float16", "bfloat16"):
        return "lp"
    if dtype_name == "float64":
        return "fp64"
    return "tf32" if precision == "tf32" else "ieee"


def gemm_configs(dclass: str, m: int, plain: bool, capability: int = 90) -> list:
    """The configs autotuning chooses from for a GEMM of M = m rows (the launcher passes the M
    bucket) of dtype class `dclass`; plain: no activation and no saved z; capability: the GPU's
    compute capability as 10 * major + minor (80 for A100, 90 for H100 / H200)."""
    hopper = capability >= 90
    if m <= SMALL_M_MAX:
        if INTERPRET:
            return [INTERPRETER_SMALL_M_CONFIG]
        bm = 16 if m <= 16 else 32
        return [config(bm, bn, bk, 1, w, st) for bn, bk, w, st, sm90 in SMALL_M_CONFIGS[dclass]
                if hopper or not sm90]
    if INTERPRET:
        return [INTERPRETER_GEMM_CONFIG]
    return large_m_configs(dclass, plain, hopper)


def large_m_configs(dclass: str, plain: bool, hopper: bool = True) -> list:
    """The GPU configs for M > 32 (GEMM_CONFIGS), largest tiles first; hopper: sm_90 or newer."""
    return [config(bm, bn, bk, 8, w, st) for bm, bn, bk, w, st, plain_only, sm90 in GEMM_CONFIGS[dclass]
            if (plain or not plain_only) and (hopper or not sm90)]


def heuristic_config(configs: list, m: int, n: int, num_sms: int) -> triton.Config:
    """One config without benchmarking (FASTLAYERS_AUTOTUNE=0, CUDA-graph capture): the largest
    tile that still gives every SM a program, else the smallest tile."""
    for c in configs:
        tiles = triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(n, c.kwargs["BLOCK_N"])
        if tiles >= num_sms:
            return c
    return min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])


# Autotuning key: everything that changes the best config. The dtypes of the tensor arguments are
# added by Triton itself. LAYOUT: which operand dimensions are contiguous (see the kernel).
GEMM_AUTOTUNE_KEY = ["M_BUCKET", "N_BUCKET", "K_BUCKET", "LAYOUT", "ACT", "HAS_BIAS", "STORE_Z",
                     "PRECISION", "SPLIT_K"]

# Split-K (dW when the reduction M is long and N x K has few tiles): a fixed config, so the
# summation order depends on the shape only.
SPLIT_K_CONFIG = {"lp": config(128, 128, 64, 1, 8, 4), "tf32": config(64, 64, 32, 1, 4, 4),
                  "ieee": config(64, 64, 16, 1, 4, 3), "fp64": config(64, 32, 16, 1, 4, 3)}
if INTERPRET:
    SPLIT_K_CONFIG = {k: INTERPRETER_GEMM_CONFIG for k in SPLIT_K_CONFIG}


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, z_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    slope_hi, slope_lo,
    k_per_split, stride_cs,
    M_BUCKET, N_BUCKET, K_BUCKET, LAYOUT,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = act(A[M, K] @ B[K, N] + bias[N]); Z = the pre-activation when STORE_Z.

    a_ptr, b_ptr: operands with element strides (stride_am, stride_ak), (stride_bk, stride_bn).
    c_ptr: output with strides (stride_cm, stride_cn); z_ptr: same strides as C (used only when
    STORE_Z). bias_ptr: (N,) contiguous (used only when HAS_BIAS). slope_hi + slope_lo: leaky_relu's
    negative slope split into two fp32 numbers, so fp64 kernels see it at full precision.
    M_BUCKET, N_BUCKET, K_BUCKET: powers of two; LAYOUT: 2 * (stride_ak == 1) + (stride_bn == 1).
    Read only by the autotuner's key.
    SPLIT_K > 1: program (tile, s) sums k in [s * k_per_split, (s + 1) * k_per_split) only
    (k_per_split a multiple of BLOCK_K) and writes its partial tile at c_ptr + s * stride_cs (an
    (SPLIT_K, M, N) fp32 / fp64 workspace); no bias, activation or z then. The launcher reduces
    the partials in a fixed order (sum_rows_kernel), so the result is deterministic.
    ACT: activation code (fastlayers/activations.py). ACC_DTYPE: tl.float32 or tl.float64.
    PRECISION: tl.dot input precision, "ieee" or "tf32" (fp32 data only; ignored otherwise).
    DOT_FP32: upcast the operand tiles to fp32 before tl.dot. Set only under the interpreter for
    bf16 data, whose bf16 tl.dot is broken (triton#11584); the result equals a bf16 MMA with fp32
    accumulation (products of bf16 numbers are exact in fp32).
    One program computes one BLOCK_M x BLOCK_N tile of C.
    """
    offs_m64, offs_n64, mask_m, mask_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + offs_m64[:, None] * stride_am  # (BLOCK_M, 1) pointers
    b_cols = b_ptr + offs_n64[None, :] * stride_bn  # (1, BLOCK_N) pointers

    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        pid_s = tl.program_id(1)
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        c_ptr += pid_s.to(tl.int64) * stride_cs

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < k_hi
        kk64 = kk.to(tl.int64)
        a = tl.load(a_rows + kk64[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        b = tl.load(b_cols + kk64[:, None] * stride_bk, mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # out_dtype explicit: triton 3.6 defaults it to fp32 and rejects an fp64 accumulator.
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    gemm_epilogue(acc, c_ptr, z_ptr, bias_ptr, offs_m64, offs_n64, mask_m, mask_n, stride_cm, stride_cn,
                  slope_hi, slope_lo, HAS_BIAS, ACT, STORE_Z, ACC_DTYPE)


gemm_kernel = _gemm_kernel  # launched directly with one config (heuristic, split-K)
_AUTOTUNED = {}
_AUTOTUNE_PARAMS = inspect.signature(triton.autotune).parameters


def autotuned_gemm(configs: list):
    """The GEMM autotuned over `configs` (one Autotuner per distinct list, made on first use)."""
    return autotuned(_gemm_kernel, GEMM_AUTOTUNE_KEY, configs)


def autotuned(fn, key_names: list, configs: list):
    """`fn` autotuned over `configs` with key `key_names`, one Autotuner per (fn, list). Tuned
    results are kept on disk between processes where this triton supports it."""
    key = (fn.__name__,) + tuple((tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
                                 for c in configs)
    kernel = _AUTOTUNED.get(key)
    if kernel is None:
        extra = {"cache_results": True} if "cache_results" in _AUTOTUNE_PARAMS else {}
        kernel = triton.autotune(configs=configs, key=key_names, **extra)(fn)
        _AUTOTUNED[key] = kernel
    return kernel
