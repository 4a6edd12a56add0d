"""nn.Module drop-ins: FusedLinear (an nn.Linear), Softmax, LogSoftmax.

Their forwards take `input` like torch's modules. Under torch.jit.script they call the registered
torch.library ops (torch.ops.fastlayers.*), which TorchScript can see; in Python, the functional
ops (the eager fast path).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import activations as _acts
from . import _library  # noqa: F401  (registers torch.ops.fastlayers.*, used by TorchScript)
from ._dispatch import check_slope
from .functional import linear_act, log_softmax, softmax


class FusedLinear(nn.Linear):
    """``act(x @ weight.T + bias)`` as one fused op.

    An nn.Linear in every other respect: same constructor arguments (plus ``activation`` and
    ``negative_slope``), same initialisation, parameters and state_dict keys, so a checkpoint of
    an ``nn.Linear`` loads into it and back.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "relu", negative_slope: float = _acts.DEFAULT_SLOPE,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        _acts.get(activation, "fastlayers.FusedLinear")  # fail at construction, not at first call
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = check_slope("fastlayers.FusedLinear", negative_slope)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return torch.ops.fastlayers.linear_act(input, self.weight, self.bias, self.activation,
                                                   self.negative_slope)[0]
        return self._eager(input)

    @torch.jit.unused
    def _eager(self, input: Tensor) -> Tensor:
        return linear_act(input, self.weight, self.bias, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        return s


class Softmax(nn.Softmax):
    """Drop-in for nn.Softmax running fastlayers.softmax (dim=None: torch's legacy implicit dim)."""

    def __init__(self, dim: Optional[int] = -1) -> None:
        super().__init__(dim=dim)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return torch.ops.fastlayers.softmax(input, _implicit_dim(self.dim, input.dim()), False)
        return self._eager(input)

    @torch.jit.unused
    def _eager(self, input: Tensor) -> Tensor:
        return softmax(input, self.dim)


class LogSoftmax(nn.LogSoftmax):
    """Drop-in for nn.LogSoftmax running fastlayers.log_softmax (dim=None: torch's implicit dim)."""

    def __init__(self, dim: Optional[int] = -1) -> None:
        super().__init__(dim=dim)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return torch.ops.fastlayers.softmax(input, _implicit_dim(self.dim, input.dim()), True)
        return self._eager(input)

    @torch.jit.unused
    def _eager(self, input: Tensor) -> Tensor:
        return log_softmax(input, self.dim)


def _implicit_dim(dim: Optional[int], ndim: int) -> int:
    """torch's legacy choice for dim=None (TorchScript: no warning); else dim itself."""
    if dim is not None:
        return dim
    return 0 if ndim in (0, 1, 3) else 1
