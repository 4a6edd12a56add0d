"""softmax / log_softmax over any dim, rows of any length: the one autograd Function, the route, the
public functions, and their torch.library ops (for torch.compile and torch.jit.trace).

    fl.softmax(x, dim) / fl.log_softmax(x, dim)

Routes: the tiny CPU gate (PyTorch's own op), then the checks and FusedOp.run's route
(fastlayers/ops/_autograd.py); registered as fastlayers::softmax(x, dim, log) -> y.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _autocast
from .._dispatch import as_3d, backend_for, check_tensor, normalize_dim, tiny_cpu_softmax
from ._autograd import FusedOp, define


def softmax_forward(backend, x: Tensor, dim: int, log: bool) -> Tensor:
    """softmax over `dim` of any-shaped x through `backend`; returns a tensor shaped like x."""
    return backend.softmax_forward(as_3d(x, dim), log).view(x.shape)


def softmax_composite(x: Tensor, dim: int, log: bool) -> Tensor:
    return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)


def softmax_name(log: bool) -> str:
    return "fastlayers.log_softmax" if log else "fastlayers.softmax"


class Softmax(FusedOp):
    """y = softmax(x, dim) (log_softmax when log); saves y only (eager saves the same)."""
    name, schema = "softmax", "Tensor x, int dim, bool log"

    def backend(self, device, dtype, params):
        return backend_for(softmax_name(params[1]), device, dtype)

    def check(self, inputs, params):  # TorchScript calls the op with any dim
        normalize_dim(softmax_name(params[1]), inputs[0], params[0])

    def forward(self, backend, inputs, params, save):
        (x,), (dim, log) = inputs, params
        return (softmax_forward(backend, x, dim % max(x.dim(), 1), log),), ()  # (dim checked: eager / check)

    def save(self, inputs, outputs, extras, params):
        return outputs

    def backward(self, backend, saved, grads, needs, params):
        (y,), (dy,), (dim, log) = saved, grads, params
        dim %= max(y.dim(), 1)
        return (backend.softmax_backward(as_3d(dy, dim), as_3d(y, dim), log).view(y.shape),)

    def backward_graph(self, saved, grads, needs, params):
        (y,), (dy,), (dim, log) = saved, grads, params
        return (dy - y.exp() * dy.sum(dim, keepdim=True) if log else y * (dy - (dy * y).sum(dim, keepdim=True)),)

    def fake(self, inputs, params):
        return (torch.empty_like(inputs[0], memory_format=torch.contiguous_format),)

    def fake_backward(self, saved, grads, needs, params):
        return (torch.empty_like(saved[0], memory_format=torch.contiguous_format),)


SOFTMAX = define(Softmax())
SoftmaxFunction = SOFTMAX.Function


def _composite(inputs, params):
    return (softmax_composite(inputs[0], *params),)


def _softmax(x: Tensor, dim, dtype: Optional[torch.dtype], log: bool) -> Tensor:
    y = tiny_cpu_softmax(x, dim, dtype, log)  # small CPU tensors: PyTorch's own op, unchecked
    if y is not None:
        return y
    op = softmax_name(log)
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected x to be a torch.Tensor, got {type(x).__name__}")
    dtype = _autocast.softmax_dtype(x, dtype)
    if dtype is not None:
        x = x.to(dtype)
    check_tensor(op, "x", x)
    if dim is None:  # torch's legacy implicit dim (nn.Softmax() without dim), with its warning
        warnings.warn(f"Implicit dimension choice for {op.split('.')[-1]} has been deprecated. "
                      "Change the call to include dim=X as an argument.", stacklevel=3)
        dim = 0 if x.dim() in (0, 1, 3) else 1
    dim = normalize_dim(op, x, dim)
    return SOFTMAX.run((x,), (dim, log), _composite)[0]


def softmax(x: Tensor, dim: Optional[int] = -1, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.softmax(x, dim)``: any shape (0-d and zero-size too), rows of any length.
    dtype, if given, casts x first (as torch.softmax does)."""
    return _softmax(x, dim, dtype, log=False)


def log_softmax(x: Tensor, dim: Optional[int] = -1, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.log_softmax(x, dim)``; same contract as :func:`softmax`."""
    return _softmax(x, dim, dtype, log=True)
