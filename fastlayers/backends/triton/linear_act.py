"""linear_act on the Triton backend: ``y = act(x @ W^T + b)`` and its backward.

Forward: one GEMM launch (gemm.py ``launch_gemm``) whose epilogue adds the bias, applies the
activation and stores y (and the pre-activation z when the backward needs it). fp16 / bf16 GEMMs
with TMA-legal operands on sm_90+ GPUs run the persistent TMA kernel (gemm.py ``tma_gemm_ok``).
Backward: one elementwise launch ``dz = dy * act'(saved)`` (kernels/linear_grad.py) that also
writes per-slab column sums of dz, a small fixed-order reduction of those sums into db, then the
GEMMs dx = dz @ W and dW = dz^T @ x. (Fusing act' into the GEMM prologue instead would save one
write + read of dz; not measured yet.)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from ...activations import SAVE_INPUT, SAVE_OUTPUT, Activation
from ...kernels import linear_grad as _lg
from .gemm import NONE, launch_gemm, sum_rows
from .launch import kernel_dtype, launch, split_slope
from ..._dtypes import compute_dtype


def linear_act_forward(x: Tensor, w: Tensor, b: Optional[Tensor], act: Activation, slope: float,
                       save: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """y = act(x @ w.T + b): x (M, K), w (N, K), b (N,) or None; any strides.
    Cost: 2*M*N*K flops; reads M*K + N*K (+ N), writes M*N (+ M*N for z) elements."""
    op = "fastlayers.linear_act"
    M, N = x.shape[0], w.shape[0]
    kind = act.saves(slope)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    z = torch.empty_like(y) if save and kind == SAVE_INPUT else None
    launch_gemm(op, x, w.t(), y, z=z, bias=b, act_code=act.code, slope=slope)
    if not save:
        return y, None
    return y, (y if kind == SAVE_OUTPUT else z)


# Target number of (row-slab x column-block) programs of act_grad_bias_kernel: enough to fill a
# GPU; each program then loops over its slab. Fixed, so db's summation order depends only on
# the shape.
_GRAD_TARGET_PROGRAMS = 1024


def row_slabs(M: int, N: int, bm: int, bn: int) -> Tuple[int, int, int]:
    """The grid of the elementwise backward kernels: (row-slab programs, column blocks, rows per
    slab). About _GRAD_TARGET_PROGRAMS programs in all; slabs are whole multiples of bm rows, so
    the bias gradient's summation order depends only on the shape."""
    col_blocks = triton.cdiv(N, bn)
    row_blocks = triton.cdiv(M, bm)
    progs = min(row_blocks, max(1, _GRAD_TARGET_PROGRAMS // col_blocks))
    rows_per_prog = triton.cdiv(row_blocks, progs) * bm
    return triton.cdiv(M, rows_per_prog), col_blocks, rows_per_prog


def _act_grad_and_bias(op: str, dy: Tensor, saved: Optional[Tensor], act: Activation, slope: float,
                       need_dz: bool, need_db: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """dz = dy * act'(saved) (when need_dz) and db = dz.sum(0) (when need_db)."""
    M, N = dy.shape
    store_dz = need_dz and act.code != NONE
    dz = torch.empty_like(dy) if store_dz else (dy if need_dz else None)
    if not (store_dz or need_db):
        return dz, None
    compute = compute_dtype(dy.dtype)
    if M == 0 or N == 0:
        return dz, (torch.zeros(N, device=dy.device, dtype=dy.dtype) if need_db else None)
    bm = _lg.GRAD_BLOCK_M_FP64 if dy.dtype == torch.float64 else _lg.GRAD_BLOCK_M
    bn = _lg.GRAD_BLOCK_N
    progs, col_blocks, rows_per_prog = row_slabs(M, N, bm, bn)
    partial = torch.empty((progs, N), device=dy.device, dtype=compute) if need_db else dy
    hi, lo = split_slope(slope)
    saved_arg = saved.contiguous() if saved is not None and act.code != NONE else dy
    launch(op, dy, lambda: _lg.act_grad_bias_kernel[(progs, col_blocks)](
        dy, saved_arg, dz if store_dz else dy, partial,
        M, N, rows_per_prog, hi, lo,
        ACT=act.code, STORE_DZ=store_dz, NEED_DB=need_db,
        COMPUTE_DTYPE=kernel_dtype(dy.dtype), BLOCK_M=bm, BLOCK_N=bn,
        num_warps=_lg.GRAD_NUM_WARPS))
    if not need_db:
        return dz, None
    db = torch.empty(N, device=dy.device, dtype=dy.dtype)
    sum_rows(op, partial, db)
    return dz, db


def linear_act_backward(dy: Tensor, x: Optional[Tensor], w: Optional[Tensor],
                        saved: Optional[Tensor], act: Activation, slope: float,
                        needs: Tuple[bool, bool, bool]
                        ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """dz = dy * act'(saved); dx = dz @ w (M, K); dw = dz^T @ x (N, K); db = dz.sum(0) (N,).
    dy: (M, N) contiguous; x (M, K) and w (N, K) any strides (None when not needed).
    Cost: 4*M*N*K flops for dx and dw; the elementwise pass reads 2*M*N and writes M*N."""
    op = "fastlayers.linear_act (backward)"
    need_dx, need_dw, need_db = needs
    dy = dy.contiguous()
    dz, db = _act_grad_and_bias(op, dy, saved, act, slope, need_dx or need_dw, need_db)
    dx = dw = None
    if need_dx:
        dx = torch.empty((dy.shape[0], w.shape[1]), device=dy.device, dtype=w.dtype)
        launch_gemm(op, dz, w, dx)
    if need_dw:
        dw = torch.empty((dy.shape[1], x.shape[1]), device=dy.device, dtype=x.dtype)
        launch_gemm(op, dz.t(), x, dw)
    return dx, dw, db
