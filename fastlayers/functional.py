"""Public functional API and its autograd Functions.

    fl.linear_act(x, weight, bias, activation, negative_slope) == act(x @ weight.T + bias)
    fl.softmax(x, dim) / fl.log_softmax(x, dim)

Each op validates its arguments once here, flattens to the 2-D / 3-D layout of the backend
contract (fastlayers/backends/__init__.py), picks the backend by device and keeps it in ctx so
the backward runs on the same one.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import activations as _acts
from ._errors import DeviceError, DTypeError, ShapeError
from .activations import SAVE_INPUT, SAVE_OUTPUT, Activation
from .backends import select
from ._shapes import as_2d, as_3d
from . import _library  # torch.library ops, used only while torch.compile or jit.trace traces

# ----------------------------------------------------------------------------- autocast (issue 4)
# fastlayers' Functions are invisible to autocast, so the wrappers apply PyTorch's policy
# themselves: linear is "lower precision" on cpu and cuda (floating inputs other than float64 are
# cast to the autocast dtype); softmax/log_softmax are "fp32_set_opt_dtype" on cuda (computed in
# float32 unless dtype= is given) and left alone on cpu (checked by experiment, torch 2.13;
# tests/test_autocast.py compares against torch's own ops so a policy change shows up).
_SOFTMAX_FP32_UNDER_AUTOCAST = frozenset({"cuda"})


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    # is_cpu / is_cuda: ~0.5 us cheaper per call than x.device.type (measured).
    if x.is_cpu:
        dev = "cpu"
    elif x.is_cuda:
        dev = "cuda"
    else:  # e.g. meta: autocast has no state for it (torch.is_autocast_enabled would raise)
        return None
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _autocast_cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)
# ----------------------------------------------------------------------------- end autocast

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation
def _check_tensor(op: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise DTypeError(f"{op}: expected {name} to be a floating-point tensor "
                         f"(float16, bfloat16, float32 or float64), got dtype {t.dtype}")
    return t


def _check_backend_dtype(op: str, backend, dtype: torch.dtype) -> None:
    if dtype not in backend.DTYPES:
        ok = ", ".join(str(d).replace("torch.", "") for d in sorted(backend.DTYPES, key=str))
        raise DTypeError(f"{op}: dtype {dtype} is not supported by the {backend.NAME!r} backend "
                         f"(supported: {ok})")


def _check_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    op = "fastlayers.linear_act"
    _check_tensor(op, "x", x)
    _check_tensor(op, "weight", weight)
    if bias is not None:
        _check_tensor(op, "bias", bias)
    if weight.dim() != 2:
        raise ShapeError(f"{op}: expected weight of shape (out_features, in_features), "
                         f"got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ShapeError(f"{op}: expected x of shape (*, in_features), got a 0-d tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ShapeError(f"{op}: x has {x.shape[-1]} features in its last dim but weight of shape "
                         f"{tuple(weight.shape)} expects {weight.shape[1]} "
                         f"(x: {tuple(x.shape)}, weight: (out_features, in_features))")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ShapeError(f"{op}: expected bias of shape ({weight.shape[0]},) to match weight "
                         f"{tuple(weight.shape)}, got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise DTypeError(f"{op}: expected {name} to have the same dtype as x ({x.dtype}), "
                             f"got {t.dtype}")
        if t.device != x.device:
            raise DeviceError(f"{op}: expected {name} on the same device as x ({x.device}), "
                              f"got {t.device}")


def _normalize_dim(op: str, x: Tensor, dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{op}: expected dim to be an int, got {type(dim).__name__}")
    n = max(x.dim(), 1)  # a 0-d tensor has one valid dim, like torch
    if not -n <= dim < n:
        raise IndexError(f"{op}: Dimension out of range (expected to be in range of "
                         f"[{-n}, {n - 1}], but got {dim})")
    return dim % n


def _owned(t: Tensor) -> Tensor:
    """A contiguous reshaped result as a tensor of its own rather than a view of the backend's
    buffer: autograd forbids in-place edits of a custom Function's view outputs, and users may
    legitimately write `y += residual` on any op's output."""
    if t._base is None:
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


# ----------------------------------------------------------------------------- linear + act
def _linear_forward(backend, x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Activation,
                    slope: float, save: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """(*, K) -> (*, N); saved is 2-D (M, N) or None (see the backend contract)."""
    n = weight.shape[0]
    x2 = as_2d(x)  # (M, K), a view when x's leading dims are contiguous
    y2, saved = backend.linear_act_forward(x2, weight, bias, act, slope, save)  # (M, N)
    return (y2 if x.dim() == 2 else y2.view(*x.shape[:-1], n)), saved


class LinearActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Activation,
                slope: float) -> Tensor:
        backend = select(x.device, "fastlayers.linear_act")
        _check_backend_dtype("fastlayers.linear_act", backend, x.dtype)
        y, saved = _linear_forward(backend, x, weight, bias, act, slope, save=True)
        y = _owned(y)
        kind = act.saves(slope)
        ctx.backend, ctx.act, ctx.slope = backend, act, slope
        ctx.x_shape = x.shape
        # x, W, b are inputs (saving them copies nothing); of the activation only y (its output,
        # saved as returned so in-place edits to it are detected) or the pre-activation z.
        ctx.save_for_backward(x, weight, bias,
                              y if kind == SAVE_OUTPUT else saved if kind == SAVE_INPUT else None)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias, saved = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiable, so higher orders are exact
            return _linear_act_backward_differentiable(x, weight, bias, dy, ctx.act, ctx.slope, need)
        dy2 = as_2d(dy).contiguous()  # (M, N)
        if saved is not None:
            saved = as_2d(saved)
        x2 = as_2d(x)  # (M, K)
        dx, dw, db = ctx.backend.linear_act_backward(
            dy2, x2, weight, saved, ctx.act, ctx.slope, (need[0], need[1], bias is not None and need[2]))
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, None, None


