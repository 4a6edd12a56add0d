"""The gated linear unit: ``fl.gated_linear`` (op, autograd Function, torch.library op).

    h = act(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)

silu gives SwiGLU (Llama, Mistral, Qwen), gelu / gelu_tanh GeGLU (Gemma), sigmoid the original GLU;
every activation of the table works. Followed by a down projection it is the gated MLP of modern
LLMs (fastlayers.nn.FusedGatedMLP).

What the backward keeps: g = x Wg^T + bg and u = x Wu^T + bu, the two biased pre-activations
(2*M*N elements; eager PyTorch keeps 3: g for the activation, act(g) and u for the product), plus
the inputs x, Wg, Wu (saved by reference, no copy). act(g) is recomputed in the backward's fused
pass, which costs one activation evaluation per element instead of M*N more memory.
Recomputing g and u from x would save that memory too, at the price of two more GEMMs: not done.

Backend contract (fastlayers/backends/contract.py):
    gated_forward(x, wg, wu, bg, bu, act, slope, save) -> (h, saved)
        x: (M, K), wg / wu: (N, K) (any strides), bg / bu: (N,) contiguous or None ->
        h: (M, N) contiguous; saved = (g, u) (M, N) when save, else None.
    gated_backward(dh, x, wg, wu, saved, act, slope, needs) -> (dx, dwg, dwu, dbg, dbu)
        dh: (M, N) contiguous; needs = (dx, dwg, dwu, dbg, dbu); a gradient not needed is None.

Registered (fastlayers/ops/_autograd.py) as
    fastlayers::gated_linear(x, w_gate, w_up, b_gate?, b_up?, activation, negative_slope) -> (h, g, u)
with g and u (M, N) internal (non-differentiable) outputs the compiled backward reuses.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import activations as _acts
from .._errors import ShapeError
from ..activations import Activation
from .. import _autocast
from .._dispatch import as_2d, check_linear, check_slope, check_tensor, contiguous, placeholder as _empty
from ._autograd import FusedOp, define

OP = "fastlayers.gated_linear"


# ----------------------------------------------------------------------------- checks
def _check(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
           b_up: Optional[Tensor]) -> None:
    """Each projection as a linear layer's arguments, and the two projections of one shape."""
    check_linear(OP, x, w_gate, b_gate, ("w_gate", "b_gate"))
    check_tensor(OP, "w_up", w_up)
    if w_up.shape != w_gate.shape:
        raise ShapeError(f"{OP}: expected w_up to have w_gate's shape {tuple(w_gate.shape)}, "
                         f"got {tuple(w_up.shape)}")
    check_linear(OP, x, w_up, b_up, ("w_up", "b_up"))


# ----------------------------------------------------------------------------- the op
def _reference(x, wg, wu, bg, bu, act: Activation, slope: float) -> Tensor:
    """The formula in PyTorch ops: differentiable to any order (create_graph backward)."""
    g = F.linear(x, wg, bg)
    return (g if act.name == "none" else act.ref(g, slope)) * F.linear(x, wu, bu)


class GatedLinear(FusedOp):
    """h = act(x Wg^T + bg) * (x Wu^T + bu). Saves x, Wg, Wu, bg, bu (inputs: no copies) and the two
    pre-activations g, u, each (M, N) for the M rows of x."""
    name, public = "gated_linear", OP
    schema = ("Tensor x, Tensor w_gate, Tensor w_up, Tensor? b_gate, Tensor? b_up, str activation, "
              "float negative_slope")
    n_inputs, n_extras = 5, 2

    def check(self, inputs, params):
        _check(*inputs)

    def forward(self, backend, inputs, params, save):
        x, wg, wu, bg, bu = inputs
        h, saved = backend.gated_forward(as_2d(x), wg, wu, contiguous(bg), contiguous(bu), _acts.get(params[0]),
                                         params[1], save)  # (M, N); saved (g, u) (M, N) each
        h = h if x.dim() == 2 else h.view(*x.shape[:-1], wg.shape[0])
        return (h,), ((None, None) if saved is None else saved)

    def save(self, inputs, outputs, extras, params):
        return inputs + extras

    def backward(self, backend, saved, grads, needs, params):
        x, wg, wu, bg, bu, g, u = saved
        needs = needs[:3] + (bg is not None and needs[3], bu is not None and needs[4])
        dx, dwg, dwu, dbg, dbu = backend.gated_backward(
            as_2d(grads[0]).contiguous(), as_2d(x), wg, wu, (as_2d(g), as_2d(u)), _acts.get(params[0]), params[1],
            needs)
        return (None if dx is None else dx.view(x.shape)), dwg, dwu, dbg, dbu

    def backward_graph(self, saved, grads, needs, params):
        ins = saved[:5]
        wrt = [t for t, n in zip(ins, needs) if n]
        with torch.enable_grad():
            h = _reference(*ins, _acts.get(params[0]), params[1])
        got = iter(torch.autograd.grad(h, wrt, grads[0], create_graph=True))
        return tuple(next(got) if n else None for n in needs)

    def fake(self, inputs, params):
        x, w_gate = inputs[:2]
        h = x.new_empty((*x.shape[:-1], w_gate.shape[0]))
        gu = (math.prod(x.shape[:-1]), w_gate.shape[0])  # g and u 2-D (M, N)
        return h, h.new_empty(gu), h.new_empty(gu)

    def fake_backward(self, saved, grads, needs, params):
        x, wg, wu = saved[:3]
        dh, n = grads[0], wg.shape[0]
        return (x.new_empty(x.shape) if needs[0] else _empty(dh),
                wg.new_empty(wg.shape) if needs[1] else _empty(dh),
                wu.new_empty(wu.shape) if needs[2] else _empty(dh),
                dh.new_empty((n,)) if needs[3] else _empty(dh),
                dh.new_empty((n,)) if needs[4] else _empty(dh))


