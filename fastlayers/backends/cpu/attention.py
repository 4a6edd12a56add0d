"""Attention on the CPU:

* the attention-score softmax, softmax(scores * scale + mask) with an optional causal mask
  (csrc/attention_softmax.cpp: one pass per row each way, rows handed to threads in blocks of 16
  round robin (causal rows differ in cost), the mask read through its strides);
* fused attention, softmax(scale q k^T [causal]) v and its backward (csrc/attention.cpp: no (L, S)
  probabilities in memory; q, k, v read through their strides)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._ext import _C, _CODES, _buf, _empty

_ATTN_BOOL_CODE = _C.ATTN_BOOL_CODE


def _mask_buf(mask: Optional[Tensor]):
    """A (B, H, L, S) strided mask view as a buffer descriptor (strides may be 0), or None."""
    if mask is None:
        return None
    code = _ATTN_BOOL_CODE if mask.dtype == torch.bool else _CODES[mask.dtype]
    return (mask.data_ptr(), code, mask.shape, mask.stride())


def attention_softmax_forward(x: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                              out_dtype: torch.dtype) -> Tensor:
    """x: (B, H, L, S) contiguous; mask None or a (B, H, L, S) strided view (bool or x's dtype) -> y
    (B, H, L, S) of out_dtype (x's, or float32 for 16-bit x). Bytes: reads x (about half with causal)
    and the mask, writes y."""
    y = _empty(*x.shape, dtype=out_dtype)
    _C.attention_softmax_forward(_buf(x), _mask_buf(mask), _buf(y), float(scale), bool(causal),
                                 torch.get_num_threads())
    return y


def attention_softmax_backward(dy: Tensor, y: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                               in_dtype: torch.dtype) -> Tensor:
    """dy, y: (B, H, L, S) contiguous (the probabilities' dtype); mask: as the forward's (only a bool
    one is read) -> dscores (B, H, L, S) in in_dtype. Bytes: reads dy, y; writes dscores."""
    dx = _empty(*y.shape, dtype=in_dtype)
    bmask = mask if mask is not None and mask.dtype == torch.bool else None
    _C.attention_softmax_backward(_buf(dy), _buf(y), _mask_buf(bmask), _buf(dx), float(scale), bool(causal),
                                  torch.get_num_threads())
    return dx


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tuple[Tensor, Tensor]:
    """q (B, H, L, D), k, v (B, H, S, D), any strides, last dim contiguous -> (out laid out as
    torch.empty_like(q), lse (B, H, L) float32 / float64). Flops 4 B H L S D (about half causal);
    bytes: q, k, v and out once (k, v once per thread and (b, h))."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=_lse_dtype(q.dtype))
    _C.attention_forward(_buf(q), _buf(k), _buf(v), _buf(out), _buf(lse), float(scale), bool(causal),
                         torch.get_num_threads())
    return out, lse


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                       causal: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) laid out as q, k, v (torch.empty_like), from dout and the forward's out and lse.
    Flops 2.5x the forward's; parallel over (b, h) (dk, dv summed in one thread each)."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _C.attention_backward(_buf(q), _buf(k), _buf(v), _buf(out), _buf(dout), _buf(lse), _buf(dq), _buf(dk),
                          _buf(dv), float(scale), bool(causal), torch.get_num_threads())
    return dq, dk, dv
