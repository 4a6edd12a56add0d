"""Kernels of the gated linear unit ``h = act(x @ Wg^T + bg) * (x @ Wu^T + bu)``.

Two kernels (launched by fastlayers/backends/triton/gated.py):

* ``gated_gemm_kernel`` — both GEMMs in one pass over x: each program holds two accumulators,
  ``g`` and ``u``, for the same BLOCK_M x BLOCK_N output tile, and every x tile it loads feeds both
  ``tl.dot``s (x is read once instead of twice). The epilogue adds the biases, stores g and u when
  the backward needs them, and stores ``h = act(g) * u``: the gating never round-trips through
  memory. Grouped tile order as in kernels/gemm.py (kernels/tiles.py).
  Cost: 4*M*N*K flops; reads M*K + 2*N*K elements (per tile row/column, bounded by L2 reuse),
  writes M*N (3*M*N with g and u).
* ``gated_grad_kernel`` — ``dg = dh * u * act'(g)``, ``du = dh * act(g)`` and the per-slab partial
  column sums of both for the bias gradients (summed by kernels/linear_grad.py's
  ``sum_rows_kernel`` in a fixed order: deterministic). Reads 3*M*N, writes 2*M*N (+ 2*P*N partial
  sums). The backward GEMMs dx = dg Wg + du Wu, dWg = dg^T x, dWu = du^T x reuse linear_act's GEMM.

Offsets are int64. One autotune config under TRITON_INTERPRET=1 (the interpreter cannot benchmark);
on a GPU every tile dimension is >= 16 (``tl.dot``'s minimum), and the fp64 tiles are smaller (two
fp64 accumulators per program).
"""
import triton
import triton.language as tl

from .activations import act_grad, apply_act
from .tiles import INTERPRET, config, grouped_tile, slab_columns, slab_tile

# Two accumulators per program, so at most 64 accumulator values per thread and accumulator
# (128 x 128 tiles spill on sm_90 at 8 warps, and at 16 warps under its 128-register cap). One list
# per dtype class (kernels/gemm.py dtype_class: "lp" fp16/bf16, "tf32", "ieee" exact fp32, "fp64"),
# each passing scripts/compile_gate.py on sm_90 and sm_80 (no spills, shared memory within the
# limit) with every activation.
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
GATED_CONFIGS = {k: [config(*c) for c in v] for k, v in {
    "lp": [(128, 64, 32, 8, 8, 4), (64, 128, 32, 8, 8, 4), (128, 64, 64, 8, 8, 3),
           (64, 64, 64, 8, 4, 4), (64, 64, 32, 8, 4, 4)],
    "tf32": [(128, 64, 32, 8, 8, 4), (64, 128, 32, 8, 8, 3), (64, 64, 32, 8, 4, 4)],
    "ieee": [(128, 64, 16, 8, 8, 3), (64, 128, 16, 8, 8, 3), (32, 64, 16, 8, 4, 3)],
    "fp64": [(32, 64, 16, 8, 4, 2), (32, 32, 16, 8, 4, 2)],
}.items()}
INTERPRETER_GATED_CONFIG = config(64, 64, 32, 4, 4, 1)
if INTERPRET:
    GATED_CONFIGS = {k: [INTERPRETER_GATED_CONFIG] for k in GATED_CONFIGS}

# gated_grad_kernel's tile (fixed: bandwidth-bound, and the bias-sum order must not depend on tuning).
GRAD_BLOCK_M = 32
GRAD_BLOCK_M_FP64 = 8  # fp64 values take two registers each, and fp64 erf / exp many more (32 spills)
GRAD_BLOCK_N = 128
GRAD_NUM_WARPS = 4


