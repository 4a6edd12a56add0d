"""Rotary position embeddings on the Triton backend (kernels/rotary.py): q and k in one launch,
strided views read and written in place.
"""
from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from ...kernels import rotary as _rk
from .launch import kernel_dtype, launch


def rotary(q: Tensor, k: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor, sin_k: Tensor, out_q: Tensor,
           out_k: Tensor, interleaved: bool, inverse: bool) -> None:
    """out = x * cos + rotate(x) * sin (inverse: x * cos + rotate^T(x * sin)) for x = q, k: 4-D views,
    last dim contiguous; cos_* / sin_* (*x.shape[:3], R) broadcast views. One launch over the rows
    of both. Bytes: reads D + 2R per row (cos / sin from L2 when broadcast), writes D per row."""
    r = cos_q.shape[-1]
    rows_q, rows_k = math.prod(q.shape[:3]), math.prod(k.shape[:3])
    block_rows, block_h, block_p, warps = _rk.plan(r, max(q.shape[3], k.shape[3]), q.dtype == torch.float64)
    progs_q, progs_k = triton.cdiv(rows_q, block_rows), triton.cdiv(rows_k, block_rows)
    if not progs_q + progs_k:
        return

    def strides(*ts):
        return [s for t in ts for s in t.stride()[:3]]

    launch("fastlayers.rotary", q, lambda: _rk.rotary_kernel[(progs_q + progs_k,)](
        q, out_q, cos_q, sin_q, k, out_k, cos_k, sin_k,
        rows_q, q.shape[1], q.shape[2], *strides(q, out_q, cos_q, sin_q), q.shape[3],
        rows_k, k.shape[1], k.shape[2], *strides(k, out_k, cos_k, sin_k), k.shape[3],
        r, progs_q, INTERLEAVED=bool(interleaved), INVERSE=bool(inverse), BLOCK_ROWS=block_rows, BLOCK_H=block_h,
        BLOCK_P=block_p, COMPUTE_DTYPE=kernel_dtype(q.dtype), num_warps=warps))
