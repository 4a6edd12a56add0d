"""Gated linear units (SwiGLU / GeGLU): h = act(x Wg^T + bg) * (x Wu^T + bu).

The GEMMs in PyTorch's BLAS (gemm._mm), then one fused C++ pass for the biases, the activation and
the product. Backward: one fused pass for dg, du and both bias gradients, then the GEMMs
dx = dg Wg + du Wu, dWg = dg^T x, dWu = du^T x.
When Wu lies right after Wg in memory (FusedGatedMLP allocates them so), [Wg; Wu] is one (2N, K)
operand without a copy: one GEMM gives gu = [g | u] (M, 2N), the backward pass writes
dgu = [dg | du], and dx = dgu [Wg; Wu] and [dWg; dWu] = dgu^T x are one GEMM each (measured faster
than two: see bench/results/cpu-routes.md). Otherwise: two GEMMs each (a copy of the weights per
call would cost more than it saves), dx accumulated by addmm.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...activations import SAVE_OUTPUT, Activation
from ._ext import _C, _buf, _empty
from .gemm import _mm


def _stacked(wg: Tensor, wu: Tensor) -> Optional[Tensor]:
    """[wg; wu] as a (2N, K) view when wu starts where wg ends in one row-major buffer, else None."""
    n, k = wg.shape
    if (n == 0 or k == 0 or not wg.is_contiguous() or not wu.is_contiguous()
            or wu.data_ptr() != wg.data_ptr() + wg.numel() * wg.element_size()
            or wu.untyped_storage().data_ptr() != wg.untyped_storage().data_ptr()):
        return None
    return wg.as_strided((2 * n, k), (k, 1))


def _halves(g: Tensor, u: Tensor) -> Optional[Tensor]:
    """gu = [g | u] (M, 2N) when g and u are the two column halves of one contiguous buffer."""
    m, n = g.shape
    if (m == 0 or n == 0 or g.stride() != (2 * n, 1) or u.stride() != (2 * n, 1)
            or u.data_ptr() != g.data_ptr() + n * g.element_size()
            or u.untyped_storage().data_ptr() != g.untyped_storage().data_ptr()):
        return None
    return g.as_strided((m, 2 * n), (2 * n, 1))


def gated_forward(x: Tensor, wg: Tensor, wu: Tensor, bg: Optional[Tensor], bu: Optional[Tensor],
                  act: Activation, slope: float, save: bool):
    # x: (M, K), wg / wu: (N, K) -> h: (M, N); saved = (g, u), the biased pre-activations (M, N).
    low = x.dtype in (torch.bfloat16, torch.float16)
    nthreads = torch.get_num_threads()
    w2 = _stacked(wg, wu)
    if w2 is not None:
        m, n = x.shape[0], wg.shape[0]
        if low and (bg is not None or bu is not None):  # biases in the GEMM's accumulator, as F.linear
            b2 = torch.cat([bg if bg is not None else wg.new_zeros(n), bu if bu is not None else wu.new_zeros(n)])
            gu, bg, bu = _mm(x, w2.t(), b2), None, None
        else:
            gu = _mm(x, w2.t())  # (M, 2N) = [g | u]
        h = _empty(m, n, dtype=x.dtype)
        _C.gated_forward_paired(_buf(gu), _buf(bg), _buf(bu), _buf(h), act.code, slope, save, nthreads)
        return h, ((gu[:, :n], gu[:, n:]) if save else None)
    if low:
        # Low precision: the bias joins the GEMM's fp32 accumulator, as in F.linear (one rounding).
        g, u, bg, bu = _mm(x, wg.t(), bg), _mm(x, wu.t(), bu), None, None
    else:
        g, u = _mm(x, wg.t()), _mm(x, wu.t())  # biases join the elementwise pass
    m, n = g.shape
    h = _empty(m, n, dtype=g.dtype) if save else g  # in place over g when nothing is saved
    gb = _buf(g)
    _C.gated_forward(gb, _buf(bg), _buf(u), _buf(bu), _buf(h) if save else gb, act.code, slope, save, nthreads)
    return h, ((g, u) if save else None)


def gated_backward(dh: Tensor, x: Tensor, wg: Tensor, wu: Tensor, saved: Tuple[Tensor, Tensor],
                   act: Activation, slope: float, needs: Tuple[bool, bool, bool, bool, bool]):
    # dh: (M, N) contiguous; g, u: (M, N); x: (M, K); wg, wu: (N, K). needs: (dx, dwg, dwu, dbg, dbu).
    need_dx, need_dwg, need_dwu, need_dbg, need_dbu = needs
    g, u = saved
    m, n = dh.shape
    dbg = torch.empty(n, dtype=dh.dtype) if need_dbg else None
    dbu = torch.empty(n, dtype=dh.dtype) if need_dbu else None
    from_output = act.saves(slope) == SAVE_OUTPUT
    nthreads = torch.get_num_threads()
    gu, w2 = _halves(g, u), _stacked(wg, wu)
    if gu is not None and w2 is not None:
        dgu = _empty(m, 2 * n, dtype=dh.dtype)  # [dg | du]
        _C.gated_backward_paired(_buf(dh), _buf(gu), _buf(dgu), _buf(dbg), _buf(dbu), act.code, slope,
                                 from_output, nthreads)
        dx = _mm(dgu, w2) if need_dx else None  # (M, K): dg Wg + du Wu in one GEMM
        dwg = dwu = None
        if need_dwg and need_dwu:
            dw2 = _mm(dgu.t(), x)               # (2N, K) = [dWg; dWu]
            dwg, dwu = dw2[:n], dw2[n:]
        elif need_dwg or need_dwu:
            half = dgu[:, :n] if need_dwg else dgu[:, n:]
            dw = _mm(half.t(), x)
            dwg, dwu = (dw, None) if need_dwg else (None, dw)
        return dx, dwg, dwu, dbg, dbu
    g, u = g.contiguous(), u.contiguous()
    dg, du = _empty(m, n, dtype=dh.dtype), _empty(m, n, dtype=dh.dtype)
    _C.gated_backward(_buf(dh), _buf(g), _buf(u), _buf(dg), _buf(du), _buf(dbg), _buf(dbu), act.code, slope,
                      from_output, nthreads)
    dx = None
    if need_dx:
        dx = _mm(dg, wg)       # (M, K)
        dx.addmm_(du, wu)      # += du @ Wu, accumulated in the GEMM
    dwg = _mm(dg.t(), x) if need_dwg else None  # (N, K)
    dwu = _mm(du.t(), x) if need_dwu else None  # (N, K)
    return dx, dwg, dwu, dbg, dbu
