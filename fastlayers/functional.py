"""The functional API, re-exported: each op lives in its own file under fastlayers/ops/.

    fl.linear_act(x, weight, bias, activation, negative_slope) == act(x @ weight.T + bias)
    fl.softmax(x, dim) / fl.log_softmax(x, dim)
"""
from .ops.linear_act import linear_act, linear_act_after_gates  # noqa: F401
from .ops.softmax import log_softmax, softmax  # noqa: F401

__all__ = ["linear_act", "log_softmax", "softmax"]
