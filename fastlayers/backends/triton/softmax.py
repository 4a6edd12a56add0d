"""softmax / log_softmax and the attention-score softmax on the Triton backend.

softmax / log_softmax (kernels/softmax.py): single-pass kernels for rows that fit one tile,
streaming kernels (online max and rescaled sum, then a normalising pass) for longer rows, and split
rows (several programs per row: per-segment partials, then a combine and write per segment) when
long rows are too few to fill the GPU.
attention_softmax (kernels/attention_softmax.py): softmax over S of (B, H, L, S) scores, scaled,
masked (bool or additive, broadcast views) and / or causal, with softmax's plan (single pass or
streaming).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from ...kernels import attention_softmax as _ak
from ...kernels import next_pow2
from ...kernels import softmax as _sm
from .device import num_sms
from .launch import kernel_dtype, launch, split_slope
from ..._dtypes import compute_dtype

_LOW_DTYPES = (torch.float16, torch.bfloat16)


def _softmax_launch(op: str, fwd: bool, log: bool, out: Tensor, *tensors: Tensor) -> None:
    outer, length, inner = out.shape
    rows = outer * inner
    if out.numel() == 0:
        return
    single, block_r, block_l, warps = _sm.plan(rows, length, inner, out.dtype == torch.float64)
    meta = dict(COMPUTE_DTYPE=kernel_dtype(out.dtype), STRIDED=inner > 1, BLOCK_R=block_r,
                BLOCK_L=block_l, num_warps=warps)
    tiles = _sm.grid_size(rows, inner, block_r)
    segments, seg = (1, length) if single else _sm.split_plan(rows, length, inner, block_r, block_l,
                                                              num_sms(out))
    if segments > 1:
        _softmax_split(op, fwd, log, out, tensors, tiles, segments, seg, meta)
        return
    if fwd:
        kernel = _sm.softmax_fwd_kernel if single else _sm.softmax_fwd_streaming_kernel
    else:
        kernel = _sm.softmax_bwd_kernel if single else _sm.softmax_bwd_streaming_kernel
    launch(op, out, lambda: kernel[(tiles,)](*tensors, out, rows, length, inner, LOG=log, **meta))


def _softmax_split(op: str, fwd: bool, log: bool, out: Tensor, tensors: Tuple[Tensor, ...],
                   tiles: int, segments: int, seg: int, meta: dict) -> None:
    """Split rows (see kernels/softmax.py): per-segment partials, then each segment's output from
    its row's combined partials. Partials: (2, R, S) (max, sum exp) forward, (R, S) backward, in
    the compute dtype."""
    outer, length, inner = out.shape
    rows = outer * inner
    part = torch.empty((2 if fwd else 1, rows, segments), device=out.device,
                       dtype=compute_dtype(out.dtype))
    grid = (tiles, segments)
    sizes = (rows, length, inner, seg, segments)
    if fwd:
        launch(op, out, lambda: _sm.softmax_fwd_split_stats_kernel[grid](*tensors, part, *sizes, **meta))
        kernel = _sm.softmax_fwd_split_kernel
    else:
        launch(op, out, lambda: _sm.softmax_bwd_split_stats_kernel[grid](
            *tensors, part, *sizes, LOG=log, **meta))
        kernel = _sm.softmax_bwd_split_kernel
    launch(op, out, lambda: kernel[grid](*tensors, out, part, *sizes, LOG=log,
                                          BLOCK_S=next_pow2(segments), **meta))


def softmax_forward(x: Tensor, log: bool) -> Tensor:
    """softmax (or log_softmax) over dim 1 of x: (outer, L, inner) contiguous.
    Bytes: 2 * numel * itemsize (single pass) or 3 * numel * itemsize (streaming, split rows)."""
    op = "fastlayers.log_softmax" if log else "fastlayers.softmax"
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    _softmax_launch(op, True, log, y, x)
    return y


def softmax_backward(dy: Tensor, y: Tensor, log: bool) -> Tensor:
    """dx from dy and the forward's output y, both (outer, L, inner) contiguous.
    Bytes: 3 * numel * itemsize (single pass) or 5 * numel * itemsize (streaming, split rows)."""
    op = "fastlayers.log_softmax (backward)" if log else "fastlayers.softmax (backward)"
    dy, y = dy.contiguous(), y.contiguous()
    dx = torch.empty_like(y, memory_format=torch.contiguous_format)
    _softmax_launch(op, False, log, dx, dy, y)
    return dx


# ----------------------------------------------------------------------------- attention scores
def _attn_args(x: Tensor, mask: Optional[Tensor], scale: float):
    """(mask pointer tensor, mask kind, mask strides, scale halves, plan) for (B, H, L, S) x."""
    B, H, L, S = x.shape
    if mask is None:
        mt, kind, strides = x, 0, (0, 0, 0, 0)
    elif mask.dtype == torch.bool:
        mt, kind, strides = mask.view(torch.uint8), 1, mask.stride()
    else:
        mt, kind, strides = mask, 2, mask.stride()
    rows = B * H * L
    single, block_r, block_l, warps = _sm.plan(rows, S, 1, x.dtype == torch.float64)
    return mt, kind, strides, split_slope(scale), (rows, single, block_r, block_l, warps)


def attention_softmax_forward(x: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                              out_dtype: torch.dtype) -> Tensor:
    """x: (B, H, L, S) contiguous; mask None or a (B, H, L, S) strided view (bool or x's dtype) -> y
    of out_dtype. Single pass (softmax's plan) or streaming for long rows.
    Bytes: reads x (+ mask; streaming: x twice), writes y."""
    op = "fastlayers.attention_softmax"
    B, H, L, S = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    if y.numel() == 0:
        return y
    mt, kind, strides, (hi, lo), (rows, single, block_r, block_l, warps) = _attn_args(x, mask, scale)
    kernel = _ak.attn_softmax_fwd_kernel if single else _ak.attn_softmax_fwd_streaming_kernel
    grid = (triton.cdiv(rows, block_r),)
    launch(op, x, lambda: kernel[grid](
        x, mt, y, rows, L, H, S, hi, lo, *strides, MASK_KIND=kind, CAUSAL=causal,
        ROUND=x.dtype in _LOW_DTYPES and (scale != 1.0 or kind == 2), COMPUTE_DTYPE=kernel_dtype(x.dtype),
        BLOCK_R=block_r, BLOCK_L=block_l, num_warps=warps))
    return y


def attention_softmax_backward(dy: Tensor, y: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                               in_dtype: torch.dtype) -> Tensor:
    """dy, y: (B, H, L, S) contiguous -> dscores in in_dtype; only a bool mask is read.
    Bytes: reads dy, y (+ bool mask; streaming: twice), writes dscores."""
    op = "fastlayers.attention_softmax (backward)"
    B, H, L, S = y.shape
    dx = torch.empty(y.shape, device=y.device, dtype=in_dtype)
    if dx.numel() == 0:
        return dx
    bmask = mask if mask is not None and mask.dtype == torch.bool else None
    mt, kind, strides, (hi, lo), (rows, single, block_r, block_l, warps) = _attn_args(dx, bmask, scale)
    kernel = _ak.attn_softmax_bwd_kernel if single else _ak.attn_softmax_bwd_streaming_kernel
    grid = (triton.cdiv(rows, block_r),)
    launch(op, y, lambda: kernel[grid](
        dy, y, mt, dx, rows, L, H, S, hi, lo, *strides, MASK_KIND=kind, CAUSAL=causal,
        COMPUTE_DTYPE=kernel_dtype(dx.dtype), BLOCK_R=block_r, BLOCK_L=block_l, num_warps=warps))
    return dx
