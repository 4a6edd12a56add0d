"""The elementwise backward of linear_act and the fixed-order row sums (launched by
fastlayers/backends/triton/linear_act.py and gemm.py).

* ``act_grad_bias_kernel`` — ``dz = dy * act'(saved)`` and the partial column sums of dz for the
  bias gradient, one row-slab of ROWS_PER_PROG rows per program. Reads 2*M*N, writes M*N
  (+ P*N fp32 partial sums). No atomics: program (p, j) owns partial[p, j-block].
* ``sum_rows_kernel`` — out = sum over p of partial[p, :], BLOCK_P rows per step in a fixed
  order (deterministic): the bias gradients (linear_act, gated, norms), and the reduction of
  kernels/gemm.py's split-K partial tiles. Reads P*N, writes N.

Offsets are computed in int64 so tensors beyond 2^31 elements are addressed correctly.
"""
import triton
import triton.language as tl

from .activations import NONE, act_grad
from .tiles import slab_columns, slab_tile

# act_grad_bias_kernel's tile (not autotuned: it is bandwidth-bound and its reduction order must
# not depend on a tuning result).
GRAD_BLOCK_M = 32
GRAD_BLOCK_M_FP64 = 8  # fp64 values take two registers each, and fp64 erf / exp many more
GRAD_BLOCK_N = 128
GRAD_NUM_WARPS = 4
# sum_rows_kernel's tile: BLOCK_P partial rows x BLOCK_N columns per step.
SUM_BLOCK_P = 32
SUM_BLOCK_N = 64
SUM_NUM_WARPS = 4


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
    offs_n, mask_n, slope = slab_columns(N, slope_hi, slope_lo, BLOCK_N, COMPUTE_DTYPE)
    col_sum = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)
    row0 = pid_p.to(tl.int64) * rows_per_prog
    for r in range(0, rows_per_prog, BLOCK_M):
        offs, mask = slab_tile(row0 + r, M, N, offs_n, mask_n, BLOCK_M)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        if ACT == NONE:
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
def sum_rows_kernel(partial_ptr, out_ptr, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n] = sum over p of partial[p, n]: the bias gradient from act_grad_bias_kernel's
    partial column sums, and split-K's partial tiles (N = M * N of the GEMM there).

    partial: (P, N) contiguous fp32/fp64; out: (N,) contiguous, any float dtype. One program per
    BLOCK_N columns; it adds BLOCK_P rows per step (a tree of fixed shape inside the tile, the
    steps in order p = 0, BLOCK_P, ...), so the result depends on the shape only
    (deterministic), and there are P / BLOCK_P dependent steps instead of P.
    Reads P*N, writes N elements."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_p = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_N,), dtype=partial_ptr.dtype.element_ty)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + offs_p
        ptrs = partial_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :]
        tile = tl.load(ptrs, mask=(rows < P)[:, None] & mask_n[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
