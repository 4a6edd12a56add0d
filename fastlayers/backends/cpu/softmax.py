"""softmax / log_softmax over the middle dim of a contiguous (outer, L, inner) tensor (csrc/), and
the size below which the no-grad gate hands the op to PyTorch's own kernel."""
from __future__ import annotations

import torch
from torch import Tensor

from ._ext import _C, _buf, _empty

# Softmax / log_softmax of fewer elements than this, when no backend is forced, is PyTorch's own
# kernel (fastlayers._dispatch.tiny_cpu_softmax reads it as backend.softmax.TORCH_SOFTMAX_MAX_NUMEL):
# the general path's fixed cost is more than such a whole op. See bench/results/cpu-routes.md.
TORCH_SOFTMAX_MAX_NUMEL = 1 << 16


def softmax_forward(x: Tensor, log: bool) -> Tensor:
    outer, length, inner = x.shape
    y = _empty(outer, length, inner, dtype=x.dtype)
    _C.softmax_forward(_buf(x), _buf(y), log, torch.get_num_threads())
    return y


def softmax_backward(dy: Tensor, y: Tensor, log: bool) -> Tensor:
    outer, length, inner = y.shape
    dx = _empty(outer, length, inner, dtype=y.dtype)
    _C.softmax_backward(_buf(dy), _buf(y), _buf(dx), log, torch.get_num_threads())
    return dx
