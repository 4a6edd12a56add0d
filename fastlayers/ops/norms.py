"""RMSNorm and LayerNorm with the residual add fused in front: the checks, the one autograd
Function, the public functions, their torch.library ops, and the modules.

    fl.rms_norm(x, weight, eps=1e-6, residual=None, mode="hf")
    fl.layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, residual=None)
    fl.RMSNorm(hidden_size, eps=1e-6, mode="hf"), fl.LayerNorm(normalized_shape, ...)

With a residual both return ``(y, s)``, ``s = x + residual`` (in x's dtype, as eager rounds it) and
``y = norm(s)``: the pre-norm transformer block's "add the sublayer's output to the residual
stream, then normalise it" in one pass; the next block reads s.

What is saved for backward (per call, M rows of N features):
    eager ``norm(x + r)``: the sum s (M*N) and, for HF's LlamaRMSNorm, also its float32 upcast
        (M*N fp32), the normalised float32 rows (M*N fp32) and, for 16-bit inputs, their cast
        (M*N), plus the weight product's input; F.layer_norm saves x, mean and rstd.
    fastlayers: only the normalised input (x itself -- an input, no copy -- or the returned sum s)
        and per row rstd (and the mean, layer_norm) in float32 (float64 for float64 inputs).

Routes (FusedOp.run, fastlayers/ops/_autograd.py): the registered op fastlayers::norm while
torch.compile / jit.trace record; the PyTorch composite for fake tensors, subclasses, torch.func
transforms, dispatch modes, for mixed dtypes (e.g. a float32 weight with bfloat16 x: PyTorch's
type promotion decides the result's dtype there) and small CPU tensors; else a backend's kernels
(cpu -> cpp, cuda -> triton), through the Function when a gradient is needed.

Autocast: on the CPU autocast leaves layer_norm and rms_norm alone (float32 in, float32 out;
bfloat16 in, bfloat16 out: checked by experiment on torch 2.13, tests/ops/test_norms.py). On CUDA,
layer_norm is on autocast's float32 list (torch.amp docs), and rms_norm is treated the same here:
floating inputs other than float64 are cast to float32 (not checked on a GPU yet).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _autocast
from .._dispatch import _FASTPATH, _is_compiling, backend_for, check_tensor, placeholder
from ._autograd import FusedOp, define
from .._errors import DeviceError, ShapeError
from ..backends import forced
from .._dtypes import compute_dtype

RMS = "fastlayers.rms_norm"
LAYER = "fastlayers.layer_norm"
MODES = ("hf", "torch")  # rms_norm semantics: Hugging Face's LlamaRMSNorm, or F.rms_norm
_KIND_OP = {"rms": RMS, "rms_hf": RMS, "layer": LAYER}


# ----------------------------------------------------------------------------- argument checks
def _check_eps(op: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: expected eps to be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"{op}: expected eps >= 0, got {eps}")
    return eps


def _check(op: str, x: object, weight: object, bias: object, residual: object,
           nshape: Tuple[int, ...]) -> None:
    """x: (*, *nshape); weight, bias: nshape or None; residual: x's shape or None; one device."""
    check_tensor(op, "x", x)
    if x.dim() < len(nshape) or tuple(x.shape[x.dim() - len(nshape):]) != nshape:
        raise ShapeError(f"{op}: expected x of shape (*, {', '.join(map(str, nshape))}) to match "
                         f"normalized_shape {list(nshape)}, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        check_tensor(op, name, t)
        want = tuple(x.shape) if name == "residual" else nshape
        if tuple(t.shape) != want:
            raise ShapeError(f"{op}: expected {name} of shape {want} (x: {tuple(x.shape)}), got shape "
                             f"{tuple(t.shape)}")
        if t.device != x.device:
            raise DeviceError(f"{op}: expected {name} on the same device as x ({x.device}), got {t.device}")


def _autocast_fp32(*ts: Optional[Tensor]):
    """CUDA autocast runs layer_norm / rms_norm in float32; CPU autocast leaves them alone."""
    x = ts[0]
    if isinstance(x, Tensor) and not x.is_cpu and x.is_cuda and _autocast.autocast_dtype(x) is not None:
        return tuple(_autocast.cast(t, torch.float32) for t in ts)
    return ts


# ----------------------------------------------------------------------------- composite
def norm_composite(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                   eps: float, kind: str, nd: int):
    """The PyTorch-ops statement of the op (composite route, create_graph backward, the oracle)."""
    s = x + residual if residual is not None else x
    if kind == "layer":
        y = F.layer_norm(s, s.shape[s.dim() - nd:], weight, bias, eps)
    elif kind == "rms":
        y = F.rms_norm(s, s.shape[s.dim() - nd:], weight, eps)
    else:  # LlamaRMSNorm.forward (float64 stays float64 rather than being truncated to float32)
        h = s.to(compute_dtype(s.dtype))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        y = h.to(s.dtype)
        y = weight * y if weight is not None else y
    return (y, s) if residual is not None else y


def _forward(backend, x: Tensor, weight, bias, residual, eps: float, kind: str, nd: int, save: bool):
    """Through `backend` on (M, N) views -> (y, s, mean, rstd) shaped like x (s None w/o residual);
    the last nd dims of x are normalised (N = their product)."""
    n = math.prod(x.shape[x.dim() - nd:])
    x2 = x.reshape(-1, n) if x.dim() != 2 else x
    r2 = None if residual is None else (residual.reshape(-1, n) if residual.dim() != 2 else residual)
    y, s, mean, rstd = backend.norm_forward(
        x2.contiguous(), None if r2 is None else r2.contiguous(),
        None if weight is None else weight.reshape(n).contiguous(),
        None if bias is None else bias.reshape(n).contiguous(), eps, kind, save)
    y = y.view(x.shape)
    s = None if s is None else s.view(x.shape)
    return y, s, mean, rstd


def _backward(backend, dy: Tensor, ds: Optional[Tensor], src: Tensor, weight, mean, rstd, kind: str, nd: int,
              needs):
    """(dx shaped like src, dw shaped like weight, db) through `backend`."""
    n = math.prod(src.shape[src.dim() - nd:])
    src2 = src.reshape(-1, n).contiguous()
    dy2 = dy.reshape(-1, n).contiguous()
    ds2 = None if ds is None else ds.reshape(-1, n).contiguous()
    w = None if weight is None else weight.reshape(n).contiguous()
    dx, dw, db = backend.norm_backward(dy2, ds2, src2, w, mean, rstd, kind, needs)
    return (None if dx is None else dx.view(src.shape),
            None if dw is None else dw.view(weight.shape),
            None if db is None else db.view(src.shape[src.dim() - nd:]))


# ----------------------------------------------------------------------------- the op
class Norm(FusedOp):
    """y = norm(x [+ residual]) * weight [+ bias]; outputs (y, s) with s = x + residual (None without a
    residual). Saves the normalised input (x, an input; or s, an output), the weight and per row rstd
    [and mean] in float32 (float64 for float64): internal outputs mean ("layer"; else empty) and rstd."""
    name = "norm"
    schema = "Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, str kind, int nd"
    n_inputs, n_outputs, n_extras = 4, 2, 2
    shared_grads = {3: 0}  # d(x + residual) / d residual: x's gradient

    def backend(self, device, dtype, params):
        return backend_for(_KIND_OP[params[1]], device, dtype)

    def forward(self, backend, inputs, params, save):
        y, s, mean, rstd = _forward(backend, *inputs, *params, save=save)
        return (y, s), (mean, rstd)

    def save(self, inputs, outputs, extras, params):
        return (inputs[0] if inputs[3] is None else outputs[1], inputs[1]) + tuple(extras)

    @staticmethod
    def _residual_grad(dy, ds):
        # s's gradient: None (eager, no residual), or empty (the registered op's placeholder s)
        return ds if ds is not None and ds.shape == dy.shape else None

    def backward(self, backend, saved, grads, needs, params):
        src, weight, mean, rstd = saved
        eps, kind, nd = params
        dx, dw, db = _backward(backend, grads[0], self._residual_grad(*grads), src, weight,
                               mean if kind == "layer" else None, rstd, kind, nd,
                               (needs[0], needs[1] and weight is not None, needs[2]))
        return dx, dw, db, None

    def backward_graph(self, saved, grads, needs, params):
        """The backward's formula in PyTorch ops (reference backend) on the saved src, whose statistics
        are recomputed differentiably: exact higher orders. (Not autograd.grad of the composite: with
        src = the returned sum, an output of this node, that re-enters this backward without end.)"""
        from ..backends import reference as _ref
        src, weight = saved[:2]
        (dy, ds), (eps, kind, nd) = grads, params
        n = math.prod(src.shape[src.dim() - nd:])
        src2 = src.reshape(-1, n)
        w2 = None if weight is None else weight.reshape(n)
        _, _, mean_d, rstd_d = _ref.norm_forward(src2, None, w2, None, eps, kind, True)
        ds = self._residual_grad(dy, ds)
        dx, dw, db = _ref.norm_backward(dy.reshape(-1, n), None if ds is None else ds.reshape(-1, n), src2, w2,
                                        mean_d, rstd_d, kind, (needs[0], needs[1] and weight is not None, needs[2]))
        return (None if dx is None else dx.view(src.shape), None if dw is None else dw.view(weight.shape),
                None if db is None else db.view(src.shape[src.dim() - nd:]), None)

    def fake(self, inputs, params):
        x, _, _, residual = inputs
        _, kind, nd = params
        rows = math.prod(x.shape[:x.dim() - nd])
        cd = compute_dtype(x.dtype)
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else placeholder(x),
                x.new_empty((rows,), dtype=cd) if kind == "layer" else placeholder(x),
                x.new_empty((rows,), dtype=cd))

    def fake_backward(self, saved, grads, needs, params):
        src, weight = saved[:2]
        nd = params[2]
        return (torch.empty_like(src, memory_format=torch.contiguous_format) if needs[0] else placeholder(src),
                weight.new_empty(weight.shape) if needs[1] and weight is not None else placeholder(src),
                src.new_empty(src.shape[src.dim() - nd:]) if needs[2] else placeholder(src),
                placeholder(src))


