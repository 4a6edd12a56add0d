"""The persistent TMA GEMM: ``tma_gemm_kernel``, the GEMM and epilogue of
kernels/gemm.py (``gemm_epilogue``, shared) for fp16 / bf16 on sm_90+: at most one program per SM,
each looping over tiles in grouped order, A and B tiles loaded through TMA descriptors made on the
device (A row-major, B row-major or W^T; the launcher, fastlayers/backends/triton/gemm.py, checks
TMA's alignment rules and falls back to kernels/gemm.py's ``gemm_kernel`` otherwise).
Cost: as gemm_kernel's, 2*M*N*K flops.
"""
import triton
import triton.language as tl

from .gemm import INTERPRETER_GEMM_CONFIG, autotuned
from .tiles import INTERPRET, config, gemm_epilogue, grouped_pid, tile_offsets

# sm_90+ only, fp16 / bf16 data: A row-major, B row-major or its transpose (the forward's W^T and
# the backward's dx = dz @ W), strides 16-byte aligned (TMA's rules; fastlayers/backends/triton/gemm.py
# `tma_gemm_ok` checks them). Configs: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages,
# plain_only), GROUP_M 8, each passing scripts/compile_gate.py's "gemm_tma" family on sm_90.
TMA_GEMM_CONFIGS = [(128, 256, 64, 8, 3, True), (256, 128, 64, 8, 3, True),
                    (128, 128, 64, 8, 4, False), (128, 128, 64, 8, 3, False),
                    (128, 64, 64, 4, 4, False)]
TMA_AUTOTUNE_KEY = ["M_BUCKET", "N_BUCKET", "K_BUCKET", "ACT", "HAS_BIAS", "STORE_Z", "B_KMAJOR"]


def tma_gemm_configs(plain: bool) -> list:
    """The configs autotuning chooses from for the persistent TMA GEMM, largest tiles first."""
    if INTERPRET:
        return [INTERPRETER_GEMM_CONFIG]
    return [config(bm, bn, bk, 8, w, st) for bm, bn, bk, w, st, plain_only in TMA_GEMM_CONFIGS
            if plain or not plain_only]


@triton.jit
def _gemm_tma_persistent_kernel(
    a_ptr, b_ptr, c_ptr, z_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_b, stride_cm, stride_cn,
    slope_hi, slope_lo,
    M_BUCKET, N_BUCKET, K_BUCKET,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr, B_KMAJOR: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = act(A[M, K] @ B[K, N] + bias[N]) (and Z) as _gemm_kernel, persistent: the grid
    is at most one program per SM, and program p computes tiles p, p + grid, ... in grouped
    order; A and B tiles come through TMA tensor descriptors made on the device (the launcher
    provides their global scratch through triton.set_allocator).

    a_ptr: (M, K) with strides (stride_am, 1). B_KMAJOR: b_ptr is B^T, (N, K) with strides
    (stride_b, 1) (the forward's weight); else B, (K, N) with strides (stride_b, 1). Out-of-range
    rows / columns of a tile load as zeros (TMA's padding), so M, N, K need not be multiples of
    the tile. The epilogue (gemm_epilogue) stores through pointers: C and Z any strides.
    fp32 accumulation. DOT_FP32, M_BUCKET, N_BUCKET, K_BUCKET: as in _gemm_kernel.
    """
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    if B_KMAJOR:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = grouped_pid(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        row = pid_m * BLOCK_M
        col = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([row, k0])
            if B_KMAJOR:
                b = b_desc.load([col, k0]).T
            else:
                b = b_desc.load([k0, col])
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        offs_m64, offs_n64, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
        gemm_epilogue(acc, c_ptr, z_ptr, bias_ptr, offs_m64, offs_n64, mask_m, mask_n,
                      stride_cm, stride_cn, slope_hi, slope_lo, HAS_BIAS, ACT, STORE_Z, tl.float32)


tma_gemm_kernel = _gemm_tma_persistent_kernel  # launched directly with one config (heuristic)


def autotuned_tma_gemm(configs: list):
    """The persistent TMA GEMM autotuned over `configs` (as kernels/gemm.py's autotuned_gemm)."""
    return autotuned(_gemm_tma_persistent_kernel, TMA_AUTOTUNE_KEY, configs)
