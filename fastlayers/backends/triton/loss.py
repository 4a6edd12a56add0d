"""Cross entropy on the Triton backend (the math: fastlayers/ops/_loss.py; kernels in
kernels/cross_entropy.py): per-row losses and stats in one program per row, the gradient written
in place or into a block of a larger tensor, and the fused linear + cross entropy's chunk gradients
(dh, dW, db) through gemm.py's GEMM.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...kernels import cross_entropy as _ce
from .gemm import launch_gemm
from .launch import kernel_dtype, launch, split_slope
from ..._dtypes import compute_dtype


def _ce_args(x: Tensor, target: Tensor, weight: Optional[Tensor]):
    probs = target.is_floating_point()
    # unused pointers point at x (never read: the kernels branch on constexpr flags)
    return (x if probs else target), (target if probs else x), (weight if weight is not None else x), probs


def cross_entropy_forward(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                          eps: float) -> Tuple[Tensor, Tensor]:
    """Per-row losses and stats, one program per row. Bytes: N*C*itemsize read (+ q's)."""
    n, nc = x.shape
    cd = compute_dtype(x.dtype)
    loss = torch.zeros(n, dtype=cd, device=x.device)
    stats = torch.zeros(n, 3, dtype=cd, device=x.device)
    if n == 0 or nc == 0:
        return loss, stats
    t, q, w, probs = _ce_args(x, target, weight)
    hi, lo = split_slope(eps)
    launch("fastlayers.cross_entropy", x, lambda: _ce.ce_fwd_kernel[(n,)](
        x, t, q, w, loss, stats, nc, ignore_index, hi, lo,
        HAS_W=weight is not None, PROBS=probs, SMOOTH=eps > 0,
        COMPUTE_DTYPE=kernel_dtype(x.dtype), BLOCK=_ce.block_for(nc)))
    return loss, stats


def cross_entropy_backward(x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                           scale: Tensor, ignore_index: int, eps: float, out: Tensor, col0: int = 0,
                           classes: Optional[int] = None) -> Tensor:
    """dx = scale_i * dloss_i/dx into out (may be x). Bytes: 2 * N*C*itemsize (+ q's)."""
    n, nc = x.shape
    if out is None:
        out = torch.empty_like(x)
    if n == 0 or nc == 0:
        return out
    t, q, w, probs = _ce_args(x, target, weight)
    hi, lo = split_slope(eps)
    launch("fastlayers.cross_entropy (backward)", x, lambda: _ce.ce_bwd_kernel[(n,)](
        x, t, q, w, stats, scale, out, nc, col0, nc if classes is None else classes, ignore_index, hi, lo,
        HAS_W=weight is not None, PROBS=probs, SMOOTH=eps > 0,
        COMPUTE_DTYPE=kernel_dtype(x.dtype), BF16_OUT=out.dtype == torch.bfloat16,
        BLOCK=_ce.block_for(nc)))
    return out


def linear_ce_logits(h: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
    """out = h @ w^T + b by the Triton GEMM (linear_act_forward's kernel and epilogue, act "none")."""
    if out is None:
        out = torch.empty((h.shape[0], w.shape[0]), device=h.device, dtype=h.dtype)
    launch_gemm("fastlayers.linear_cross_entropy", h, w.t(), out, bias=b)
    return out


def logits_into(h: Tensor, w: Tensor, b: Optional[Tensor]) -> bool:
    """linear_ce_logits always writes into a given out (the GEMM kernel takes any output)."""
    return True


def linear_ce_chunk_grads(dz: Tensor, h: Tensor, w: Tensor, dh: Optional[Tensor], dw: Optional[Tensor],
                          db: Optional[Tensor], accumulate: bool) -> None:
    """dh, dw, db = (or += when accumulate) dz @ w, dz^T @ h, colsum(dz), the GEMMs in Triton:
    straight into dh / dw when written in dz's dtype, else through a temporary of their size."""
    op = "fastlayers.linear_cross_entropy (backward)"
    for out, a, b in ((dh, dz, w), (dw, dz.t(), h)):
        if out is None:
            continue
        if out.dtype == dz.dtype and not accumulate:
            launch_gemm(op, a, b, out)
        else:
            tmp = torch.empty(out.shape, dtype=dz.dtype, device=dz.device)
            launch_gemm(op, a, b, tmp)
            out.add_(tmp) if accumulate else out.copy_(tmp)
    if db is not None:
        colsum = dz.sum(0, dtype=compute_dtype(db.dtype))
        db.add_(colsum) if accumulate else db.copy_(colsum)