NORM = define(Norm())
NormFunction = NORM.Function


def _composite(inputs, params):
    out = norm_composite(*inputs, *params)
    return out if inputs[3] is not None else (out, None)


# ----------------------------------------------------------------------------- the route
# CPU calls below this many elements (no backend forced) run PyTorch's own ops (F.layer_norm / F.rms_norm,
# the HF formula): the fused path's fixed cost is more than it saves there (measurements:
# bench/results/cpu-routes.md). A forced backend runs its kernels at every size (how tests reach them).
# LayerNorm: ATen's is one well-vectorised kernel each way, ahead of ours fwd+bwd up to ~2^22 elements
# in fp32 (0.60-0.81x at 2^18-2^22; 1.8x at 2^23); with the residual add fused ours wins from ~2^20.
_TORCH_MAX_NUMEL = {"layer": 1 << 23, "layer_add": 1 << 20, "rms": 1 << 18, "rms_hf": 1 << 13}


def _torch_max_numel(kind: str, residual: object) -> int:
    return _TORCH_MAX_NUMEL["layer_add" if kind == "layer" and residual is not None else kind]


# fastlayers._fastpath.small_norm (csrc/torch/fastpath.cpp): _small_cpu_norm's checks and ops for
# "layer" and "rms" in one C++ call (None where _fastpath was not built; tests set it to None).
_FAST_SMALL_NORM = _FASTPATH.small_norm if _FASTPATH is not None else None


