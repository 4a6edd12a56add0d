"""RMSNorm / LayerNorm with the residual add (csrc/norms.cpp: one pass per row each way, threads own
whole rows, weight / bias gradients as per-thread fp64 partial sums added in thread order)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._ext import _C, _buf, _empty
from ..._dtypes import compute_dtype

_NORM_KINDS = {"rms": 0, "rms_hf": 1, "layer": 2}


def norm_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float, kind: str, save: bool):
    """x, residual: (M, N) contiguous; weight, bias (N,) contiguous or None -> (y, s, mean, rstd):
    y (M, N); s = x + residual (None without residual); mean ("layer") and rstd (M,) in fp32 (fp64
    for fp64) when save, else None. Bytes: reads (1|2)*M*N, writes (1|2)*M*N (+ 8M)."""
    m, n = x.shape
    y = _empty(m, n, dtype=x.dtype)
    s = _empty(m, n, dtype=x.dtype) if residual is not None else None
    cd = compute_dtype(x.dtype)
    mean = torch.empty(m, dtype=cd) if save and kind == "layer" else None
    rstd = torch.empty(m, dtype=cd) if save else None
    _C.norm_forward(_buf(x), _buf(residual), _buf(s), _buf(weight), _buf(bias), _buf(y), _buf(mean),
                    _buf(rstd), _NORM_KINDS[kind], float(eps), torch.get_num_threads())
    return y, s, mean, rstd


def norm_backward(dy: Tensor, ds: Optional[Tensor], src: Tensor, weight: Optional[Tensor],
                  mean: Optional[Tensor], rstd: Tensor, kind: str, needs):
    """(dx, dw, db): dy, ds (or None), src (M, N) contiguous; needs = (dx, dw, db).
    Bytes: reads (2|3)*M*N, writes M*N."""
    m, n = src.shape
    dx = _empty(m, n, dtype=src.dtype) if needs[0] else None
    dw = torch.empty(n, dtype=src.dtype) if needs[1] and weight is not None else None
    db = torch.empty(n, dtype=src.dtype) if len(needs) > 2 and needs[2] else None
    if dx is None and dw is None and db is None:
        return None, None, None
    _C.norm_backward(_buf(dy), _buf(ds), _buf(src), _buf(weight), _buf(mean), _buf(rstd), _buf(dx), _buf(dw),
                     _buf(db), _NORM_KINDS[kind], torch.get_num_threads())
    return dx, dw, db