GATED_LINEAR = define(GatedLinear())
GatedLinearFunction = GATED_LINEAR.Function


def _composite(inputs, params):
    return (_reference(*inputs, _acts.get(params[0]), params[1]),)


def gated_linear(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor] = None,
                 b_up: Optional[Tensor] = None, activation: str = "silu",
                 negative_slope: float = 0.01) -> Tensor:
    """``act(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)`` as one fused op (SwiGLU for "silu",
    GeGLU for "gelu" / "gelu_tanh", GLU for "sigmoid"; any of fastlayers.activations.NAMES).

    x: (*, in_features); w_gate, w_up: (intermediate, in_features) as nn.Linear weights; b_gate,
    b_up: (intermediate,) or None. negative_slope: leaky_relu's only. Returns (*, intermediate)
    in x's dtype.
    """
    act = _acts.get(activation, OP)
    x, w_gate, w_up, b_gate, b_up = _autocast.linear_inputs(x, w_gate, w_up, b_gate, b_up)
    _check(x, w_gate, w_up, b_gate, b_up)
    slope = check_slope(OP, negative_slope)
    return GATED_LINEAR.run((x, w_gate, w_up, b_gate, b_up), (act.name, slope), _composite)[0]


# ----------------------------------------------------------------------------- module
class FusedGatedMLP(torch.nn.Module):
    """The gated MLP of Llama / Mistral / Qwen (SwiGLU), Gemma (GeGLU) ...:

        down_proj(act(gate_proj(x)) * up_proj(x))

    with the gating part as one fused op (fastlayers.gated_linear). gate_proj, up_proj and
    down_proj are plain nn.Linear modules, so the parameters, their initialisation and the
    state_dict keys (gate_proj.weight, up_proj.weight, down_proj.weight, and .bias with bias=True)
    are those of Hugging Face's LlamaMLP: checkpoints load into it and back unchanged.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 activation: str = "silu", negative_slope: float = 0.01,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        _acts.get(activation, "fastlayers.FusedGatedMLP")  # fail at construction, not at first call
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, **kw)
        # gate_proj.weight and up_proj.weight as the two halves of one (2 * intermediate, hidden)
        # buffer: the cpp backend then runs both projections (and their backward GEMMs) as one GEMM
        # each, without a copy. Still two Parameters with their own keys; load_state_dict copies into
        # them in place (kept); .to() gives them separate storage again (still correct, two GEMMs).
        both = torch.cat([self.gate_proj.weight.detach(), self.up_proj.weight.detach()])
        self.gate_proj.weight = torch.nn.Parameter(both[:intermediate_size])
        self.up_proj.weight = torch.nn.Parameter(both[intermediate_size:])
        self.activation = activation
        self.negative_slope = check_slope(OP, negative_slope)

    @classmethod
    def from_linears(cls, gate_proj: torch.nn.Linear, up_proj: torch.nn.Linear,
                     down_proj: torch.nn.Linear, activation: str = "silu",
                     negative_slope: float = 0.01) -> "FusedGatedMLP":
        """A FusedGatedMLP over existing Linear modules (their Parameters are shared, not copied)."""
        if gate_proj.weight.shape != up_proj.weight.shape or (gate_proj.bias is None) != (up_proj.bias is None):
            raise ValueError("fastlayers.FusedGatedMLP.from_linears: gate_proj and up_proj must have the same "
                             f"shape and bias setting, got {gate_proj} and {up_proj}")
        if down_proj.in_features != gate_proj.out_features:
            raise ValueError("fastlayers.FusedGatedMLP.from_linears: down_proj.in_features must equal "
                             f"gate_proj.out_features ({gate_proj.out_features}), got {down_proj}")
        _acts.get(activation, "fastlayers.FusedGatedMLP")
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self.hidden_size, self.intermediate_size = gate_proj.in_features, gate_proj.out_features
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = activation
        self.negative_slope = check_slope(OP, negative_slope)
        return self

    def forward(self, x: Tensor) -> Tensor:
        h = gated_linear(x, self.gate_proj.weight, self.up_proj.weight, self.gate_proj.bias,
                         self.up_proj.bias, self.activation, self.negative_slope)  # (*, intermediate)
        return self.down_proj(h)  # (*, hidden)

    def extra_repr(self) -> str:
        s = f"activation={self.activation}"
        return s + (f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else "")