def _small_cpu_norm(x: object, weight: Optional[Tensor], bias: Optional[Tensor], residual: object, eps: object,
                    kind: str, nshape: Tuple[int, ...]):
    """The modules' fast path: norm_composite (PyTorch's ops, the route _norm takes for these calls
    too) for a small plain CPU call, after only the checks such a call needs; None: take the general
    path, which checks every argument and raises fastlayers' errors. Measured 2026-12-07 (Xeon, 12 x
    64 x 64, fp32): LayerNorm forward 41.5 -> ~28 us (nn.LayerNorm 27 us); the general path's
    argument checks and route ladder are most of a small norm's time."""
    if _is_compiling() or forced() is not None:
        return None
    if _FAST_SMALL_NORM is not None and kind != "rms_hf":  # the checks and ops below in one C++ call
        # (what it refuses -- a special mode, anything unusual -- the general path takes: the same
        # PyTorch ops below _TORCH_MAX_NUMEL, or fastlayers' errors)
        return _FAST_SMALL_NORM(x, weight, bias, residual, eps, kind == "rms", nshape,
                                _torch_max_numel(kind, residual))
    if (type(x) is not Tensor or not x.is_cpu or x.numel() >= _torch_max_numel(kind, residual)
            or type(eps) is not float or not eps >= 0 or torch.jit.is_tracing()):
        return None
    nd, dtype = len(nshape), x.dtype
    if x.dim() < nd or x.shape[x.dim() - nd:] != nshape:
        return None
    for t in (weight, bias):
        if t is not None and (t.dtype != dtype or t.shape != nshape or not t.is_cpu):
            return None
    if residual is not None and (type(residual) is not Tensor or residual.dtype != dtype
                                 or residual.shape != x.shape or not residual.is_cpu):
        return None
    return norm_composite(x, weight, bias, residual, eps, kind, nd)


