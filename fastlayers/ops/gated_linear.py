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

torch.compile / jit.trace see two opaque ops (no graph break), like fastlayers::linear_act:
    fastlayers::gated_linear(x, w_gate, w_up, b_gate?, b_up?, activation, negative_slope) -> (h, g, u)
        g and u are internal (non-differentiable) outputs the compiled backward reuses.
    fastlayers::gated_linear_backward(dh, x, w_gate, w_up, g, u, activation, negative_slope,
                                      need_dx, need_dwg, need_dwu, need_dbg, need_dbu)
        -> (dx, dwg, dwu, dbg, dbu); a gradient that is not needed comes back as an empty tensor.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import activations as _acts
from .._errors import ShapeError
from ..activations import Activation
from .. import _autocast
from .._dispatch import (as_2d, backend_for, check_linear, check_slope, check_tensor, composite_reason,
                        contiguous, owned, placeholder as _empty)

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


# ----------------------------------------------------------------------------- forward / backward
def _forward(backend, x: Tensor, wg: Tensor, wu: Tensor, bg: Optional[Tensor], bu: Optional[Tensor],
             act: Activation, slope: float, save: bool):
    """(*, K) -> h (*, N); saved = (g, u), each 2-D (M, N), or None."""
    h, saved = backend.gated_forward(as_2d(x), wg, wu, contiguous(bg), contiguous(bu), act, slope, save)
    return (h if x.dim() == 2 else h.view(*x.shape[:-1], wg.shape[0])), saved


def _backward(backend, dh: Tensor, x: Tensor, wg: Tensor, wu: Tensor, g: Tensor, u: Tensor,
              act: Activation, slope: float, needs):
    """Gradients of (x, wg, wu, bg, bu); dx shaped like x."""
    dx, dwg, dwu, dbg, dbu = backend.gated_backward(
        as_2d(dh).contiguous(), as_2d(x), wg, wu, (as_2d(g), as_2d(u)), act, slope, needs)
    return (None if dx is None else dx.view(x.shape)), dwg, dwu, dbg, dbu


def _reference(x, wg, wu, bg, bu, act: Activation, slope: float) -> Tensor:
    """The formula in PyTorch ops: differentiable to any order (create_graph backward)."""
    g = F.linear(x, wg, bg)
    return (g if act.name == "none" else act.ref(g, slope)) * F.linear(x, wu, bu)


class GatedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, wg: Tensor, wu: Tensor, bg: Optional[Tensor], bu: Optional[Tensor],
                act: Activation, slope: float) -> Tensor:
        backend = backend_for(OP, x.device, x.dtype)
        h, (g, u) = _forward(backend, x, wg, wu, bg, bu, act, slope, save=True)
        ctx.backend, ctx.act, ctx.slope = backend, act, slope
        ctx.has_bg, ctx.has_bu = bg is not None, bu is not None
        # x, Wg, Wu (and the biases) are inputs: saving them copies nothing. Of the gating only
        # the two pre-activations g and u, (M, N) each.
        ctx.save_for_backward(x, wg, wu, bg, bu, g, u)
        return owned(h)

    @staticmethod
    def backward(ctx, dh: Tensor):
        x, wg, wu, bg, bu, g, u = ctx.saved_tensors
        need = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True: PyTorch ops, exact to any order
            wrt = [t for t, n in zip((x, wg, wu, bg, bu), need) if n]
            with torch.enable_grad():
                h = _reference(x, wg, wu, bg, bu, ctx.act, ctx.slope)
            grads = iter(torch.autograd.grad(h, wrt, dh, create_graph=True))
            return tuple(next(grads) if n else None for n in need) + (None, None)
        needs = (need[0], need[1], need[2], ctx.has_bg and need[3], ctx.has_bu and need[4])
        return _backward(ctx.backend, dh, x, wg, wu, g, u, ctx.act, ctx.slope, needs) + (None, None)


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
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # registered op: visible to both
        return gated_linear_op(x, w_gate, w_up, b_gate, b_up, act.name, slope)[0]
    if composite_reason(x, w_gate, w_up, b_gate, b_up) is not None:
        return _reference(x, w_gate, w_up, b_gate, b_up, act, slope)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, w_gate, w_up, b_gate, b_up)):
        return GatedLinearFunction.apply(x, w_gate, w_up, b_gate, b_up, act, slope)
    backend = backend_for(OP, x.device, x.dtype)
    return _forward(backend, x, w_gate, w_up, b_gate, b_up, act, slope, save=False)[0]


