"""Kernels of ``y = act(x @ W^T + b)``, forward and backward.

Three kernels (launched by fastlayers/backends/triton.py):

* ``gemm_kernel`` — one generic strided GEMM, ``C = epilogue(A @ B)``, A: (M, K), B: (K, N), any
  strides (so W^T, dz^T and non-contiguous x are views, never copies). Grouped tile order (GROUP_M
  row tiles share each column strip while it is in L2), fp32 accumulation (fp64 for fp64 data),
  and an epilogue that adds the bias, applies the activation and stores C in its own dtype, plus
  the pre-activation Z when the backward needs it. Used for the forward (A = x, B = W^T, with
  epilogue) and both backward GEMMs (dx = dz @ W, dW = dz^T @ x; no epilogue).
  Cost: 2*M*N*K flops; reads M*K + K*N elements once per tile row/column of the other operand
  (bounded by L2 reuse), writes M*N (+ M*N for Z).
* ``act_grad_bias_kernel`` — ``dz = dy * act'(saved)`` and the partial column sums of dz for the
  bias gradient, one row-slab of ROWS_PER_PROG rows per program. Reads 2*M*N, writes M*N
  (+ P*N fp32 partial sums). No atomics: program (p, j) owns partial[p, j-block].
* ``sum_rows_kernel`` — db = sum over p of partial[p, :], in a fixed order (deterministic).
  Reads P*N, writes N.

Offsets are computed in int64 so tensors beyond 2^31 elements are addressed correctly.
Autotuning: a few configs keyed by the powers of two of M, N, K (a new batch size re-uses the
tuned config of its bucket); exactly one config under TRITON_INTERPRET=1, where autotuning
cannot benchmark. On a GPU every tile dimension is >= 16 (``tl.dot``'s minimum).
"""
import triton
import triton.language as tl

from .activations import apply_act, act_grad


@triton.jit
def _probe():
    pass


# Whether these kernels run in Triton's interpreter: triton decides when each @triton.jit
# decorator runs (TRITON_INTERPRET=1 at import time), so ask the decorated function.
INTERPRET = type(_probe).__name__ == "InterpretedFunction"


