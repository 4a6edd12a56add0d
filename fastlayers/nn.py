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
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import activations as _acts
from ._dispatch import (_is_compiling, check_slope, linear_needs_grad, plain_cpu_inference, small_cpu_linear,
                        tiny_cpu_linear)
from .backends import forced, select
from .ops.linear_act import linear_act, linear_act_after_gates  # (registers torch.ops.fastlayers.*: TorchScript)
from .ops.softmax import log_softmax, softmax


class FusedLinear(nn.Linear):
    """``act(x @ weight.T + bias)`` as one fused op.

    An nn.Linear in every other respect: same constructor arguments (plus ``activation`` and
    ``negative_slope``), same initialisation, parameters and state_dict keys, so a checkpoint of
    an ``nn.Linear`` loads into it and back.
    """

    # the inference cache and swap's slot record: opaque to TorchScript
    __jit_ignored_attributes__ = ["_packed", "_swap_slot"]

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "relu", negative_slope: float = _acts.DEFAULT_SLOPE,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 prepack: bool = False) -> None:
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
        slot = self.__dict__.get("_swap_slot")
        if slot is not None and slot[0].get(slot[1]) is not self:
            self._wrapped_after_swap(slot)
        # The parameters straight from _parameters (Module.__getattr__ is a Python fallback that
        # costs ~0.2 us per lookup); a parametrized or reassigned weight is not there: getattr.
        params = self._parameters
        w = params.get("weight")
        if w is None:
            w = self.weight
        b = params["bias"] if "bias" in params else self.bias
        if not self.prepack:  # below FUSED_MIN_MACS on the CPU: PyTorch's ops, one C++ call
            y = small_cpu_linear(input, w, b, self.activation, self.negative_slope)
            if y is not None:
                return y
        if (self.activation == "none" and isinstance(input, Tensor) and linear_needs_grad(input, w, b)
                and _f_linear_is_faster(input, w, False)):
            return F.linear(input, w, b)  # training: first, before the no-grad gates below
        if not FAST_PATH:
            if self.activation == "none" and _f_linear_is_faster(input, w, False):
                return F.linear(input, w, b)
            return linear_act(input, w, b, self.activation, self.negative_slope)
        # linear_act's two gates, run once here: their answers go on to linear_act_after_gates
        act, slope = _acts.ACTIVATIONS.get(self.activation), self.negative_slope
        if act is None or type(slope) is not float:  # changed after construction: linear_act checks them
            return linear_act(input, w, b, self.activation, slope)
        y = tiny_cpu_linear(input, w, b, act, slope)
        if y is not None:
            return y
        plain = plain_cpu_inference(input, w, b)  # no grad, nothing unusual
        if self.activation == "none" and _f_linear_is_faster(input, w, plain and self._may_pack(w)):
            return F.linear(input, w, b)
        if plain:
            y = self._forward_inference(input, w, b)
            if y is not None:
                return y
        return linear_act_after_gates(input, w, b, act, slope, plain)

    # ------------------------------------------------------------------ fused by swap
    # fastlayers.swap fuses `fc` + an activation module (or call) by turning fc into this module and
    # the activation into nn.Identity: its output is act(fc(x)). A wrapper that later replaces it in
    # its parent and calls it as a plain Linear (PEFT's LoRA: base_layer(x) + B(A(x))) would then
    # add to the activated output -- a silent wrong result. swap records the slot it put this module
    # in; a call while that slot holds another module (the wrapper) raises instead (~50 ns per call).
    def _mark_swapped_into(self, owner: nn.Module, name: str) -> None:
        """Called by fastlayers.swap for a Linear it fused with an activation."""
        self.__dict__["_swap_slot"] = (owner._modules, name)

    def _wrapped_after_swap(self, slot) -> None:
        other = slot[0].get(slot[1])
        raise RuntimeError(
            f"fastlayers.FusedLinear: this Linear was fused with its activation ({self.activation}) by "
            f"fastlayers.swap, so it returns act(x W^T + b); since then its place {slot[1]!r} in its parent "
            f"holds {type(other).__name__} (e.g. a PEFT LoRA wrapper), which calls it as a plain Linear and "
            "would add to the activated output: a wrong result. Apply such wrappers before fastlayers.swap "
            "(a wrapped Linear is left unfused), or merge them (merge_and_unload) and swap again.")

    # ------------------------------------------------------------------ inference fast path
    # When no gradient is needed (torch.no_grad / inference_mode, or nothing requires grad) and
    # the call is plain (see _dispatch.plain_cpu_inference: CPU tensors of one dtype, shapes that
    # fit, no autocast, not recorded by torch.compile / jit.trace, no torch.func transform or
    # dispatch mode) on a backend with a packed forward (cpp), forward skips the functional
    # wrapper's checks and autograd plumbing. Anything else takes the general path, which
    # validates and raises the usual errors.
    #
    # Prepacked weights are opt-in (fastlayers.prepack(model), or FusedLinear(..., prepack=True)):
    # a packed copy is a cache of the weight, and no cheap test sees every write to a weight.
    # Fused optimizers (AdamW(fused=True), HF Trainer's default), `.data` writes (PEFT's merge,
    # EMA), numpy views and other processes writing shared memory change the weight without
    # moving its version counter; comparing the contents costs as much as the GEMV the packed
    # copy speeds up. So the copy is only ever used for a weight that its owner declared fixed:
    # `prepack` on AND weight.requires_grad False (a trainable weight is never packed). It is
    # rebuilt when the weight's identity, version counter, dtype, layout or any
    # torch.optim optimizer step (a global step hook) says it may have changed; writes none of
    # these see (`.data`, numpy, shared memory) need fastlayers.prepack(model) again.
    # Memory: one more weight (out_features * in_features elements of its dtype). Never in the
    # state_dict, dropped by pickle / deepcopy. FASTLAYERS_PREPACK=0 turns it off everywhere.
    def _may_pack(self, w: Tensor) -> bool:
        """Whether this call may use (and build) the packed copy of w (see above)."""
        return self.prepack and PREPACK and not w.requires_grad

    def _forward_inference(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Optional[Tensor]:
        backend = select(x.device, "fastlayers.FusedLinear")
        forward = getattr(backend, "linear_act_forward_packed", None)
        if forward is None or x.dtype not in backend.DTYPES:
            return None
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (M, K)
        packed = self._packed_weight if self._may_pack(w) else _no_packing
        y2 = forward(x2, w, b, _acts.get(self.activation, "fastlayers.FusedLinear"),
                     self.negative_slope, packed)  # (M, N)
        return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], w.shape[0])  # (*, N)

    def _packed_weight(self, backend, w: Tensor, batch: int):
        """The backend's packed copy of w, (re)built when w may have changed; None for a weight
        that can't be cached. Called by the backend only when its route for this call uses one."""
        if type(w) is not nn.Parameter or w.is_inference():
            # Only a Parameter (a computed weight, e.g. torch.nn.utils.parametrize, is new every
            # call), and never an inference tensor (no version counter: in-place updates unseen).
            self._packed = None
            return None
        key = (w.data_ptr(), w._version, _OPTIMIZER_STEPS[0], backend, w.dtype, w.shape, w.stride())
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
        self.__dict__.setdefault("prepack", False)

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        return s


