"""Public functional API and its autograd Functions.

    fl.linear_act(x, weight, bias, activation, negative_slope) == act(x @ weight.T + bias)
    fl.softmax(x, dim) / fl.log_softmax(x, dim)

Each op applies autocast's policy (_autocast.py), validates its arguments once and picks its route
(_dispatch.py): the torch.library op while torch.compile / jit.trace record (_library.py), the
PyTorch composite for tensors whose data kernels must not read (fake tensors, subclasses, torch.func
transforms), else a backend's kernels -- through an autograd Function when a gradient is needed,
which keeps the backend in ctx so the backward runs on the same one.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _autocast
from . import _library
from . import activations as _acts
from ._dispatch import (as_2d, as_3d, backend_for, check_linear, check_slope, check_tensor,
                        composite_reason, linear_composite, linear_forward, normalize_dim, owned,
                        plain_cpu_inference, softmax_composite, softmax_forward, tiny_cpu_linear,
                        tiny_cpu_softmax)
from .activations import DEFAULT_SLOPE, SAVE_INPUT, SAVE_OUTPUT, Activation

LINEAR = "fastlayers.linear_act"


# ----------------------------------------------------------------------------- linear + act
class LinearActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Activation,
                slope: float) -> Tensor:
        backend = backend_for(LINEAR, x.device, x.dtype)
        y, saved = linear_forward(backend, x, weight, bias, act, slope, save=True)
        y = owned(y)
        kind = act.saves(slope)
        ctx.backend, ctx.act, ctx.slope = backend, act, slope
        ctx.x_shape = x.shape
        # x, W, b are inputs (saving them copies nothing); of the activation only y (its output,
        # saved as returned so in-place edits to it are detected) or the pre-activation z.
        ctx.save_for_backward(x, weight, bias,
                              y if kind == SAVE_OUTPUT else saved if kind == SAVE_INPUT else None)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias, saved = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiable, so higher orders are exact
            return _linear_act_backward_differentiable(x, weight, bias, dy, ctx.act, ctx.slope, need)
        dy2 = as_2d(dy).contiguous()  # (M, N)
        if saved is not None:
            saved = as_2d(saved)
        x2 = as_2d(x)  # (M, K)
        dx, dw, db = ctx.backend.linear_act_backward(
            dy2, x2, weight, saved, ctx.act, ctx.slope, (need[0], need[1], bias is not None and need[2]))
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, None, None


def _linear_act_backward_differentiable(x, weight, bias, dy, act: Activation, slope: float, need):
    """First-order gradients as a graph of PyTorch ops (the fused kernels are first-order only):
    recompute act(x W^T + b) from the saved inputs, which keep their autograd history."""
    wrt = [t for t, n in zip((x, weight, bias), need) if n]
    with torch.enable_grad():
        y = linear_composite(x, weight, bias, act, slope)
    grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True))
    return tuple(next(grads) if n else None for n in need) + (None, None)


def linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               activation: str = "relu", negative_slope: float = DEFAULT_SLOPE) -> Tensor:
    """``act(x @ weight.T + bias)`` in one fused pass around the GEMM.

    x: (*, in_features); weight: (out_features, in_features) as nn.Linear; bias: (out_features,)
    or None. activation: one of fastlayers.activations.NAMES. Returns (*, out_features) in x's dtype.
    """
    act = _acts.get(activation, LINEAR)
    slope = negative_slope if type(negative_slope) is float else check_slope(LINEAR, negative_slope)
    y = tiny_cpu_linear(x, weight, bias, act, slope)  # tiny CPU outputs: PyTorch's two ops, unchecked
    if y is not None:
        return y
    return linear_act_after_gates(x, weight, bias, act, slope, plain_cpu_inference(x, weight, bias))


def linear_act_after_gates(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Activation, slope: float,
                           plain: bool) -> Tensor:
    """linear_act's route below its two gates, for a caller that has just run them itself
    (FusedLinear.forward: one climb of the route per call, not two): tiny_cpu_linear(...) gave None,
    and plain is plain_cpu_inference(x, weight, bias). act, slope: already looked up and checked."""
    if plain:  # no grad, nothing unusual: skip the checks below
        backend = backend_for(LINEAR, x.device, x.dtype)
        return linear_forward(backend, x, weight, bias, act, slope, save=False)[0]
    x, weight, bias = _autocast.linear_inputs(x, weight, bias)
    check_linear(LINEAR, x, weight, bias)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # registered ops: visible to both
        return _library.linear_act(x, weight, bias, act.name, slope)
    if composite_reason(x, weight, bias) is not None:
        return linear_composite(x, weight, bias, act, slope)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return LinearActFunction.apply(x, weight, bias, act, slope)
    backend = backend_for(LINEAR, x.device, x.dtype)
    return linear_forward(backend, x, weight, bias, act, slope, save=False)[0]


# ----------------------------------------------------------------------------- softmax
class SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, log: bool) -> Tensor:
        backend = backend_for(_library.softmax_name(log), x.device, x.dtype)
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
    op = _library.softmax_name(log)
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
        return _library.softmax(x, dim, log)
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
