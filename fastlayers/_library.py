"""fastlayers ops registered with torch.library, for torch.compile and torch.jit.trace.

Eager calls never come here: fastlayers.functional calls its autograd.Functions directly (no
dispatcher round trip). Only while torch.compile traces (``torch.compiler.is_compiling()``) or
torch.jit.trace records (``torch.jit.is_tracing()``: it cannot see the raw-pointer kernels) does
functional.py route to these ops, which Dynamo treats as opaque nodes: no graph break, whichever
backend (reference / cpp / triton) runs them. Each op picks its backend when it *runs* through
the same ``backends.select`` as eager, so a compiled graph follows ``use_backend`` like eager does.

    fastlayers::linear_act(x, weight, bias?, activation, negative_slope) -> (y, z)
        y = act(x @ weight.T + bias). z is the pre-activation when the activation's backward needs
        it (gelu, silu, ...), else an empty tensor; an internal output (non-differentiable) that
        the Python wrapper drops, so the compiled backward can reuse it instead of recomputing.
    fastlayers::linear_act_backward(dy, x, weight, saved, activation, negative_slope,
                                    need_dx, need_dw, need_db) -> (dx, dw, db)
        A gradient that is not needed comes back as an empty tensor.
    fastlayers::softmax(x, dim, log) -> y
    fastlayers::softmax_backward(dy, y, dim, log) -> dx
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import activations as _acts
from ._dispatch import (as_2d, as_3d, backend_for, check_linear, linear_forward, normalize_dim,
                        placeholder as _empty, softmax_forward)
from .activations import SAVE_INPUT, SAVE_OUTPUT

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


def linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
               negative_slope: float) -> Tensor:
    """Arguments already validated by fastlayers.functional.linear_act (_dispatch's checks)."""
    return linear_act_op(x, weight, bias, activation, negative_slope)[0]


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


def softmax(x: Tensor, dim: int, log: bool) -> Tensor:
    """Arguments already validated (dim normalised) by fastlayers.functional."""
    return softmax_op(x, dim, log)
