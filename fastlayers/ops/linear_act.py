"""linear + bias + activation: the one autograd Function, the route, the public function, and its
torch.library ops (for torch.compile and torch.jit.trace).

    fl.linear_act(x, weight, bias, activation, negative_slope) == act(x @ weight.T + bias)

Routes (fastlayers/_dispatch.py): the tiny CPU gate and the plain no-grad inference call first; then
autocast's policy (_autocast.py) and the checks; the registered op while torch.compile / jit.trace
record; the PyTorch composite for tensors whose data kernels must not read (fake tensors,
subclasses, torch.func transforms); else a backend's kernels -- through LinearActFunction when a
gradient is needed (it keeps the backend in ctx so the backward runs on the same one).

The registered ops: eager calls never come here (no dispatcher round trip: ~4x the fixed cost of
an autograd.Function, measured); Dynamo treats them as opaque nodes, each picks its backend when
it runs, through the same backends.select as eager.

    fastlayers::linear_act(x, weight, bias?, activation, negative_slope) -> (y, z)
        y = act(x @ weight.T + bias). z is the pre-activation when the activation's backward needs
        it (gelu, silu, ...), else an empty tensor; an internal output (non-differentiable) that
        the Python wrapper drops, so the compiled backward can reuse it instead of recomputing.
    fastlayers::linear_act_backward(dy, x, weight, saved, activation, negative_slope,
                                    need_dx, need_dw, need_db) -> (dx, dw, db)
        A gradient that is not needed comes back as an empty tensor.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _autocast
from .. import activations as _acts
from .._dispatch import (as_2d, backend_for, check_linear, check_slope, composite_reason, linear_composite,
                         linear_forward, owned, placeholder as _empty, plain_cpu_inference, tiny_cpu_linear)
from ..activations import DEFAULT_SLOPE, SAVE_INPUT, SAVE_OUTPUT, Activation

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
        return linear_act_library(x, weight, bias, act.name, slope)
    if composite_reason(x, weight, bias) is not None:
        return linear_composite(x, weight, bias, act, slope)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return LinearActFunction.apply(x, weight, bias, act, slope)
    backend = backend_for(LINEAR, x.device, x.dtype)
    return linear_forward(backend, x, weight, bias, act, slope, save=False)[0]


# ----------------------------------------------------------------------------- linear + act
@torch.library.custom_op("fastlayers::linear_act", mutates_args=())
def linear_act_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                  negative_slope: float) -> Tuple[Tensor, Tensor]:
    act = _acts.get(activation)
    check_linear("fastlayers.linear_act", x, weight, bias)  # again: TorchScript calls this op directly
    backend = backend_for("fastlayers.linear_act", x.device, x.dtype)
    y, saved = linear_forward(backend, x, weight, bias, act, negative_slope, save=True)
    if act.saves(negative_slope) == SAVE_INPUT:
        return y, saved.view(y.shape).contiguous()
    # A custom op's outputs may not alias each other: y itself is saved via setup_context.
    return y, _empty(y)


@linear_act_op.register_fake
def _(x, weight, bias, activation, negative_slope):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    z = torch.empty_like(y) if _acts.get(activation).saves(negative_slope) == SAVE_INPUT else _empty(y)
    return y, z


@torch.library.custom_op("fastlayers::linear_act_backward", mutates_args=())
def linear_act_backward_op(dy: Tensor, x: Tensor, weight: Tensor, saved: Tensor, activation: str,
                           negative_slope: float, need_dx: bool, need_dw: bool,
                           need_db: bool) -> Tuple[Tensor, Tensor, Tensor]:
    act = _acts.get(activation)
    backend = backend_for("fastlayers.linear_act", dy.device, dy.dtype)
    kind = act.saves(negative_slope)
    s = as_2d(saved) if kind in (SAVE_INPUT, SAVE_OUTPUT) else None
    dx, dw, db = backend.linear_act_backward(
        as_2d(dy).contiguous(), as_2d(x), weight, s, act, negative_slope,
        (need_dx, need_dw, need_db))
    # Contiguous, as the fake kernel promises (a backend may return other strides).
    return (dx.view(x.shape).contiguous() if need_dx else _empty(dy),
            dw.contiguous() if need_dw else _empty(dy),
            db.contiguous() if need_db else _empty(dy))


@linear_act_backward_op.register_fake
def _(dy, x, weight, saved, activation, negative_slope, need_dx, need_dw, need_db):
    return (x.new_empty(x.shape) if need_dx else _empty(dy),
            weight.new_empty(weight.shape) if need_dw else _empty(dy),
            dy.new_empty((weight.shape[0],)) if need_db else _empty(dy))


def _linear_act_setup(ctx, inputs, output) -> None:
    x, weight, bias, activation, slope = inputs
    y, z = output
    ctx.mark_non_differentiable(z)
    kind = _acts.get(activation).saves(slope)
    ctx.activation, ctx.slope, ctx.has_bias = activation, slope, bias is not None
    ctx.save_for_backward(x, weight, y if kind == SAVE_OUTPUT else z)


def _linear_act_backward(ctx, dy: Tensor, dz: Optional[Tensor]):
    x, weight, saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_db = ctx.has_bias and need[2]
    dx, dw, db = linear_act_backward_op(dy, x, weight, saved, ctx.activation, ctx.slope,
                                        need[0], need[1], need_db)
    return (dx if need[0] else None, dw if need[1] else None, db if need_db else None, None, None)


torch.library.register_autograd("fastlayers::linear_act", _linear_act_backward,
                                setup_context=_linear_act_setup)


def linear_act_library(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
               negative_slope: float) -> Tensor:
    """Arguments already validated by fastlayers.functional.linear_act (_dispatch's checks)."""
    return linear_act_op(x, weight, bias, activation, negative_slope)[0]