# Module switches (read once at import; tests flip them): the no-grad fast path of FusedLinear,
# and prepacking on it (FASTLAYERS_PREPACK=0 turns prepacking off even where a model opted in).
FAST_PATH = True
PREPACK = os.environ.get("FASTLAYERS_PREPACK", "1") not in ("0", "")

# Optimizer steps taken in this process (any torch.optim optimizer, fused or not): part of the
# packed-weight key, so a step invalidates every packed copy (a weight that was trainable during
# the step may be frozen again by the next evaluation). One integer increment per step.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def prepack(model: nn.Module, enabled: bool = True) -> int:
    """Opt the FusedLinears of `model` in to (or, enabled=False, out of) prepacked weights for
    no-grad use, and drop every packed copy built so far. Returns how many FusedLinears it set.

    A promise from the caller: the weights (those with requires_grad False: trainable ones are
    never packed) change only through PyTorch ops that move their version counter (in-place ops,
    copy_, load_state_dict), `.to()` / reassignment, or torch.optim optimizers. After writes
    that bypass those (`p.data.mul_()`, PEFT's merge_and_unload, numpy views, another process
    writing shared memory) call `prepack(model)` again. On the CPU backend the packed copy is
    oneDNN's blocked layout (one more copy of each weight; bf16 batch-1..32 GEMVs measured
    1.3-2x faster than on the plain weight, large GEMMs ~1.0x, Xeon with AMX, 2026-12-07). It also
    moves no-grad GEMMs of 2^20..2^22 multiply-adds from PyTorch's BLAS to oneDNN, so their results
    can differ from the same call with grad in the last bits (without prepack they are equal)."""
    count = 0
    for module in model.modules():
        if isinstance(module, FusedLinear):
            module.prepack = bool(enabled)
            module._packed = None
            count += 1
    return count


def _f_linear_is_faster(x: Tensor, w: Tensor, packed: bool) -> bool:
    """FusedLinear(activation="none") has nothing to fuse but the bias: it calls F.linear (exactly
    nn.Linear's forward, errors included) unless a backend is forced (tests, use_backend) or the
    backend for x measures faster than F.linear at this size (plain_linear_gain: cpp's oneDNN
    GEMMs; packed: this call would run on the prepacked weight). On CUDA that is cuBLAS.
    Under torch.compile it is F.linear, as nn.Linear's (the compiler picks its GEMM; and no
    backend is loaded while Dynamo traces: a cold first call under fullgraph=True must not import)."""
    if forced() is not None:
        return False
    if _is_compiling() or type(x) is not Tensor or not x.is_cpu or x.dim() == 0 or w.dim() != 2:
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
