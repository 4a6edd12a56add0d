"""A bare activation, ``act(x)`` on its own (no Linear in front to fuse it into): the checks, the
one autograd Function and the public function.

    fastlayers.ops.activation.activation(x, "gelu_tanh")    # == F.gelu(x, approximate="tanh")

For the activation modules that stand alone in real models, e.g. Hugging Face's ``GELUTanh``,
``NewGELUActivation``, ``QuickGELUActivation`` (fastlayers.hf maps them): ``act`` is any name of
the activation table (fastlayers/activations.py), with its semantics.

Forward one pass over x, backward one pass (``dx = dy * act'(z)``) -- where the eager formulas
of those modules are three to eight ATen passes each way (QuickGELU: ``x * sigmoid(1.702 x)``;
NewGELU: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``). Saved for backward: x itself (an
input: no copy), or the output y for the activations whose derivative is a function of y
(act.saves(slope) == "output"); eager saves every intermediate of its formula.

Routes: the cpp backend's pass for CPU tensors of at least _TORCH_MIN_NUMEL elements; PyTorch's
own formula (the table's ``ref``) otherwise: while torch.compile / jit.trace record (Inductor fuses
an elementwise chain into one kernel itself), for fake tensors, subclasses, torch.func transforms,
small CPU tensors, and on devices whose backend has no bare-activation pass (triton: on CUDA a
bare activation is one memory-bound ATen kernel already, GELU / SiLU as one pass; QuickGELU's
formula stays three there). A forced backend (use_backend) runs its pass at every size
(reference: PyTorch ops; triton: the formula, as said).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import activations as _acts
from .._dispatch import backend_for, check_slope, check_tensor, composite_reason, owned
from ..activations import DEFAULT_SLOPE, SAVE_OUTPUT, Activation
from ..backends import forced

OP = "fastlayers.activation"

# CPU tensors with fewer elements than this (no backend forced) run PyTorch's own op: the
# Function's and the OpenMP region's fixed cost is more than the pass saves there. Measured
# 2026-12-07 (EPYC, 2 threads, a heavily loaded machine: load 11), gelu_tanh fwd+bwd, fastlayers
# vs ATen, median of 9 interleaved rounds: 0.40x at 64 x 64, 1.03x at 128 x 128.
_TORCH_MIN_NUMEL = 1 << 14


def _as_2d(x: Tensor) -> Tensor:
    """(rows, last dim) contiguous: the C++ pass gives each thread whole rows."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() >= 2 else x.reshape(1, -1)
    return x2.contiguous()


class ActFunction(torch.autograd.Function):
    """y = act(x); saves x (an input) or y (act.saves(slope) == "output")."""

    @staticmethod
    def forward(ctx, x: Tensor, act: Activation, slope: float, backend) -> Tensor:
        y = owned(backend.act_forward(_as_2d(x), act, slope).view(x.shape))
        ctx.act, ctx.slope, ctx.backend = act, slope, backend
        ctx.save_for_backward(y if act.saves(slope) == SAVE_OUTPUT else x)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        (saved,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the formula's own graph, exact higher orders
            if ctx.act.saves(ctx.slope) == SAVE_OUTPUT:  # no x kept: the derivative as a function of y
                return _ref_backward(dy, saved, ctx.act, ctx.slope), None, None, None
            with torch.enable_grad():
                x = saved.detach().requires_grad_() if not saved.requires_grad else saved
                y = ctx.act.ref(x, ctx.slope)
            (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
            return dx, None, None, None
        dx = ctx.backend.act_grad(_as_2d(dy), _as_2d(saved), ctx.act, ctx.slope)
        return dx.view(saved.shape), None, None, None


def _ref_backward(dy: Tensor, y: Tensor, act: Activation, slope: float) -> Tensor:
    from ..backends import reference as _ref  # PyTorch ops: differentiable in dy and y
    return _ref.act_grad(dy, y, act, slope)


def activation(x: Tensor, activation: str = "gelu", negative_slope: float = DEFAULT_SLOPE) -> Tensor:
    """``act(x)`` elementwise, forward and backward one pass each (see the module docstring).

    activation: a name of fastlayers.activations (e.g. "gelu", "gelu_tanh", "silu", "quick_gelu"),
    with PyTorch's semantics (quick_gelu: x * sigmoid(1.702 x), 16-bit inputs computed in float32
    and rounded once). x: any shape, a floating dtype; the result has x's shape and dtype.
    """
    act = _acts.get(activation, OP)
    slope = check_slope(OP, negative_slope)
    check_tensor(OP, "x", x)
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or composite_reason(x) is not None
            or x.numel() == 0 or (x.is_cpu and x.numel() < _TORCH_MIN_NUMEL and forced() is None)):
        return act.ref(x, slope)
    backend = backend_for(OP, x.device, x.dtype)
    if getattr(backend, "act_forward", None) is None:  # no bare-activation pass there (triton)
        return act.ref(x, slope)
    if torch.is_grad_enabled() and x.requires_grad:
        return ActFunction.apply(x, act, slope, backend)
    return owned(backend.act_forward(_as_2d(x), act, slope).view(x.shape))
