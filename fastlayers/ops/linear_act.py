"""linear + bias + activation: the one autograd Function, the route, the public function, and its
torch.library ops (for torch.compile and torch.jit.trace).

    fl.linear_act(x, weight, bias, activation, negative_slope) == act(x @ weight.T + bias)

Routes (fastlayers/_dispatch.py): the tiny CPU gate and the plain no-grad inference call first; then
autocast's policy (_autocast.py), the checks and FusedOp.run's route (fastlayers/ops/_autograd.py:
the registered op while torch.compile / jit.trace record, the composite for tensors kernels must not
read, the Function when a gradient is needed, else the backend's forward).

Registered as fastlayers::linear_act(x, weight, bias?, activation, negative_slope) -> (y, z): z is
the pre-activation (M, N) when the activation's backward needs it (gelu, silu, ...), else an empty
tensor (an internal output the compiled backward reuses instead of recomputing).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _autocast
from .. import activations as _acts
from .._dispatch import (as_2d, backend_for, check_linear, check_slope, contiguous, cpu_backend,
                         linear_needs_grad, placeholder as _empty, plain_cpu_inference, tiny_cpu_linear)
from ._autograd import FusedOp, define
from ..activations import DEFAULT_SLOPE, SAVE_INPUT, SAVE_OUTPUT, Activation

LINEAR = "fastlayers.linear_act"


def linear_forward(backend, x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Activation, slope: float,
                   save: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """(*, K) -> (*, N) through `backend`; saved is 2-D (M, N) or None (see the contract).
    The bias is handed over contiguous (a strided or expanded bias is copied: N elements)."""
    n = weight.shape[0]
    y2, saved = backend.linear_act_forward(as_2d(x), weight, contiguous(bias), act, slope, save)  # (M, N)
    return (y2 if x.dim() == 2 else y2.view(*x.shape[:-1], n)), saved


def linear_composite(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Activation, slope: float) -> Tensor:
    """act(F.linear(x, weight, bias)) in PyTorch ops (the composite route)."""
    return act.ref(torch.nn.functional.linear(x, weight, bias), slope)


# ----------------------------------------------------------------------------- the op
class LinearAct(FusedOp):
    """y = act(x W^T + b). Saves x, W, b (inputs: no copies) and of the activation only y (its
    output) or the pre-activation z, as the activation's derivative needs (act.saves)."""
    name, public = "linear_act", LINEAR
    schema = "Tensor x, Tensor weight, Tensor? bias, str activation, float negative_slope"
    n_inputs, n_extras = 3, 1

    def check(self, inputs, params):
        check_linear(LINEAR, *inputs)
        _acts.get(params[0], LINEAR)

    def forward(self, backend, inputs, params, save):
        (x, weight, bias), (activation, slope) = inputs, params
        act = _acts.get(activation)
        y, z = linear_forward(backend, x, weight, bias, act, slope, save)  # z: (M, N) or None
        return (y,), (z if save and act.saves(slope) == SAVE_INPUT else None,)

    def save(self, inputs, outputs, extras, params):
        kind = _acts.get(params[0]).saves(params[1])
        return inputs + (outputs[0] if kind == SAVE_OUTPUT else extras[0] if kind == SAVE_INPUT else None,)

    def backward(self, backend, saved, grads, needs, params):
        x, weight, bias, s = saved
        act = _acts.get(params[0])
        dx, dw, db = backend.linear_act_backward(
            as_2d(grads[0]).contiguous(), as_2d(x), weight, None if s is None else as_2d(s), act, params[1],
            (needs[0], needs[1], bias is not None and needs[2]))  # (M, N) dy, (M, K) x
        return (None if dx is None else dx.view(x.shape)), dw, db

    def backward_graph(self, saved, grads, needs, params):
        """First-order gradients as a graph of PyTorch ops: act(x W^T + b) recomputed from the saved
        inputs, which keep their autograd history."""
        x, weight, bias, _ = saved
        wrt = [t for t, n in zip((x, weight, bias), needs) if n]
        with torch.enable_grad():
            y = linear_composite(x, weight, bias, _acts.get(params[0]), params[1])
        got = iter(torch.autograd.grad(y, wrt, grads[0], create_graph=True))
        return tuple(next(got) if n else None for n in needs)

    def fake(self, inputs, params):
        x, weight, _ = inputs
        y = x.new_empty((*x.shape[:-1], weight.shape[0]))
        save_z = _acts.get(params[0]).saves(params[1]) == SAVE_INPUT
        return y, (y.new_empty((math.prod(x.shape[:-1]), weight.shape[0])) if save_z else _empty(y))  # z 2-D

    def fake_backward(self, saved, grads, needs, params):
        x, weight, _, _ = saved
        dy = grads[0]
        return (x.new_empty(x.shape) if needs[0] else _empty(dy),
                weight.new_empty(weight.shape) if needs[1] else _empty(dy),
                dy.new_empty((weight.shape[0],)) if needs[2] else _empty(dy))


LINEAR_ACT = define(LinearAct())
LinearActFunction = LINEAR_ACT.Function


def _composite(inputs, params):
    return (linear_composite(*inputs, _acts.get(params[0]), params[1]),)


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
    return LINEAR_ACT.run((x, weight, bias), (act.name, slope), _composite, _small_cpu_training(x, weight, bias))[0]


def _small_cpu_training(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """A CPU call that needs a gradient and is below the cpp backend's FUSED_MIN_MACS
    (backends.cpu.gemm.fused_pays): PyTorch's F.linear + activation with their own autograd (the
    composite); without a gradient the backend's forward runs the same two ops (same bits). Not
    with a backend forced (fused_pays: tests reach the fused kernels at every size that way)."""
    if not (x.is_cpu and linear_needs_grad(x, weight, bias)):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # run() records the op (no import here)
        return False
    backend = cpu_backend()
    if backend is None:
        return False
    k = x.shape[-1]
    return not backend.gemm.fused_pays(x.numel() // k if k else 0, k, weight.shape[0])
