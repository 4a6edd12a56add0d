"""RMSNorm / LayerNorm with the residual add on the Triton backend (kernels/norms.py): one program
per row forward; the backward's programs each take a slab of rows and write their dw / db partials,
summed in a fixed order (gemm.py ``column_sums``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ...kernels import norms as _nk
from .device import num_sms
from .gemm import column_sums
from .launch import kernel_dtype, launch
from ..._dtypes import compute_dtype


_NORM_KINDS = {"rms": 0, "rms_hf": 1, "layer": 2}
_NORM_ROWS_PER_SM = 4  # backward programs per SM: each sums its rows' dw / db partials


def norm_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float, kind: str, save: bool):
    """(y, s, mean, rstd) for x, residual (M, N) contiguous, weight / bias (N,) contiguous or None.
    One program per row (kernels/norms.py). Bytes: reads (1|2)*M*N, writes (1|2)*M*N + stats."""
    op = "fastlayers.layer_norm" if kind == "layer" else "fastlayers.rms_norm"
    M, N = x.shape
    fp64 = x.dtype == torch.float64
    cd = torch.float64 if fp64 else torch.float32
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(y) if residual is not None else None
    mean = torch.empty(M, device=x.device, dtype=cd) if save and kind == "layer" else None
    rstd = torch.empty(M, device=x.device, dtype=cd) if save else None
    if M and not N:  # mean of an empty row: NaN, as torch
        for t in (mean, rstd):
            if t is not None:
                t.fill_(float("nan"))
    if M and N:
        one, block, warps = _nk.plan(N, fp64)
        launch(op, y, lambda: _nk.norm_fwd_kernel[(M,)](
            x, x if residual is None else residual, y if s is None else s, x if weight is None else weight,
            x if bias is None else bias, y, rstd if mean is None else mean, y if rstd is None else rstd, N, float(eps),
            HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, KIND=_NORM_KINDS[kind],
            STORE_STATS=save, ONE_BLOCK=one, BLOCK_N=block, COMPUTE_DTYPE=kernel_dtype(x.dtype), num_warps=warps))
    return y, s, mean, rstd


def norm_backward(dy: Tensor, ds: Optional[Tensor], src: Tensor, weight: Optional[Tensor],
                  mean: Optional[Tensor], rstd: Tensor, kind: str, needs):
    """(dx, dw, db): P programs of ceil(M / P) rows each write their dw / db partials (P, N), summed
    in a fixed order by sum_rows_kernel. Bytes: reads (2|3)*M*N, writes M*N + 2*P*N (partials)."""
    op = "fastlayers.layer_norm (backward)" if kind == "layer" else "fastlayers.rms_norm (backward)"
    M, N = src.shape
    need_dx, need_dw, need_db = needs[0], needs[1] and weight is not None, len(needs) > 2 and needs[2]
    dx = torch.empty_like(src, memory_format=torch.contiguous_format) if need_dx else None
    cd = compute_dtype(src.dtype)
    programs = max(1, min(M, _NORM_ROWS_PER_SM * num_sms(src)))
    rows = triton.cdiv(max(M, 1), programs)
    programs = triton.cdiv(max(M, 1), rows)
    dw_part = torch.zeros((programs, N), device=src.device, dtype=cd) if need_dw else None
    db_part = torch.zeros((programs, N), device=src.device, dtype=cd) if need_db else None
    if M and N and (need_dx or need_dw or need_db):
        one, block, warps = _nk.plan(N, src.dtype == torch.float64)
        launch(op, src, lambda: _nk.norm_bwd_kernel[(programs,)](
            dy, src if ds is None else ds, src, src if weight is None else weight, rstd if mean is None else mean,
            rstd, src if dx is None else dx, rstd if dw_part is None else dw_part,
            rstd if db_part is None else db_part, M, N, rows,
            HAS_DS=ds is not None, HAS_W=weight is not None, KIND=_NORM_KINDS[kind], NEED_DX=need_dx,
            NEED_DW=need_dw, NEED_DB=need_db, ONE_BLOCK=one, BLOCK_N=block, COMPUTE_DTYPE=kernel_dtype(src.dtype),
            num_warps=warps))
    dw = column_sums(op, dw_part, src.dtype) if need_dw else None
    db = column_sums(op, db_part, src.dtype) if need_db else None
    return dx, dw, db