def _linear_act_backward_differentiable(x, weight, bias, dy, act: Activation, slope: float, need):
    """First-order gradients as a graph of PyTorch ops (the fused kernels are first-order only):
    recompute act(x W^T + b) from the saved inputs, which keep their autograd history."""
    wrt = [t for t, n in zip((x, weight, bias), need) if n]
    with torch.enable_grad():
        y = act.ref(torch.nn.functional.linear(x, weight, bias), slope)
    grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True))
    return tuple(next(grads) if n else None for n in need) + (None, None)


def linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               activation: str = "relu", negative_slope: float = 0.01) -> Tensor:
    """``act(x @ weight.T + bias)`` in one fused pass around the GEMM.

    x: (*, in_features); weight: (out_features, in_features) as nn.Linear; bias: (out_features,)
    or None. activation: one of fastlayers.activations.NAMES. Returns (*, out_features) in x's dtype.
    """
    act = _acts.get(activation)
    # -- issue 4: autocast, then the registered op while torch.compile traces (no graph break).
    if isinstance(x, Tensor) and (dtype := _autocast_dtype(x)) is not None:
        x, weight, bias = (_autocast_cast(t, dtype) for t in (x, weight, bias))
    _check_linear(x, weight, bias)
    slope = float(negative_slope)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # registered ops: visible to both
        return _library.linear_act(x, weight, bias, act.name, slope)
    # -- end issue 4
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return LinearActFunction.apply(x, weight, bias, act, slope)
    backend = select(x.device, "fastlayers.linear_act")
    _check_backend_dtype("fastlayers.linear_act", backend, x.dtype)
    return _linear_forward(backend, x, weight, bias, act, slope, save=False)[0]


# ----------------------------------------------------------------------------- softmax
class SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, log: bool) -> Tensor:
        op = "fastlayers.log_softmax" if log else "fastlayers.softmax"
        backend = select(x.device, op)
        _check_backend_dtype(op, backend, x.dtype)
        y = _owned(backend.softmax_forward(as_3d(x, dim), log).view_as(x))
        ctx.backend, ctx.dim, ctx.log = backend, dim, log
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: PyTorch ops on y keep higher orders exact
            d = ctx.dim
            dx = dy - y.exp() * dy.sum(d, keepdim=True) if ctx.log else y * (dy - (dy * y).sum(d, keepdim=True))
            return dx, None, None
        dx = ctx.backend.softmax_backward(as_3d(dy, ctx.dim), as_3d(y, ctx.dim), ctx.log)
        return dx.view_as(y), None, None


def _softmax(x: Tensor, dim: Optional[int], dtype: Optional[torch.dtype], log: bool) -> Tensor:
    op = "fastlayers.log_softmax" if log else "fastlayers.softmax"
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected x to be a torch.Tensor, got {type(x).__name__}")
    # -- issue 4: autocast (PyTorch's policy, see _SOFTMAX_FP32_UNDER_AUTOCAST) and torch.compile.
    if (dtype is None and not x.is_cpu and x.device.type in _SOFTMAX_FP32_UNDER_AUTOCAST
            and _autocast_dtype(x) is not None and x.is_floating_point()
            and x.dtype != torch.float64):
        dtype = torch.float32
    # -- end issue 4
    if dtype is not None:
        x = x.to(dtype)
    _check_tensor(op, "x", x)
    if dim is None:  # torch's legacy implicit dim (nn.Softmax() without dim), with its warning
        warnings.warn(f"Implicit dimension choice for {op.split('.')[-1]} has been deprecated. "
                      "Change the call to include dim=X as an argument.", stacklevel=3)
        dim = 0 if x.dim() in (0, 1, 3) else 1
    dim = _normalize_dim(op, x, dim)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # registered op: Dynamo / jit.trace
        return _library.softmax(x, dim, log)
    if torch.is_grad_enabled() and x.requires_grad:
        return SoftmaxFunction.apply(x, dim, log)
    backend = select(x.device, op)
    _check_backend_dtype(op, backend, x.dtype)
    return backend.softmax_forward(as_3d(x, dim), log).view_as(x)


def softmax(x: Tensor, dim: Optional[int] = -1, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.softmax(x, dim)``: any shape (0-d and zero-size too), rows of any length.
    dtype, if given, casts x first (as torch.softmax does)."""
    return _softmax(x, dim, dtype, log=False)


def log_softmax(x: Tensor, dim: Optional[int] = -1, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.log_softmax(x, dim)``; same contract as :func:`softmax`."""
    return _softmax(x, dim, dtype, log=True)
