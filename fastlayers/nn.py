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


def _softmax_forward(input: Tensor, dim: Optional[int], log: bool) -> Tensor:
    """The forward of Softmax / LogSoftmax: the registered op under TorchScript (dim=None: torch's
    legacy implicit dim, without the warning), else the functional op."""
    if torch.jit.is_scripting():
        if dim is None:
            dim = 0 if input.dim() in (0, 1, 3) else 1
        return torch.ops.fastlayers.softmax(input, dim, log)
    return _eager_softmax(input, dim, log)


@torch.jit.unused
def _eager_softmax(input: Tensor, dim: Optional[int], log: bool) -> Tensor:
    return (log_softmax if log else softmax)(input, dim)


class Softmax(nn.Softmax):
    """Drop-in for nn.Softmax running fastlayers.softmax (dim=None: torch's legacy implicit dim)."""

    def __init__(self, dim: Optional[int] = -1) -> None:
        super().__init__(dim=dim)

    def forward(self, input: Tensor) -> Tensor:
        return _softmax_forward(input, self.dim, False)


class LogSoftmax(nn.LogSoftmax):
    """Drop-in for nn.LogSoftmax running fastlayers.log_softmax (dim=None: torch's implicit dim)."""

    def __init__(self, dim: Optional[int] = -1) -> None:
        super().__init__(dim=dim)

    def forward(self, input: Tensor) -> Tensor:
        return _softmax_forward(input, self.dim, True)