@triton.jit
def _gated_gemm_kernel(
    x_ptr, wg_ptr, wu_ptr, h_ptr, g_ptr, u_ptr, bg_ptr, bu_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_vn, stride_vk,
    slope_hi, slope_lo,
    M_BUCKET, N_BUCKET, K_BUCKET,
    HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr, STORE_GU: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """h[M, N] = act(x @ Wg^T + bg) * (x @ Wu^T + bu); g, u = the two biased pre-activations.

    x_ptr: (M, K) with strides (stride_xm, stride_xk). wg_ptr: (N, K) with strides
    (stride_wn, stride_wk); wu_ptr: (N, K) with strides (stride_vn, stride_vk). h, g, u: (M, N)
    contiguous (g and u written only when STORE_GU). bg, bu: (N,) contiguous (read when HAS_BG /
    HAS_BU). slope_hi + slope_lo: leaky_relu's slope as two fp32 numbers (fp64 precision).
    M_BUCKET, N_BUCKET, K_BUCKET: powers of two for the autotuner's key only. ACT: activation code.
    ACC_DTYPE: tl.float32 or tl.float64. PRECISION: "ieee" or "tf32" (fp32 data). DOT_FP32: upcast
    the tiles to fp32 before tl.dot (interpreter + bf16 only: its bf16 tl.dot is broken).
    One program computes one BLOCK_M x BLOCK_N tile of h.
    """
    offs_m64, offs_n64, mask_m, mask_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m64[:, None] * stride_xm   # (BLOCK_M, 1)
    wg_cols = wg_ptr + offs_n64[None, :] * stride_wn  # (1, BLOCK_N): W^T's columns are W's rows
    wu_cols = wu_ptr + offs_n64[None, :] * stride_vn

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        kk64 = kk.to(tl.int64)
        a = tl.load(x_rows + kk64[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wmask = mask_k[:, None] & mask_n[None, :]
        bg = tl.load(wg_cols + kk64[:, None] * stride_wk, mask=wmask, other=0.0)  # (BLOCK_K, BLOCK_N)
        bu = tl.load(wu_cols + kk64[:, None] * stride_vk, mask=wmask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        # one x tile, two products (out_dtype explicit: triton 3.6 asserts on an fp64 accumulator)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BG:
        acc_g = acc_g + tl.load(bg_ptr + offs_n64, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_BU:
        acc_u = acc_u + tl.load(bu_ptr + offs_n64, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    offs = offs_m64[:, None] * N + offs_n64[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_GU:
        tl.store(g_ptr + offs, acc_g.to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(u_ptr + offs, acc_u.to(u_ptr.dtype.element_ty), mask=mask)
    slope = tl.cast(slope_hi, ACC_DTYPE) + tl.cast(slope_lo, ACC_DTYPE)
    h = apply_act(acc_g, ACT, slope) * acc_u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


GATED_AUTOTUNE_KEY = ["M_BUCKET", "N_BUCKET", "K_BUCKET"]
# One autotuned kernel per dtype class.
gated_gemm_kernels = {k: triton.autotune(configs=v, key=GATED_AUTOTUNE_KEY)(_gated_gemm_kernel)
                      for k, v in GATED_CONFIGS.items()}


@triton.jit
def gated_grad_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, pg_ptr, pu_ptr,
    M, N, rows_per_prog,
    slope_hi, slope_lo,
    ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr, NEED_DBG: tl.constexpr, NEED_DBU: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dg = dh * u * act'(g), du = dh * act(g); pg[p, n], pu[p, n] = their sums over this
    program's rows (NEED_DBG / NEED_DBU).

    dh, g, u, dg, du: (M, N) contiguous. pg, pu: (P, N) fp32/fp64 contiguous partial sums.
    FROM_OUTPUT: act' is evaluated from act(g) (relu, sigmoid, tanh, relu6, leaky_relu with
    slope >= 0), else from g. Program (p, j) handles rows [p * rows_per_prog, (p + 1) *
    rows_per_prog) (a multiple of BLOCK_M) and columns [j * BLOCK_N, (j + 1) * BLOCK_N), BLOCK_M
    rows at a time in a fixed order. COMPUTE_DTYPE: tl.float32 (fp16/bf16/fp32 data) or tl.float64.
    """
    pid_p = tl.program_id(0)
    offs_n, mask_n, slope = slab_columns(N, slope_hi, slope_lo, BLOCK_N, COMPUTE_DTYPE)
    sum_g = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)
    sum_u = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)
    row0 = pid_p.to(tl.int64) * rows_per_prog
    for r in range(0, rows_per_prog, BLOCK_M):
        offs, mask = slab_tile(row0 + r, M, N, offs_n, mask_n, BLOCK_M)
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        a = apply_act(g, ACT, slope)
        if FROM_OUTPUT:
            # from the output rounded to the data's dtype first, as PyTorch's composition saves it
            # (fp16 / bf16: tanh(g) rounding to 1 gives tanh' = 0, inf * 0 = NaN for dh * u = inf)
            dg = act_grad(dh * u, a.to(dg_ptr.dtype.element_ty).to(COMPUTE_DTYPE), ACT, slope)
        else:
            dg = act_grad(dh * u, g, ACT, slope)
        du = dh * a
        dg_out = dg.to(dg_ptr.dtype.element_ty)
        du_out = du.to(du_ptr.dtype.element_ty)
        tl.store(dg_ptr + offs, dg_out, mask=mask)
        tl.store(du_ptr + offs, du_out, mask=mask)
        # bias gradients: sums of the unrounded gradients (fp32 for bf16 / fp16 data)
        if NEED_DBG:
            sum_g += tl.sum(tl.where(mask, dg, 0.0), axis=0)
        if NEED_DBU:
            sum_u += tl.sum(tl.where(mask, du, 0.0), axis=0)
    if NEED_DBG:
        tl.store(pg_ptr + pid_p.to(tl.int64) * N + offs_n, sum_g, mask=mask_n)
    if NEED_DBU:
        tl.store(pu_ptr + pid_p.to(tl.int64) * N + offs_n, sum_u, mask=mask_n)
