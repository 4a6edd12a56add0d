"""The one table of activation names.

Every backend keys its own kernels by ``Activation.code`` (csrc/activations.h and
fastlayers/kernels/activations.py use the same numbers); the PyTorch formulas here are the
reference semantics every backend must reproduce.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

# leaky_relu's default negative_slope (F.leaky_relu's), the default of every fastlayers API.
DEFAULT_SLOPE = 0.01

# What the backward pass needs besides grad_output.
SAVE_NOTHING = "nothing"  # act'(z) == 1
SAVE_OUTPUT = "output"    # act' is a function of y = act(z): relu, leaky_relu (slope >= 0), sigmoid, tanh,
                          # relu6
SAVE_INPUT = "input"      # act' needs the pre-activation z: gelu, gelu_tanh, silu, leaky_relu (slope < 0),
                          # hardswish, hardsigmoid, quick_gelu, mish


@dataclass(frozen=True)
class Activation:
    name: str
    code: int  # shared with csrc/activations.h and fastlayers/kernels/activations.py
    saves_output: bool  # backward can be computed from the output alone (for slope >= 0)
    ref: Callable[[Tensor, float], Tensor]  # PyTorch reference: ref(z, negative_slope)
    module: Callable[[float], torch.nn.Module]  # the equivalent nn.Module
    # ref computed in place on z (a fresh tensor nothing else holds and that needs no grad): the
    # same ATen kernel as ref (bit-identical results) without allocating the output.
    ref_: Callable[[Tensor, float], Tensor]

    def saves(self, negative_slope: float) -> str:
        if self.name == "none":
            return SAVE_NOTHING
        if self.name == "leaky_relu":
            # y > 0 <=> z > 0 only when the slope is non-negative.
            return SAVE_OUTPUT if negative_slope >= 0 else SAVE_INPUT
        return SAVE_OUTPUT if self.saves_output else SAVE_INPUT


class QuickGELU(torch.nn.Module):
    """x * sigmoid(1.702 x) (CLIP's and Hugging Face's "quick_gelu"); PyTorch has no module for it."""

    def forward(self, x: Tensor) -> Tensor:
        return _quick_gelu(x)


def _quick_gelu(z: Tensor) -> Tensor:
    # Low precision is computed in fp32 and rounded once, as PyTorch's own activation kernels do
    # for fp16 / bf16 (the three-op formula in bf16 would round 1.702 z first: 4% off at z = -20).
    if z.dtype in (torch.float16, torch.bfloat16):
        zf = z.float()
        return (zf * torch.sigmoid(1.702 * zf)).to(z.dtype)
    return z * torch.sigmoid(1.702 * z)


def _table() -> Dict[str, Activation]:
    nn_ = torch._C._nn  # the in-place ATen ops behind F.*(inplace=True), without F's Python layer
    rows = [
        Activation("none", 0, False, lambda z, s: z, lambda s: torch.nn.Identity(), lambda z, s: z),
        Activation("relu", 1, True, lambda z, s: F.relu(z), lambda s: torch.nn.ReLU(),
                   lambda z, s: torch.relu_(z)),
        Activation("leaky_relu", 2, True, lambda z, s: F.leaky_relu(z, s),
                   lambda s: torch.nn.LeakyReLU(s), lambda z, s: nn_.leaky_relu_(z, s)),
        Activation("gelu", 3, False, lambda z, s: F.gelu(z), lambda s: torch.nn.GELU(),
                   lambda z, s: nn_.gelu_(z)),
        Activation("gelu_tanh", 4, False, lambda z, s: F.gelu(z, approximate="tanh"),
                   lambda s: torch.nn.GELU(approximate="tanh"), lambda z, s: nn_.gelu_(z, approximate="tanh")),
        Activation("silu", 5, False, lambda z, s: F.silu(z), lambda s: torch.nn.SiLU(),
                   lambda z, s: nn_.silu_(z)),
        Activation("sigmoid", 6, True, lambda z, s: torch.sigmoid(z), lambda s: torch.nn.Sigmoid(),
                   lambda z, s: torch.sigmoid_(z)),
        Activation("tanh", 7, True, lambda z, s: torch.tanh(z), lambda s: torch.nn.Tanh(),
                   lambda z, s: torch.tanh_(z)),
        # Activations of real models (MobileNetV3, CLIP, YOLO ...). Semantics of ATen's formulas (the
        # scalar code of its CPU kernels, which PyTorch runs on tensors shorter than two vectors; its
        # vectorised loop, run on long tensors, differs at NaN: hardswish'(nan) = NaN, relu6'(nan) = 0
        # there, dy in the formula and here, at every size):
        #   hardswish(z)   = z * min(max(z + 3, 0), 6) / 6;  ' = 0 (z <= -3), z/3 + 1/2 (z < 3), else 1
        #                    (NaN: 1)
        #   hardsigmoid(z) = min(max(z + 3, 0), 6) / 6;      ' = 1/6 on (-3, 3), else 0 (NaN: 0)
        #   relu6(z)       = hardtanh(z, 0, 6) (keeps -0, NaN); ' = 0 (z <= 0 or z >= 6), else 1 (NaN: 1)
        #   quick_gelu(z)  = z * sigmoid(1.702 z); ' by autograd's product rule (finite where 1.702 z
        #                    overflows but z does not)
        #   mish(z)        = z * tanh(softplus(z));  ' = t + z sigmoid(z) (1 - t^2), t = tanh(softplus z)
        # relu6 saves its output (0 < y < 6 <=> 0 < z < 6, clamping is exact); hardsigmoid cannot
        # (z = 3 - ulp rounds to y = 1 but has slope 1/6), nor can the others.
        Activation("hardswish", 8, False, lambda z, s: F.hardswish(z), lambda s: torch.nn.Hardswish(),
                   lambda z, s: nn_.hardswish_(z)),
        Activation("hardsigmoid", 9, False, lambda z, s: F.hardsigmoid(z),
                   lambda s: torch.nn.Hardsigmoid(), lambda z, s: nn_.hardsigmoid_(z)),
        Activation("relu6", 10, True, lambda z, s: F.relu6(z), lambda s: torch.nn.ReLU6(),
                   lambda z, s: nn_.relu6_(z)),
        Activation("quick_gelu", 11, False, lambda z, s: _quick_gelu(z), lambda s: QuickGELU(),
                   lambda z, s: _quick_gelu(z)),
        Activation("mish", 12, False, lambda z, s: F.mish(z), lambda s: torch.nn.Mish(),
                   lambda z, s: nn_.mish_(z)),
    ]
    return {a.name: a for a in rows}


ACTIVATIONS: Dict[str, Activation] = _table()
NAMES = tuple(ACTIVATIONS)


def get(name: str, op: str = "fastlayers.linear_act") -> Activation:
    """Look an activation up by name; a clear ValueError names the valid choices."""
    act = ACTIVATIONS.get(name) if isinstance(name, str) else None
    if act is None:
        raise ValueError(f"{op}: unknown activation {name!r}; expected one of {', '.join(NAMES)}")
    return act
