"""Rotary position embeddings (csrc/rotary.cpp): q's and k's rows in one parallel pass, strided
(B, H, S, D)-style views read and written in place of copies. (Named rope, not rotary: a submodule
called rotary would share its name with the contract function the package exports.)"""
from __future__ import annotations

import torch
from torch import Tensor

from ._ext import _C, _buf


def rotary(q: Tensor, k: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor, sin_k: Tensor, out_q: Tensor,
           out_k: Tensor, interleaved: bool, inverse: bool) -> None:
    """out = x * cos + rotate(x) * sin (inverse: x * cos + rotate^T(x * sin)) for x = q, k.
    q, k, out_q, out_k: 4-D, last dim contiguous, any other strides; cos_* / sin_*: (*x.shape[:3], R)
    broadcast views (last dim contiguous). Bytes: reads (Dq + Dk) per row + the cos / sin rows
    (cached across heads), writes the same D per row."""
    _C.rotary(_buf(q), _buf(k), _buf(cos_q), _buf(sin_q), _buf(cos_k), _buf(sin_k), _buf(out_q), _buf(out_k),
              bool(interleaved), bool(inverse), torch.get_num_threads())
