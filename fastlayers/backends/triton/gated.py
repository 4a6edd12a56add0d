"""The gated linear unit on the Triton backend: ``h = act(x @ Wg^T + bg) * (x @ Wu^T + bu)``.

Forward: one launch of kernels/gated.py's dual-accumulator GEMM (x read once for both products;
bias, activation and product in the epilogue). Backward: one elementwise launch for dg, du and
the partial bias sums, fixed-order reductions into dbg / dbu, then linear_act's GEMM (gemm.py) for
dx = dg Wg (+ du Wu, a second GEMM added in place: a dual-operand GEMM would save that M*K
temporary; not written yet), dWg = dg^T x and dWu = du^T x.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from ...activations import SAVE_OUTPUT, Activation
from ...kernels import gated as _gl
from ...kernels import gemm as _la
from ...kernels import next_pow2
from .device import INTERPRETED, gemm_precision
from .gemm import column_sums, launch_gemm
from .launch import kernel_dtype, launch, split_slope
from .linear_act import row_slabs
from ..._dtypes import compute_dtype


def gated_forward(x: Tensor, wg: Tensor, wu: Tensor, bg: Optional[Tensor], bu: Optional[Tensor],
                  act: Activation, slope: float, save: bool):
    """h = act(x Wg^T + bg) * (x Wu^T + bu): x (M, K), wg / wu (N, K) any strides, biases (N,)
    contiguous or None. saved = (g, u), the biased pre-activations (M, N), when save.
    Cost: 4*M*N*K flops; reads M*K + 2*N*K (+2N), writes M*N (3*M*N when saving)."""
    op = "fastlayers.gated_linear"
    M, K = x.shape
    N = wg.shape[0]
    h = torch.empty((M, N), device=x.device, dtype=x.dtype)
    g = torch.empty_like(h) if save else None
    u = torch.empty_like(h) if save else None
    if M and N:
        if K == 0:  # nothing to load: point the operands at h so no empty tensor is passed
            x, wg, wu = h, h.t(), h.t()
        precision = gemm_precision(h)
        kernel = _gl.gated_gemm_kernels[_la.dtype_class(str(h.dtype).rsplit(".", 1)[-1], precision)]
        hi, lo = split_slope(slope)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        launch(op, h, lambda: kernel[grid](
            x, wg, wu, h, g if save else h, u if save else h,
            bg if bg is not None else h, bu if bu is not None else h,
            M, N, K,
            x.stride(0), x.stride(1), wg.stride(0), wg.stride(1), wu.stride(0), wu.stride(1),
            hi, lo, next_pow2(M), next_pow2(N), next_pow2(K),
            HAS_BG=bg is not None, HAS_BU=bu is not None, ACT=act.code, STORE_GU=save,
            ACC_DTYPE=kernel_dtype(h.dtype), PRECISION=precision,
            DOT_FP32=INTERPRETED and h.dtype == torch.bfloat16))
    return h, ((g, u) if save else None)


def gated_backward(dh: Tensor, x: Tensor, wg: Tensor, wu: Tensor, saved, act: Activation, slope: float,
                   needs: Tuple[bool, bool, bool, bool, bool]):
    """dg = dh * u * act'(g), du = dh * act(g); dx = dg Wg + du Wu (M, K); dWg = dg^T x,
    dWu = du^T x (N, K); dbg, dbu = column sums (N,). dh: (M, N) contiguous; g, u: the saved
    pre-activations. Cost: 6*M*N*K flops (dx, dWg, dWu); the elementwise pass reads 3*M*N and
    writes 2*M*N."""
    op = "fastlayers.gated_linear (backward)"
    need_dx, need_dwg, need_dwu, need_dbg, need_dbu = needs
    g, u = saved
    dh = dh.contiguous()
    M, N = dh.shape
    K = x.shape[1]
    dg, du = torch.empty_like(dh), torch.empty_like(dh)
    dbg = dbu = None
    if M == 0 or N == 0:  # dg, du are empty
        if need_dbg:
            dbg = torch.zeros(N, device=dh.device, dtype=dh.dtype)
        if need_dbu:
            dbu = torch.zeros(N, device=dh.device, dtype=dh.dtype)
    else:
        compute = compute_dtype(dh.dtype)
        bm = _gl.GRAD_BLOCK_M_FP64 if dh.dtype == torch.float64 else _gl.GRAD_BLOCK_M
        bn = _gl.GRAD_BLOCK_N
        progs, col_blocks, rows_per_prog = row_slabs(M, N, bm, bn)
        pg = torch.empty((progs, N), device=dh.device, dtype=compute) if need_dbg else dh
        pu = torch.empty((progs, N), device=dh.device, dtype=compute) if need_dbu else dh
        hi, lo = split_slope(slope)
        launch(op, dh, lambda: _gl.gated_grad_kernel[(progs, col_blocks)](
            dh, g.contiguous(), u.contiguous(), dg, du, pg, pu, M, N, rows_per_prog, hi, lo,
            ACT=act.code, FROM_OUTPUT=act.saves(slope) == SAVE_OUTPUT, NEED_DBG=need_dbg,
            NEED_DBU=need_dbu, COMPUTE_DTYPE=kernel_dtype(dh.dtype), BLOCK_M=bm, BLOCK_N=bn,
            num_warps=_gl.GRAD_NUM_WARPS))
        if need_dbg:
            dbg = column_sums(op, pg, dh.dtype)
        if need_dbu:
            dbu = column_sums(op, pu, dh.dtype)
    # The GEMMs write zeros for an empty reduction (N = 0 for dx, M = 0 for the weights).
    dx = dwg = dwu = None
    if need_dx:
        dx = torch.empty((M, K), device=dh.device, dtype=dh.dtype)
        tmp = torch.empty_like(dx)
        launch_gemm(op, dg, wg, dx)   # (M, K)
        launch_gemm(op, du, wu, tmp)
        dx += tmp
    if need_dwg:
        dwg = torch.empty((N, K), device=dh.device, dtype=dh.dtype)
        launch_gemm(op, dg.t(), x, dwg)  # (N, K)
    if need_dwu:
        dwu = torch.empty((N, K), device=dh.device, dtype=dh.dtype)
        launch_gemm(op, du.t(), x, dwu)
    return dx, dwg, dwu, dbg, dbu
