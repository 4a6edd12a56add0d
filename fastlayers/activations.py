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
SAVE_OUTPUT = "output"    # act' is a function of y = act(z): relu, leaky_relu (slope >= 0), sigmoid, tanh
SAVE_INPUT = "input"      # act' needs the pre-activation z: gelu, gelu_tanh, silu, leaky_relu (slope < 0)


@dataclass(frozen=True)
class Activation:
    name: str
    code: int  # shared with csrc/activations.h and fastlayers/kernels/activations.py
    saves_output: bool  # backward can be computed from the output alone (for slope >= 0)
    ref: Callable[[Tensor, float], Tensor]  # PyTorch reference: ref(z, negative_slope)
    module: Callable[[float], torch.nn.Module]  # the equivalent nn.Module

    def saves(self, negative_slope: float) -> str:
        if self.name == "none":
            return SAVE_NOTHING
        if self.name == "leaky_relu":
            # y > 0 <=> z > 0 only when the slope is non-negative.
            return SAVE_OUTPUT if negative_slope >= 0 else SAVE_INPUT
        return SAVE_OUTPUT if self.saves_output else SAVE_INPUT


def _table() -> Dict[str, Activation]:
    rows = [
        Activation("none", 0, False, lambda z, s: z, lambda s: torch.nn.Identity()),
        Activation("relu", 1, True, lambda z, s: F.relu(z), lambda s: torch.nn.ReLU()),
        Activation("leaky_relu", 2, True, lambda z, s: F.leaky_relu(z, s),
                   lambda s: torch.nn.LeakyReLU(s)),
        Activation("gelu", 3, False, lambda z, s: F.gelu(z), lambda s: torch.nn.GELU()),
        Activation("gelu_tanh", 4, False, lambda z, s: F.gelu(z, approximate="tanh"),
                   lambda s: torch.nn.GELU(approximate="tanh")),
        Activation("silu", 5, False, lambda z, s: F.silu(z), lambda s: torch.nn.SiLU()),
        Activation("sigmoid", 6, True, lambda z, s: torch.sigmoid(z), lambda s: torch.nn.Sigmoid()),
        Activation("tanh", 7, True, lambda z, s: torch.tanh(z), lambda s: torch.nn.Tanh()),
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