def _norm(op: str, kind: str, x, weight, bias, residual, eps: float, nd: int):
    x, weight, bias, residual = _autocast_fp32(x, weight, bias, residual)
    # PyTorch's ops also for mixed dtypes (type promotion decides the result's dtype there) and for
    # small CPU tensors (see _TORCH_MAX_NUMEL)
    composite = (any(t is not None and t.dtype != x.dtype for t in (weight, bias, residual))
                 or (x.is_cpu and x.numel() < _torch_max_numel(kind, residual) and forced() is None))
    y, s = NORM.run((x, weight, bias, residual), (eps, kind, nd), _composite, composite)
    return (y, s) if residual is not None else y


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: Optional[float] = 1e-6, residual: Optional[Tensor] = None,
             mode: str = "hf") -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """RMSNorm over the last dim, in one pass (forward and backward), with the residual add fused.

    mode="hf" (default): Hugging Face's ``LlamaRMSNorm``: ``weight * (x * rsqrt(mean(x^2) + eps))``
    computed in float32 and cast back to x's dtype *before* the weight multiplies (in the weight's
    dtype; float64 stays float64). mode="torch": ``F.rms_norm(x, (N,), weight, eps)``: the weight
    multiplies in float32 and the result is rounded once. The two differ only for 16-bit x.

    x: (*, N); weight: (N,) or None (no scaling, as F.rms_norm allows); eps None: the dtype's
    machine epsilon (F.rms_norm's default). residual (x's shape) or None: returns
    ``(rms_norm(x + residual), x + residual)``, the sum in x's dtype for the next block to read.
    Saved for backward: the normalised input (x, or the sum) and rstd per row (float32; float64
    for float64) -- no float32 copies of the rows as eager LlamaRMSNorm keeps.
    """
    op = RMS
    if mode not in MODES:
        raise ValueError(f"{op}: expected mode to be one of {MODES}, got {mode!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected x to be a torch.Tensor, got {type(x).__name__}")
    if weight is not None and not isinstance(weight, Tensor):
        raise TypeError(f"{op}: expected weight to be a torch.Tensor or None, got {type(weight).__name__}")
    if weight is not None and weight.dim() != 1:
        raise ShapeError(f"{op}: expected weight of shape (N,) for the last dim of x, got shape "
                         f"{tuple(weight.shape)}")
    if x.dim() == 0:
        raise ShapeError(f"{op}: expected x of shape (*, N), got a 0-d tensor")
    eps = torch.finfo(x.dtype).eps if eps is None and x.is_floating_point() else _check_eps(op, eps)
    _check(op, x, weight, None, residual, (x.shape[-1],))
    return _norm(op, "rms_hf" if mode == "hf" else "rms", x, weight, None, residual, eps, 1)


