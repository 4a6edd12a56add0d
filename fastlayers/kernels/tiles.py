"""Tile helpers shared by the GEMM kernels (kernels/gemm.py, kernels/gemm_tma.py, kernels/gated.py)
and the row-slab elementwise backward kernels (kernels/linear_grad.py, kernels/gated.py): grouped
tile order, int64 tile offsets, the linear_act epilogue, the row-slab tiles; plus ``INTERPRET``
(whether these kernels were built for Triton's interpreter) and ``config`` (a GEMM tile config).
"""
import triton
import triton.language as tl

from .activations import apply_act


@triton.jit
def slab_columns(N, slope_hi, slope_lo, BLOCK_N: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """For the elementwise backward kernels: this program's columns (offsets, mask) and
    leaky_relu's slope recombined from its two fp32 halves."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slope = tl.cast(slope_hi, COMPUTE_DTYPE) + tl.cast(slope_lo, COMPUTE_DTYPE)
    return offs_n, offs_n < N, slope


@triton.jit
def slab_tile(row, M, N, offs_n, mask_n, BLOCK_M: tl.constexpr):
    """Offsets and mask of the BLOCK_M x BLOCK_N tile starting at `row` of an (M, N) contiguous tensor."""
    offs_m = row + tl.arange(0, BLOCK_M)
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    return offs_m[:, None] * N + offs_n[None, :], mask


@triton.jit
def grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The (tile row, tile column) of tile number `pid` in grouped order: consecutive tiles walk
    GROUP_M tile rows down one tile column, so the B strip they share stays in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_offsets(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row and column offsets of tile (pid_m, pid_n) (int64, so tensors past 2^31 elements are
    addressed right) and their masks."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m.to(tl.int64), offs_n.to(tl.int64), offs_m < M, offs_n < N


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The tile of program `pid` in grouped order (grouped_pid): its offsets and masks
    (tile_offsets)."""
    pid_m, pid_n = grouped_pid(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)


@triton.jit
def gemm_epilogue(acc, c_ptr, z_ptr, bias_ptr, offs_m64, offs_n64, mask_m, mask_n,
                  stride_cm, stride_cn, slope_hi, slope_lo,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
                  ACC_DTYPE: tl.constexpr):
    """Stores one tile of C = act(acc + bias) (and Z = acc + bias when STORE_Z) in their own
    dtypes: the epilogue of both GEMM kernels (arguments as in kernels/gemm.py's _gemm_kernel)."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n64, mask=mask_n, other=0.0)
        acc = acc + bias.to(ACC_DTYPE)[None, :]
    c_offs = offs_m64[:, None] * stride_cm + offs_n64[None, :] * stride_cn
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_Z:
        tl.store(z_ptr + c_offs, acc.to(z_ptr.dtype.element_ty), mask=mask)
    slope = tl.cast(slope_hi, ACC_DTYPE) + tl.cast(slope_lo, ACC_DTYPE)
    y = apply_act(acc, ACT, slope)
    tl.store(c_ptr + c_offs, y.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _probe():
    pass


# Whether these kernels run in Triton's interpreter: triton decides when each @triton.jit
# decorator runs (TRITON_INTERPRET=1 at import time), so ask the decorated function.
INTERPRET = type(_probe).__name__ == "InterpretedFunction"


def config(bm: int, bn: int, bk: int, group: int, warps: int, stages: int) -> triton.Config:
    """A GEMM tile config: BLOCK_M x BLOCK_N x BLOCK_K tiles, GROUP_M row tiles per group."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)