def _cfg(bm: int, bn: int, bk: int, group: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# fp16 / bf16 / fp32. Configs whose shared memory does not fit (e.g. fp32 with the large tiles)
# fail to compile and are skipped by the autotuner.
GEMM_CONFIGS = [
    _cfg(128, 256, 64, 8, 8, 3),
    _cfg(256, 128, 64, 8, 8, 3),
    _cfg(128, 128, 64, 8, 8, 4),
    _cfg(128, 128, 32, 8, 4, 4),
    _cfg(128, 64, 32, 8, 4, 4),
    _cfg(64, 128, 32, 8, 4, 4),
    _cfg(64, 64, 32, 8, 4, 4),
]
# fp64 accumulators take twice the registers: smaller tiles.
GEMM_CONFIGS_FP64 = [
    _cfg(64, 64, 16, 8, 4, 3),
    _cfg(64, 32, 16, 8, 4, 3),
    _cfg(32, 32, 16, 8, 4, 2),
]
# The interpreter runs one program at a time (~2 ms each): few, large-ish tiles.
INTERPRETER_GEMM_CONFIG = _cfg(64, 64, 32, 4, 4, 1)
if INTERPRET:
    GEMM_CONFIGS = [INTERPRETER_GEMM_CONFIG]
    GEMM_CONFIGS_FP64 = [INTERPRETER_GEMM_CONFIG]

GEMM_AUTOTUNE_KEY = ["M_BUCKET", "N_BUCKET", "K_BUCKET"]

# act_grad_bias_kernel's tile (not autotuned: it is bandwidth-bound and its reduction order must
# not depend on a tuning result).
GRAD_BLOCK_M = 32
GRAD_BLOCK_N = 128
GRAD_NUM_WARPS = 4


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, z_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    slope_hi, slope_lo,
    M_BUCKET, N_BUCKET, K_BUCKET,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = act(A[M, K] @ B[K, N] + bias[N]); Z = the pre-activation when STORE_Z.

    a_ptr, b_ptr: operands with element strides (stride_am, stride_ak), (stride_bk, stride_bn).
    c_ptr: output with strides (stride_cm, stride_cn); z_ptr: same strides as C (used only when
    STORE_Z). bias_ptr: (N,) contiguous (used only when HAS_BIAS). slope_hi + slope_lo: leaky_relu's
    negative slope split into two fp32 numbers, so fp64 kernels see it at full precision.
    M_BUCKET, N_BUCKET, K_BUCKET: powers of two, read only by the autotuner's key.
    ACT: activation code (fastlayers/activations.py). ACC_DTYPE: tl.float32 or tl.float64.
    PRECISION: tl.dot input precision, "ieee" or "tf32" (fp32 data only; ignored otherwise).
    DOT_FP32: upcast the operand tiles to fp32 before tl.dot. Set only under the interpreter for
    bf16 data, whose bf16 tl.dot is broken (triton#11584); the result equals a bf16 MMA with fp32
    accumulation (products of bf16 numbers are exact in fp32).
    One program computes one BLOCK_M x BLOCK_N tile of C.
    """
    # Grouped ordering: consecutive programs walk GROUP_M tile rows down one tile column, so the
    # B strip they share stays in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    a_rows = a_ptr + offs_m64[:, None] * stride_am  # (BLOCK_M, 1) pointers
    b_cols = b_ptr + offs_n64[None, :] * stride_bn  # (1, BLOCK_N) pointers

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
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

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc + bias.to(ACC_DTYPE)[None, :]
    c_offs = offs_m64[:, None] * stride_cm + offs_n64[None, :] * stride_cn
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_Z:
        tl.store(z_ptr + c_offs, acc.to(z_ptr.dtype.element_ty), mask=mask)
    slope = tl.cast(slope_hi, ACC_DTYPE) + tl.cast(slope_lo, ACC_DTYPE)
    y = apply_act(acc, ACT, slope)
    tl.store(c_ptr + c_offs, y.to(c_ptr.dtype.element_ty), mask=mask)


# Two autotuned entry points over the same kernel: their config lists differ by dtype.
gemm_kernel = triton.autotune(configs=GEMM_CONFIGS, key=GEMM_AUTOTUNE_KEY)(_gemm_kernel)
gemm_kernel_fp64 = triton.autotune(configs=GEMM_CONFIGS_FP64, key=GEMM_AUTOTUNE_KEY)(_gemm_kernel)


@triton.jit
def act_grad_bias_kernel(
    dy_ptr, saved_ptr, dz_ptr, partial_ptr,
    M, N, rows_per_prog,
    slope_hi, slope_lo,
    ACT: tl.constexpr, STORE_DZ: tl.constexpr, NEED_DB: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dz = dy * act'(saved) and partial[p, n] = sum of dz[m, n] over this program's rows.

    dy, saved, dz: (M, N) contiguous (saved is read only when ACT needs it; dz written only when
    STORE_DZ). partial: (P, N) fp32/fp64 contiguous, written only when NEED_DB.
    Program (p, j) handles rows [p * rows_per_prog, (p + 1) * rows_per_prog) (rows_per_prog is a
    multiple of BLOCK_M) and columns [j * BLOCK_N, (j + 1) * BLOCK_N), BLOCK_M rows at a time,
    in a fixed order. COMPUTE_DTYPE: tl.float32 (fp16/bf16/fp32 data) or tl.float64.
    """
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    slope = tl.cast(slope_hi, COMPUTE_DTYPE) + tl.cast(slope_lo, COMPUTE_DTYPE)
    col_sum = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)
    row0 = pid_p.to(tl.int64) * rows_per_prog
    for r in range(0, rows_per_prog, BLOCK_M):
        offs_m = row0 + r + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        offs = offs_m[:, None] * N + offs_n[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        if ACT == 0:
            dz = dy
        else:
            saved = tl.load(saved_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            dz = act_grad(dy, saved, ACT, slope)
        if STORE_DZ:
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if NEED_DB:
            col_sum += tl.sum(tl.where(mask, dz, 0.0), axis=0)
    if NEED_DB:
        tl.store(partial_ptr + pid_p.to(tl.int64) * N + offs_n, col_sum, mask=mask_n)


@triton.jit
def sum_rows_kernel(partial_ptr, out_ptr, P, N, BLOCK_N: tl.constexpr):
    """out[n] = sum_{p = 0..P-1} partial[p, n], in order p = 0, 1, ... (deterministic).

    partial: (P, N) contiguous fp32/fp64; out: (N,) in the bias dtype. One program per BLOCK_N
    columns."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    ptrs = partial_ptr + offs_n
    acc = tl.load(ptrs, mask=mask_n, other=0.0)
    for _ in range(1, P):
        ptrs += N  # pointer arithmetic is 64-bit: no int32 overflow for P * N >= 2^31
        acc += tl.load(ptrs, mask=mask_n, other=0.0)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
