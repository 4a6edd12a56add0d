"""Cross entropy and the fused linear + cross entropy's per-chunk gradients (contract in
fastlayers/backends/contract.py, the math in fastlayers/ops/_loss.py; kernels in csrc/loss.cpp)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._ext import _C, _buf, _empty
from .gemm import linear_logits, logits_into
from ..._dtypes import compute_dtype

_I64_CODE = _C.INT64_CODE  # the extension's buffer code for int64 class-index targets


def _ce_targets(target: Tensor):
    """(class-index buffer, probabilities buffer): exactly one is given."""
    if target.is_floating_point():
        return None, _buf(target)
    return (target.data_ptr(), _I64_CODE, target.shape, target.stride()), None


def first_bad_target(target: Tensor, classes: int, ignore_index: int) -> int:
    """The index of the first target outside [0, classes) and != ignore_index, or -1; target (n,)
    int64, contiguous (the losses' argument check, fastlayers/ops/_loss.py)."""
    return _C.first_bad_target(_ce_targets(target)[0], classes, ignore_index)


def cross_entropy_forward(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                          eps: float) -> Tuple[Tensor, Tensor]:
    n, nc = x.shape
    cd = compute_dtype(x.dtype)
    if n == 0 or nc == 0:  # no rows, or rows without classes (all ignored: checked before)
        return torch.zeros(n, dtype=cd), torch.zeros(n, 3, dtype=cd)
    loss = torch.empty(n, dtype=cd)
    stats = torch.empty(n, 3, dtype=cd)
    t, q = _ce_targets(target)
    _C.cross_entropy_forward(_buf(x), t, q, _buf(weight), _buf(loss), _buf(stats), ignore_index, eps,
                             torch.get_num_threads())
    return loss, stats


def cross_entropy_backward(x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                           scale: Tensor, ignore_index: int, eps: float, out: Optional[Tensor], col0: int = 0,
                           classes: Optional[int] = None) -> Tensor:
    n, nc = x.shape
    if out is None:
        out = _empty(n, nc, dtype=x.dtype)
    if n == 0 or nc == 0:
        return out
    t, q = _ce_targets(target)
    _C.cross_entropy_backward(_buf(x), t, q, _buf(weight), _buf(stats), _buf(scale), _buf(out), ignore_index,
                              eps, col0, nc if classes is None else classes, torch.get_num_threads())
    return out


def linear_ce_logits(h: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
    """The contract's: into out where the GEMM route is one plain mm (gemm.linear_logits)."""
    return linear_logits(h, w, b, out)


def linear_ce_chunk_grads(dz: Tensor, h: Tensor, w: Tensor, dh: Optional[Tensor], dw: Optional[Tensor],
                          db: Optional[Tensor], accumulate: bool) -> None:
    """dh, dw, db = (or += when accumulate) dz @ w, dz^T @ h, colsum(dz): PyTorch's BLAS straight into
    the given buffers where the dtypes agree (mm out= / addmm_: no temporary of their size)."""
    for out, a, b in ((dh, dz, w), (dw, dz.t(), h)):
        if out is None:
            continue
        if out.dtype != dz.dtype:  # an fp32 accumulator of 16-bit products
            prod = torch.mm(a, b)
            out.add_(prod) if accumulate else out.copy_(prod)
        elif accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    if db is not None:
        colsum = dz.sum(0, dtype=compute_dtype(db.dtype))
        db.add_(colsum) if accumulate else db.copy_(colsum)
