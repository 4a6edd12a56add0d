"""nn.Module drop-ins: FusedLinear (an nn.Linear), Softmax, LogSoftmax.

Their forwards take `input` like torch's modules. Under torch.jit.script they call the registered
torch.library ops (torch.ops.fastlayers.*), which TorchScript can see; in Python, the functional
ops (the eager fast path).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import activations as _acts
from . import _library  # noqa: F401  (registers torch.ops.fastlayers.*, used by TorchScript) 
from ._dispatch import check_slope, plain_cpu_inference, tiny_cpu_linear
from .backends import forced, select
from .functional import linear_act, log_softmax, softmax


class FusedLinear(nn.Linear):
    """``act(x @ weight.T + bias)`` as one fused op.

    An nn.Linear in every other respect: same constructor arguments (plus ``activation`` and
    ``negative_slope``), same initialisation, parameters and state_dict keys, so a checkpoint of
    an ``nn.Linear`` loads into it and back.
    """

    __jit_ignored_attributes__ = ["_packed"]  # the inference cache: opaque to TorchScript

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "relu", negative_slope: float = _acts.DEFAULT_SLOPE,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 prepack: bool = True) -> None:
        _acts.get(activation, "fastlayers.FusedLinear")  # fail at construction, not at first call
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = check_slope("fastlayers.FusedLinear", negative_slope)
        self.prepack = bool(prepack)
        self._packed = None

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return torch.ops.fastlayers.linear_act(input, self.weight, self.bias, self.activation,
                                                   self.negative_slope)[0]
        return self._eager(input)

    @torch.jit.unused
    def _eager(self, input: Tensor) -> Tensor:
        # The parameters straight from _parameters (Module.__getattr__ is a Python fallback that
        # costs ~0.2 us per lookup); a parametrized or reassigned weight is not there: getattr.
        params = self._parameters
        w = params.get("weight")
        if w is None:
            w = self.weight
        b = params["bias"] if "bias" in params else self.bias
        if FAST_PATH:
            y = tiny_cpu_linear(input, w, b, _acts.ACTIVATIONS[self.activation], self.negative_slope)
            if y is not None:
                return y
        plain = FAST_PATH and plain_cpu_inference(input, w, b)  # no grad, nothing unusual
        if self.activation == "none" and _f_linear_is_faster(input, w, plain and self.prepack and PREPACK):
            return F.linear(input, w, b)
        if plain:
            y = self._forward_inference(input, w, b)
            if y is not None:
                return y
        return linear_act(input, w, b, self.activation, self.negative_slope)

    # ------------------------------------------------------------------ inference fast path
    # When no gradient is needed (torch.no_grad / inference_mode, or nothing requires grad) and
    # the call is plain (see _dispatch.plain_cpu_inference: CPU tensors of one dtype, shapes that
    # fit, no autocast, not recorded by torch.compile / jit.trace, no torch.func transform or
    # dispatch mode) on a backend with a packed forward (cpp), forward skips the functional
    # wrapper's checks and autograd plumbing, and runs on a prepacked copy of the weight (cpp:
    # oneDNN's blocked layout, for GEMMs large enough to take oneDNN; see backends/cpp.py).
    # Anything else takes the general path, which validates and raises the usual errors.
    #
    # Memory: the packed copy costs one more weight (out_features * in_features elements of its
    # dtype) per FusedLinear, built on the first call that uses it. It is rebuilt when the weight
    # changes (its version counter moves on in-place updates and load_state_dict; .to() and
    # `.data = ` give it a new data pointer; the old storage is held until then, so a pointer
    # cannot be reused unnoticed). Never in the state_dict, dropped by pickle / deepcopy.
    # Opt out of prepacking: FusedLinear(..., prepack=False), or FASTLAYERS_PREPACK=0 in the environment.
    def _forward_inference(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Optional[Tensor]:
        backend = select(x.device, "fastlayers.FusedLinear")
        forward = getattr(backend, "linear_act_forward_packed", None)
        if forward is None or x.dtype not in backend.DTYPES:
            return None
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (M, K)
        packed = self._packed_weight if self.prepack and PREPACK else _no_packing
        y2 = forward(x2, w, b, _acts.get(self.activation, "fastlayers.FusedLinear"),
                     self.negative_slope, packed)  # (M, N)
        return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], w.shape[0])  # (*, N)

    def _packed_weight(self, backend, w: Tensor, batch: int):
        """The backend's packed copy of w, (re)built when w changed; None for a weight that can't
        be cached. Called by the backend only when its route for this call uses one."""
        if type(w) is not nn.Parameter or w.is_inference():
            # Only a Parameter (a computed weight, e.g. torch.nn.utils.parametrize, is new every
            # call), and never an inference tensor (no version counter: in-place updates unseen).
            self._packed = None
            return None
        key = (w.data_ptr(), w._version, backend, w.dtype, w.shape, w.stride())
        cached = self._packed
        if cached is None or cached[0] != key:
            # (key, the packed weight or None, w's storage held so its address stays unique)
            cached = self._packed = (key, backend.prepack_weight(w, batch), w.detach())
        return cached[1]

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_packed"] = None  # an opaque oneDNN tensor: rebuilt on demand, never pickled
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_packed", None)
        self.__dict__.setdefault("prepack", True)

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        return s


# Module switches (read once at import; tests flip them): the no-grad fast path of FusedLinear,
# and prepacking on it (FASTLAYERS_PREPACK=0 turns prepacking off for every FusedLinear).
FAST_PATH = True
PREPACK = os.environ.get("FASTLAYERS_PREPACK", "1") not in ("0", "")


def _f_linear_is_faster(x: Tensor, w: Tensor, packed: bool) -> bool:
    """FusedLinear(activation="none") has nothing to fuse but the bias: it calls F.linear (exactly
    nn.Linear's forward, errors included) unless a backend is forced (tests, use_backend) or the
    backend for x measures faster than F.linear at this size (plain_linear_gain: cpp's oneDNN
    GEMMs; packed: this call would run on the prepacked weight). On CUDA that is cuBLAS."""
    if forced() is not None:
        return False
    if type(x) is not Tensor or not x.is_cpu or x.dim() == 0 or w.dim() != 2:
        return True
    gain = getattr(select(x.device, "fastlayers.FusedLinear"), "plain_linear_gain", None)
    k = x.shape[-1]
    return gain is None or not gain(x.numel() // k if k else 0, k, w.shape[0], x.dtype, packed)


def _no_packing(backend, w: Tensor, batch: int) -> None:
    """The packed-weight source of a FusedLinear that does not prepack."""
    return None


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
