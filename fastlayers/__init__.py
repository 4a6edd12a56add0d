"""fastlayers: fused neural-network layers for PyTorch.

    import fastlayers as fl
    y = fl.linear_act(x, weight, bias, activation="gelu")   # gelu(x @ weight.T + bias)
    p = fl.softmax(scores, dim=-1)
    layer = fl.FusedLinear(1024, 4096, activation="gelu")    # an nn.Linear subclass
"""
from . import activations
from ._dispatch import empty_cache
from ._errors import BackendUnavailableError, DeviceError, DTypeError, ShapeError
from .backends import available_backends, use_backend
from .ops.linear_act import linear_act
from .ops.softmax import log_softmax, softmax
from .ops.gated_linear import FusedGatedMLP, gated_linear
from .ops.cross_entropy import cross_entropy
from .ops.linear_cross_entropy import linear_cross_entropy
from .nn import FusedLinear, LogSoftmax, Softmax, prepack
from .ops.norms import LayerNorm, RMSNorm, layer_norm, rms_norm
from .ops.rotary import rotary
from .ops.attention_softmax import AttentionSoftmax, attention_softmax
from .ops.attention import scaled_dot_product_attention
from .swap import SwapReport, swap

__version__ = "0.1.0"

__all__ = [
    "linear_act", "gated_linear", "softmax", "log_softmax", "cross_entropy", "linear_cross_entropy",
    "FusedLinear", "FusedGatedMLP", "Softmax", "LogSoftmax",
    "available_backends", "use_backend", "activations", "swap", "SwapReport", "prepack",
    "BackendUnavailableError", "DeviceError", "DTypeError", "ShapeError",
    "rms_norm", "layer_norm", "RMSNorm", "LayerNorm",
    "rotary",
    "attention_softmax", "AttentionSoftmax", "scaled_dot_product_attention",
    "empty_cache",
]