# ----------------------------------------------------------------------------- torch.library
@torch.library.custom_op("fastlayers::gated_linear", mutates_args=())
def gated_linear_op(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                    b_up: Optional[Tensor], activation: str,
                    negative_slope: float) -> Tuple[Tensor, Tensor, Tensor]:
    act = _acts.get(activation, OP)
    backend = backend_for(OP, x.device, x.dtype)
    h, (g, u) = _forward(backend, x, w_gate, w_up, b_gate, b_up, act, negative_slope, save=True)
    shape = h.shape
    return h.contiguous(), g.view(shape).contiguous(), u.view(shape).contiguous()


@gated_linear_op.register_fake
def _(x, w_gate, w_up, b_gate, b_up, activation, negative_slope):
    h = x.new_empty((*x.shape[:-1], w_gate.shape[0]))
    return h, torch.empty_like(h), torch.empty_like(h)


@torch.library.custom_op("fastlayers::gated_linear_backward", mutates_args=())
def gated_linear_backward_op(dh: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, g: Tensor, u: Tensor,
                             activation: str, negative_slope: float, need_dx: bool, need_dwg: bool,
                             need_dwu: bool, need_dbg: bool,
                             need_dbu: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    act = _acts.get(activation, OP)
    backend = backend_for(OP, dh.device, dh.dtype)
    needs = (need_dx, need_dwg, need_dwu, need_dbg, need_dbu)
    grads = _backward(backend, dh, x, w_gate, w_up, g, u, act, negative_slope, needs)
    # contiguous, as the fake kernel promises
    return tuple(t.contiguous() if n else _empty(dh) for t, n in zip(grads, needs))


@gated_linear_backward_op.register_fake
def _(dh, x, w_gate, w_up, g, u, activation, negative_slope, need_dx, need_dwg, need_dwu, need_dbg,
      need_dbu):
    n = w_gate.shape[0]
    return (x.new_empty(x.shape) if need_dx else _empty(dh),
            w_gate.new_empty(w_gate.shape) if need_dwg else _empty(dh),
            w_up.new_empty(w_up.shape) if need_dwu else _empty(dh),
            dh.new_empty((n,)) if need_dbg else _empty(dh),
            dh.new_empty((n,)) if need_dbu else _empty(dh))


def _setup(ctx, inputs, output) -> None:
    x, w_gate, w_up, b_gate, b_up, activation, slope = inputs
    _, g, u = output
    ctx.mark_non_differentiable(g, u)
    ctx.activation, ctx.slope = activation, slope
    ctx.has_bg, ctx.has_bu = b_gate is not None, b_up is not None
    ctx.save_for_backward(x, w_gate, w_up, g, u)


def _backward_op(ctx, dh: Tensor, dg: Optional[Tensor], du: Optional[Tensor]):
    x, w_gate, w_up, g, u = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = (need[0], need[1], need[2], ctx.has_bg and need[3], ctx.has_bu and need[4])
    grads = gated_linear_backward_op(dh, x, w_gate, w_up, g, u, ctx.activation, ctx.slope, *needs)
    return tuple(t if n else None for t, n in zip(grads, needs)) + (None, None)


torch.library.register_autograd("fastlayers::gated_linear", _backward_op, setup_context=_setup)


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