def layer_norm(x: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5,
               residual: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``F.layer_norm(x + residual, normalized_shape, weight, bias, eps)`` in one pass each way.

    With a residual returns ``(y, x + residual)`` (the sum in x's dtype, for the next block).
    Saved for backward: the normalised input (x, or the sum), mean and rstd per row (float32;
    float64 for float64), as F.layer_norm saves for its input -- without eager's extra sum.
    """
    op = LAYER
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected x to be a torch.Tensor, got {type(x).__name__}")
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        nshape = (int(normalized_shape),)
    else:
        try:
            if isinstance(normalized_shape, (str, bytes)):
                raise TypeError
            nshape = tuple(operator.index(d) for d in normalized_shape)
        except TypeError:
            raise TypeError(f"{op}: expected normalized_shape to be an int or a sequence of ints, got "
                            f"{type(normalized_shape).__name__}") from None
    if not nshape:
        raise ShapeError(f"{op}: expected a non-empty normalized_shape")
    eps = _check_eps(op, eps)
    _check(op, x, weight, bias, residual, nshape)
    return _norm(op, "layer", x, weight, bias, residual, eps, len(nshape))


# ----------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    """Drop-in for Hugging Face's ``LlamaRMSNorm`` (and the other families' RMSNorm classes of the
    same forward): parameter ``weight`` (hidden_size,), attribute ``variance_epsilon``; same
    state_dict. ``forward(x, residual=None)``: with a residual returns ``(norm(x + r), x + r)``.
    mode="torch" gives ``nn.RMSNorm``'s rounding instead (see :func:`rms_norm`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, mode: str = "hf", device=None, dtype=None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"fastlayers.RMSNorm: expected mode to be one of {MODES}, got {mode!r}")
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.mode = mode

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        out = _small_cpu_norm(x, self.weight, None, residual, self.variance_epsilon,
                              "rms_hf" if self.mode == "hf" else "rms", self.weight.shape)
        return rms_norm(x, self.weight, self.variance_epsilon, residual, self.mode) if out is None else out

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, mode={self.mode!r}"


class TorchRMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` subclass (same parameters, state_dict, init) running fastlayers.rms_norm with
    mode="torch" (F.rms_norm's rounding) over its normalized_shape, which must be one dim.
    ``forward(x, residual=None)``."""

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        if len(self.normalized_shape) != 1:
            y = F.rms_norm(x + residual if residual is not None else x, self.normalized_shape, self.weight, self.eps)
            return (y, x + residual) if residual is not None else y
        out = _small_cpu_norm(x, self.weight, None, residual, self.eps, "rms", self.normalized_shape)
        return rms_norm(x, self.weight, self.eps, residual, "torch") if out is None else out


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` subclass (same parameters, init, state_dict) running fastlayers.layer_norm.
    ``forward(x, residual=None)``: with a residual returns ``(layer_norm(x + r), x + r)``."""

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        out = _small_cpu_norm(x, self.weight, self.bias, residual, self.eps, "layer", self.normalized_shape)
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, residual) if out is None else out
