"""softmax / log_softmax over any dim, rows of any length: the one autograd Function, the route, the
public functions, and their torch.library ops (for torch.compile and torch.jit.trace).

    fl.softmax(x, dim) / fl.log_softmax(x, dim)

Routes as fastlayers/ops/linear_act.py's (the tiny CPU gate first).

    fastlayers::softmax(x, dim, log) -> y
    fastlayers::softmax_backward(dy, y, dim, log) -> dx
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _autocast
from .._dispatch import (as_3d, backend_for, check_tensor, composite_reason, normalize_dim, owned,
                         softmax_composite, softmax_forward, tiny_cpu_softmax)


# ----------------------------------------------------------------------------- softmax
def softmax_name(log: bool) -> str:
    return "fastlayers.log_softmax" if log else "fastlayers.softmax"


@torch.library.custom_op("fastlayers::softmax", mutates_args=())
def softmax_op(x: Tensor, dim: int, log: bool) -> Tensor:
    dim = normalize_dim(softmax_name(log), x, dim)  # TorchScript calls this op directly
    return softmax_forward(backend_for(softmax_name(log), x.device, x.dtype), x, dim, log)


@softmax_op.register_fake
def _(x, dim, log):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastlayers::softmax_backward", mutates_args=())
def softmax_backward_op(dy: Tensor, y: Tensor, dim: int, log: bool) -> Tensor:
    backend = backend_for(softmax_name(log), y.device, y.dtype)
    return backend.softmax_backward(as_3d(dy, dim), as_3d(y, dim), log).view_as(y)


@softmax_backward_op.register_fake
def _(dy, y, dim, log):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _softmax_setup(ctx, inputs, output) -> None:
    _, dim, log = inputs
    ctx.dim, ctx.log = normalize_dim(softmax_name(log), output, dim), log
    ctx.save_for_backward(output)


def _softmax_backward(ctx, dy: Tensor):
    (y,) = ctx.saved_tensors
    return softmax_backward_op(dy, y, ctx.dim, ctx.log), None, None


torch.library.register_autograd("fastlayers::softmax", _softmax_backward,
                                setup_context=_softmax_setup)


def softmax_library(x: Tensor, dim: int, log: bool) -> Tensor:
    """Arguments already validated (dim normalised) by fastlayers.functional."""
    return softmax_op(x, dim, log)


# ----------------------------------------------------------------------------- softmax
class SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, log: bool) -> Tensor:
        backend = backend_for(softmax_name(log), x.device, x.dtype)
        y = owned(softmax_forward(backend, x, dim, log))
        ctx.backend, ctx.dim, ctx.log = backend, dim, log
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: PyTorch ops on y keep higher orders exact
            d = ctx.dim
            dx = dy - y.exp() * dy.sum(d, keepdim=True) if ctx.log else y * (dy - (dy * y).sum(d, keepdim=True))
            return dx, None, None
        dx = ctx.backend.softmax_backward(as_3d(dy, ctx.dim), as_3d(y, ctx.dim), ctx.log)
        return dx.view(y.shape), None, None


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
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # registered op: Dynamo / jit.trace
        return softmax_library(x, dim, log)
    if composite_reason(x) is not None:
        return softmax_composite(x, dim, log)
    if torch.is_grad_enabled() and x.requires_grad:
        return SoftmaxFunction.apply(x, dim, log)
    return softmax_forward(backend_for(op, x.device, x.dtype), x, dim, log)


def softmax(x: Tensor, dim: Optional[int] = -1, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.softmax(x, dim)``: any shape (0-d and zero-size too), rows of any length.
    dtype, if given, casts x first (as torch.softmax does)."""
    return _softmax(x, dim, dtype, log=False)


def log_softmax(x: Tensor, dim: Optional[int] = -1, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.log_softmax(x, dim)``; same contract as :func:`softmax`."""
    return _softmax(x, dim, dtype, log=True)
