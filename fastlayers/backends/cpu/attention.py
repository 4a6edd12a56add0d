"""The attention-score softmax, softmax(scores * scale + mask) with an optional causal mask
(csrc/attention_softmax.cpp: one pass per row each way, rows handed to threads in blocks of 16 round
robin (causal rows differ in cost), the mask read through its strides)."""
from __future__ import annotations

from typing import Optional

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
