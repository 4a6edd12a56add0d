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
from .._dispatch import backend_for, check_slope, check_tensor
from ._autograd import FusedOp, define
from ..activations import DEFAULT_SLOPE, SAVE_OUTPUT
from ..backends import forced

OP = "fastlayers.activation"

# CPU tensors below this many elements (no backend forced) run PyTorch's own op: the fixed cost is more
# than the pass saves (measurements: bench/results/cpu-routes.md)
_TORCH_MIN_NUMEL = 1 << 14


def _as_2d(x: Tensor) -> Tensor:
    """(rows, last dim) contiguous: the C++ pass gives each thread whole rows."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() >= 2 else x.reshape(1, -1)
    return x2.contiguous()


class Act(FusedOp):
    """y = act(x); saves x (an input) or y (act.saves(slope) == "output"). No registered ops: while
    torch.compile / jit.trace record, the formula (Inductor fuses it into one kernel itself)."""
    name, public = "activation", OP
    schema = "Tensor x, str activation, float negative_slope"  # (documentation: no registered ops)

    def forward(self, backend, inputs, params, save):
        (x,), act = inputs, _acts.get(params[0])
        return (backend.act_forward(_as_2d(x), act, params[1]).view(x.shape),), ()

    def save(self, inputs, outputs, extras, params):
        return outputs if _acts.get(params[0]).saves(params[1]) == SAVE_OUTPUT else inputs

    def backward(self, backend, saved, grads, needs, params):
        (s,), (dy,) = saved, grads
        return (backend.act_grad(_as_2d(dy), _as_2d(s), _acts.get(params[0]), params[1]).view(s.shape),)

    def backward_graph(self, saved, grads, needs, params):
        (s,), (dy,), act = saved, grads, _acts.get(params[0])
        if act.saves(params[1]) == SAVE_OUTPUT:  # no x kept: the derivative as a function of y
            from ..backends import reference as _ref  # PyTorch ops: differentiable in dy and y
            return (_ref.act_grad(dy, s, act, params[1]),)
        with torch.enable_grad():
            x = s.detach().requires_grad_() if not s.requires_grad else s
            y = act.ref(x, params[1])
        return torch.autograd.grad(y, x, dy, create_graph=True)


ACT = define(Act(), library=False)
ActFunction = ACT.Function


def activation(x: Tensor, activation: str = "gelu", negative_slope: float = DEFAULT_SLOPE) -> Tensor:
    """``act(x)`` elementwise, forward and backward one pass each (see the module docstring).

    activation: a name of fastlayers.activations (e.g. "gelu", "gelu_tanh", "silu", "quick_gelu"),
    with PyTorch's semantics (quick_gelu: x * sigmoid(1.702 x), 16-bit inputs computed in float32
    and rounded once). x: any shape, a floating dtype; the result has x's shape and dtype.
    """
    act = _acts.get(activation, OP)
    slope = check_slope(OP, negative_slope)
    check_tensor(OP, "x", x)
    small = x.numel() == 0 or (x.is_cpu and x.numel() < _TORCH_MIN_NUMEL and forced() is None)
    if not (small or torch.compiler.is_compiling() or torch.jit.is_tracing()):
        # no bare-activation pass on that device's backend (triton): the formula
        small = getattr(backend_for(OP, x.device, x.dtype), "act_forward", None) is None
    return ACT.run((x,), (act.name, slope), lambda inputs, params: (act.ref(x, slope),), small)[0]
