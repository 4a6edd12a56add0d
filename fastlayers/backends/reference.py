"""Reference backend: plain PyTorch ops. The oracle in tests, and a readable statement of what
the fused backends compute. Runs on any device PyTorch runs on."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import SAVE_INPUT, SAVE_OUTPUT, Activation

NAME = "reference"
DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None


def linear_act_forward(x: Tensor, w: Tensor, b: Optional[Tensor], act: Activation, slope: float,
                       save: bool) -> Tuple[Tensor, Optional[Tensor]]:
    z = F.linear(x, w, b)  # (M, N)
    y = act.ref(z, slope)
    if act.name == "none":
        y = z
    if not save:
        return y, None
    kind = act.saves(slope)
    return y, (y if kind == SAVE_OUTPUT else z if kind == SAVE_INPUT else None)


def act_grad(dy: Tensor, saved: Optional[Tensor], act: Activation, slope: float) -> Tensor:
    """dz = dy * act'(z), from whichever of y / z the forward saved (PyTorch's own backward ops)."""
    name = act.name
    if name == "none":
        return dy
    if name == "relu":
        return torch.ops.aten.threshold_backward(dy, saved, 0)
    if name == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(dy, saved, slope, slope >= 0)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(dy, saved)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(dy, saved, approximate="tanh")
    if name == "silu":
        return torch.ops.aten.silu_backward(dy, saved)
    if name == "sigmoid":
        return torch.ops.aten.sigmoid_backward(dy, saved)
    if name == "tanh":
        return torch.ops.aten.tanh_backward(dy, saved)
    if name == "hardswish":
        return torch.ops.aten.hardswish_backward(dy, saved)
    if name == "hardsigmoid":
        return torch.ops.aten.hardsigmoid_backward(dy, saved)
    if name == "relu6":  # saved is y; 0 < y < 6 <=> 0 < z < 6
        return torch.ops.aten.hardtanh_backward(dy, saved, 0.0, 6.0)
    if name == "mish":
        return torch.ops.aten.mish_backward(dy, saved)
    if name == "quick_gelu":  # no ATen op: autograd's product rule on z * sigmoid(1.702 z), in the
        # order autograd evaluates it (fp32 for fp16 / bf16, rounded once, like the forward)
        z, g = (saved.float(), dy.float()) if saved.dtype in (torch.float16, torch.bfloat16) else (saved, dy)
        s = torch.sigmoid(1.702 * z)
        return (g * s + 1.702 * torch.ops.aten.sigmoid_backward(g * z, s)).to(dy.dtype)
    raise AssertionError(name)


def linear_act_backward(dy: Tensor, x: Tensor, w: Tensor, saved: Optional[Tensor], act: Activation,
                        slope: float, needs: Tuple[bool, bool, bool]):
    dz = act_grad(dy, saved, act, slope)  # (M, N)
    dx = dz @ w if needs[0] else None      # (M, K)
    dw = dz.t() @ x if needs[1] else None  # (N, K)
    db = dz.sum(0) if needs[2] else None   # (N,)
    return dx, dw, db


def softmax_forward(x: Tensor, log: bool) -> Tensor:
    return torch.log_softmax(x, 1) if log else torch.softmax(x, 1)


def softmax_backward(dy: Tensor, y: Tensor, log: bool) -> Tensor:
    if log:
        return torch.ops.aten._log_softmax_backward_data(dy, y, 1, y.dtype)
    return torch.ops.aten._softmax_backward_data(dy, y, 1, y.dtype)


# --- gated linear
def gated_forward(x: Tensor, wg: Tensor, wu: Tensor, bg: Optional[Tensor], bu: Optional[Tensor],
                  act: Activation, slope: float, save: bool):
    """h = act(x Wg^T + bg) * (x Wu^T + bu); saved = (g, u), the pre-activations (M, N)."""
    g, u = F.linear(x, wg, bg), F.linear(x, wu, bu)  # (M, N) each
    h = (g if act.name == "none" else act.ref(g, slope)) * u
    return h, ((g, u) if save else None)


def gated_backward(dh: Tensor, x: Tensor, wg: Tensor, wu: Tensor, saved, act: Activation, slope: float,
                   needs: Tuple[bool, bool, bool, bool, bool]):
    """dg = act'(g) * (dh * u), du = dh * act(g); dx = dg Wg + du Wu, dW* = d*^T x, db* = d*.sum(0)."""
    g, u = saved
    a = g if act.name == "none" else act.ref(g, slope)
    kind = act.saves(slope)
    dg = act_grad(dh * u, a if kind == SAVE_OUTPUT else g if kind == SAVE_INPUT else None, act, slope)
    du = dh * a
    dx = dg @ wg + du @ wu if needs[0] else None
    return (dx, dg.t() @ x if needs[1] else None, du.t() @ x if needs[2] else None,
            dg.sum(0) if needs[3] else None, du.sum(0) if needs[4] else None)
