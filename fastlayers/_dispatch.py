"""The boundary between the public ops and the backends: argument checks, the route a call
takes, backend choice and the 2-D / 3-D layouts of the backend contract.

Imported by the ops (fastlayers/ops/*.py: their autograd Functions and the torch.library ops used
while torch.compile / jit.trace record); it imports none of them.

Every call takes one of two routes:
* kernels: plain dense tensors (torch.Tensor or nn.Parameter, strided layout) on a device with a
  backend. Their data is handed to a backend as the contract in fastlayers/backends/contract.py
  says: x as (M, K) or (outer, L, inner), the bias contiguous.
* composite: tensors whose data must not or cannot be read by raw-pointer kernels -- fake tensors
  (FakeTensorMode, torch.export), other tensor subclasses (DTensor, ...), the wrappers of
  torch.func transforms (vmap, grad, jacrev), or any call made while a TorchDispatchMode is
  active. These run the PyTorch reference formula (activations.py), which every such subsystem
  understands, so the result is PyTorch's own.
Layouts no kernel reads (sparse, mkldnn, nested) and non-float dtypes (quantized, int, complex)
are refused with a TypeError naming the op and the argument.
"""
from __future__ import annotations

import math
import numbers
import operator
import warnings
from types import ModuleType
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._errors import BackendUnavailableError, DeviceError, DTypeError, ShapeError
from .activations import Activation
from .backends import forced, load, select

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


# ----------------------------------------------------------------------------- argument checks
def check_tensor(op: str, name: str, t: object) -> Tensor:
    """t is a dense floating-point tensor, or a TypeError names what it is instead."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise TypeError(f"{op}: expected {name} to be a dense tensor, got a nested tensor "
                        "(not supported; unbind it or pad it first)")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: expected {name} to be a dense (strided) tensor, got layout "
                        f"{t.layout} (not supported; convert it with .to_dense())")
    if t.dtype not in FLOATS:
        raise DTypeError(f"{op}: expected {name} to be a floating-point tensor "
                         f"(float16, bfloat16, float32 or float64), got dtype {t.dtype}")
    return t


def check_linear(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                 names: Tuple[str, str] = ("weight", "bias")) -> None:
    """x: (*, K), weight: (N, K), bias: (N,) or None; one dtype, one device. `names`: how the
    op calls its weight and bias (gated_linear: w_gate / b_gate, w_up / b_up)."""
    wname, bname = names
    check_tensor(op, "x", x)
    check_tensor(op, wname, weight)
    if bias is not None:
        check_tensor(op, bname, bias)
    if weight.dim() != 2:
        raise ShapeError(f"{op}: expected {wname} of shape (out_features, in_features), "
                         f"got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ShapeError(f"{op}: expected x of shape (*, in_features), got a 0-d tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ShapeError(f"{op}: x has {x.shape[-1]} features in its last dim but {wname} of shape "
                         f"{tuple(weight.shape)} expects {weight.shape[1]} "
                         f"(x: {tuple(x.shape)}, {wname}: (out_features, in_features))")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ShapeError(f"{op}: expected {bname} of shape ({weight.shape[0]},) to match {wname} "
                         f"{tuple(weight.shape)}, got shape {tuple(bias.shape)}")
    for name, t in ((wname, weight), (bname, bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise DTypeError(f"{op}: expected {name} to have the same dtype as x ({x.dtype}), "
                             f"got {t.dtype}")
        if t.device != x.device:
            raise DeviceError(f"{op}: expected {name} on the same device as x ({x.device}), "
                              f"got {t.device}")


def check_slope(op: str, negative_slope: object) -> float:
    """leaky_relu's negative_slope: a real number (as F.leaky_relu's Number), not a bool,
    string or tensor (a tensor slope would silently drop its autograd history)."""
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"{op}: expected negative_slope to be a real number (float or int), "
                        f"got {type(negative_slope).__name__}")
    return float(negative_slope)


def check_int(op: str, name: str, value: object) -> int:
    """An int-like argument (int, numpy integer, 0-d integer tensor; not a bool) as an int."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: expected {name} to be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: expected {name} to be an int, got {type(value).__name__}") from None


def normalize_dim(op: str, x: Tensor, dim: object) -> int:
    """dim as torch.softmax takes it: an int-like (int, numpy integer, 0-d integer tensor; not a
    bool), in [-ndim, ndim) (a 0-d tensor has one dim); returned in [0, max(ndim, 1))."""
    d = check_int(op, "dim", dim)
    n = max(x.dim(), 1)
    if not -n <= d < n:
        raise IndexError(f"{op}: Dimension out of range (expected to be in range of "
                         f"[{-n}, {n - 1}], but got {d})")
    return d % n


# ----------------------------------------------------------------------------- the route
def composite_reason(*tensors: Optional[Tensor]) -> Optional[str]:
    """Why these (already checked) tensors must take the composite route, or None for kernels.
    Cost on the kernel route: a few type checks (~0.3 us)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform is active"
    if torch._C._len_torch_dispatch_stack():
        return "a TorchDispatchMode (e.g. FakeTensorMode) is active"
    for t in tensors:
        if t is not None and type(t) not in _PLAIN_TYPES:
            return f"a tensor subclass ({type(t).__name__})"
    return None


def linear_needs_grad(x: Tensor, w: Tensor, b: Optional[Tensor]) -> bool:
    """Whether autograd will want a gradient of a linear call x, w, b (tensors; b may be None)."""
    return torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))


def plain_cpu_inference(x: object, w: object, b: object) -> bool:
    """Whether a linear call x (*, K), w (N, K), b (N,) or None may skip the general path's checks
    and autograd plumbing: plain dense CPU tensors of one dtype whose shapes fit, nothing that
    needs grad, and no autocast, torch.compile / jit.trace recording, torch.func transform or
    dispatch mode active. False only means "take the general path", which checks every argument
    and raises the usual errors; True implies everything check_linear and composite_reason
    would accept (dtype support is the backend's to check). The no-grad fast paths of
    FusedLinear and linear_act; ~1 us cheaper than those checks at 1 x 64 -> 64, where the
    whole eager F.relu(F.linear(x, w, b)) takes ~4 us."""
    if (type(x) not in _PLAIN_TYPES or type(w) not in _PLAIN_TYPES
            or (b is not None and type(b) not in _PLAIN_TYPES)):
        return False
    if linear_needs_grad(x, w, b):
        return False
    if (torch._C._is_any_autocast_enabled() or torch.compiler.is_compiling()
            or torch._C._get_tracing_state() is not None
            or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._len_torch_dispatch_stack()):
        return False
    dtype = x.dtype
    return (x.is_cpu and w.is_cpu and x.layout == _STRIDED and w.layout == _STRIDED
            and not x.is_nested and not w.is_nested and w.dtype == dtype and dtype in FLOATS
            and w.dim() == 2 and x.dim() >= 1 and x.shape[-1] == w.shape[1]
            and (b is None or (b.is_cpu and b.layout == _STRIDED and b.dtype == dtype
                               and b.dim() == 1 and b.shape[0] == w.shape[0])))


_STRIDED = torch.strided
_F_LINEAR = torch._C._nn.linear  # F.linear itself (F.linear is this builtin)
# The functions tiny_cpu_linear calls, bound once: each dotted lookup (torch._C._functorch...)
# costs ~20 ns per attribute on a path whose whole budget is a few hundred ns.
_is_compiling = torch.compiler.is_compiling  # (Dynamo knows this function object)
_grad_enabled = torch.is_grad_enabled
_tracing_state = torch._C._get_tracing_state
_functorch_level = torch._C._functorch.peek_interpreter_stack
_dispatch_modes = torch._C._len_torch_dispatch_stack
_CPU = "cpp"  # the CPU backend, whose tiny-output rule tiny_cpu_linear applies
_CPU_OR_NONE = (None, _CPU)  # forced() values that leave CPU calls to it
_cpu_backend: list = []  # [cpp module, or None when it cannot load], filled on first use


def _load_fastpath() -> Optional[ModuleType]:
    """fastlayers._fastpath, or None: not built (no torch at build time; see setup.py),
    or built against another torch than this one (a warning: rebuild), or another activation table."""
    try:
        from . import _fastpath
    except ImportError:
        return None
    from .activations import ACTIVATIONS
    if _fastpath.TORCH_VERSION != torch.__version__:
        warnings.warn(f"fastlayers._fastpath was built against torch {_fastpath.TORCH_VERSION}, this is torch "
                      f"{torch.__version__}: not used (tiny no-grad linears take the slower Python gate); "
                      "rebuild it with `make build`", RuntimeWarning, stacklevel=2)
        return None
    codes = dict(_fastpath.ACTIVATION_CODES)
    if any(ACTIVATIONS[name].code != code for name, code in codes.items() if name in ACTIVATIONS) \
            or not set(codes) <= set(ACTIVATIONS):
        raise ImportError(f"fastlayers._fastpath was built with other activation codes ({codes}) than "
                          "fastlayers/activations.py; rebuild it with `make build`")
    return _fastpath


# fastlayers._fastpath (csrc/torch/fastpath.cpp), or None where it was not built:
# tiny_linear(x, w, b, code, slope, max_out, max_macs) and tiny_softmax(x, dim, log, max_numel),
# the checks and the ops of tiny_cpu_linear / tiny_cpu_softmax below in C++ (~1.5 us and ~0.5 us
# faster per call). Tests set these to None to run the Python gates alone.
_FASTPATH = _load_fastpath()
_FAST_TINY_LINEAR = _FASTPATH.tiny_linear if _FASTPATH is not None else None
_FAST_TINY_SOFTMAX = _FASTPATH.tiny_softmax if _FASTPATH is not None else None
# The activations the C++ gate runs (all but quick_gelu): for those, with no TorchFunctionMode
# active, its refusal is final and the Python gate's checks would only repeat it.
_FAST_ACTS = frozenset(dict(_FASTPATH.ACTIVATION_CODES)) if _FASTPATH is not None else frozenset()
_torch_function_mode = torch._C._is_torch_function_mode_enabled


_FAST_SMALL_LINEAR = _FASTPATH.small_linear if _FASTPATH is not None else None
_FAST_CODES = dict(_FASTPATH.ACTIVATION_CODES) if _FASTPATH is not None else {}


# CPU outputs from this many bytes come from _fastpath's output cache (as backends/cpu/_ext._empty's)
CACHED_MIN_BYTES = 32 << 20


def empty_contiguous(x: Tensor, preserve: bool = False) -> Tensor:
    """torch.empty_like(x, memory_format=torch.contiguous_format) (preserve: torch.empty_like(x),
    x's own strides where x is dense and non-overlapping), from the CPU output cache for a plain
    CPU tensor of CACHED_MIN_BYTES or more (see empty_cache)."""
    if (_FASTPATH is not None and type(x) is Tensor and x.is_cpu and x.layout is _STRIDED
            and x.numel() * x.element_size() >= CACHED_MIN_BYTES):
        if not preserve:
            return _FASTPATH.cached_empty(tuple(x.shape), x.dtype)
        out = _FASTPATH.cached_empty_like(x)  # None where empty_like would not keep x's strides
        if out is not None:
            return out
    return torch.empty_like(x) if preserve else torch.empty_like(x, memory_format=torch.contiguous_format)


def empty_cache() -> int:
    """Return the CPU output cache's blocks to the OS; the number of bytes freed.

    fastlayers' CPU kernels take their outputs of 32 MiB and more from a cache that keeps freed
    blocks for reuse (csrc/torch/fastpath.cpp): a fresh buffer that large is faulted in and zeroed
    page by page by the OS, which costs about as much as the pass that fills it. The cache holds at
    most FASTLAYERS_CPU_CACHE_MB (default min(1 GiB, RAM / 16); 0 turns it off) of freed blocks,
    the newest; it is like torch.cuda.empty_cache() for CUDA's caching allocator. 0 where
    fastlayers._fastpath is not built (then nothing is cached)."""
    return 0 if _FASTPATH is None else int(_FASTPATH.empty_cache())


def small_cpu_linear(x: object, w: object, b: object, activation: str, slope: object) -> Optional[Tensor]:
    """act(F.linear(x, w, b)) for a CPU linear below the cpp backend's FUSED_MIN_MACS, with or
    without a gradient, or None: take the general path.

    The route linear_act's general path gives such a call (backends.cpu.gemm.fused_pays: PyTorch's
    two ops, the composite with grad, the backend's forward of the same ops without; same bits),
    taken in one C++ call (fastlayers._fastpath.small_linear) before that path's Python: in a
    training step of a small model each of its gates, run between two GEMMs on cold caches, costs
    3-5x its hot-loop time (FusedLinear 64 -> 192 on 1024 tokens: +14 us a call over nn.Linear,
    of which 1.4 us in a hot loop). Only with the cpp backend in charge (nothing forced: a forced
    backend runs the fused kernels at every size) on its "auto" route, outside torch.compile; the
    C++ side admits plain dense CPU tensors, no special mode (see fastpath.cpp) and an activation it
    has an ATen op for. FusedLinear's caller; None where _fastpath was not built."""
    if _FAST_SMALL_LINEAR is None or _is_compiling() or forced() is not None:
        return None
    backend = _cpu_backend[0] if _cpu_backend else _load_cpu_backend()
    code = _FAST_CODES.get(activation)
    if backend is None or code is None or type(slope) is not float or backend.gemm.ROUTE != "auto":
        return None
    return _FAST_SMALL_LINEAR(x, w, b, code, slope, backend.gemm.FUSED_MIN_MACS)


def tiny_cpu_linear(x: object, w: object, b: object, act: Activation, slope: float) -> Optional[Tensor]:
    """act(F.linear(x, w, b)) for a tiny no-grad linear on the CPU, or None: take the general path.

    The cpp backend runs a forward its rule backends.cpu.gemm.torch_ops_take admits (a tiny output
    from few multiply-adds) as PyTorch's own F.linear + activation (its own pass
    would cost more than the whole op; cpp.linear_act_forward has the same rule for the calls that
    reach it); here that rule runs before the general path's checks, which at 1 x 64 -> 64 cost
    more than eager's whole F.relu(F.linear(x, w, b)) (~3 us). The calls admitted are only those
    the general path would send to the same two ops: plain dense CPU tensors of a floating dtype,
    a 2-D weight, nothing needing grad, the cpp backend in charge with its "auto" route, no
    torch.compile / jit.trace recording, torch.func transform or dispatch mode (is_compiling comes
    first: under Dynamo it ends the walk before anything Dynamo would not trace). Shapes, dtypes and
    devices that do not match make F.linear raise a RuntimeError: None, and the general path raises
    fastlayers' own error. Autocast needs no check: F.linear applies the policy fastlayers copies
    (_autocast.py), so the result is the general path's. The activation runs in place on F.linear's
    fresh output (the same ATen kernel, bit-identical, one allocation less).

    Two implementations of the same admission rule: fastlayers._fastpath in C++ (where built: the
    checks read the tensors' C++ fields, the ops are called without Python's argument parsing),
    then, where it is not built or for what it leaves to Python (quick_gelu, a TorchFunctionMode),
    the checks below in Python (20-90 ns each, ~1 us in all, measured)."""
    if _is_compiling():
        return None
    backend = _cpu_backend[0] if _cpu_backend else _load_cpu_backend()
    if backend is None or backend.gemm.ROUTE != "auto" or forced() not in _CPU_OR_NONE:
        return None
    if _FAST_TINY_LINEAR is not None:
        y = _FAST_TINY_LINEAR(x, w, b, act.code, slope, backend.gemm.TORCH_OPS_MAX_OUT, backend.gemm.TORCH_OPS_MAX_MACS)
        if y is not None or (act.name in _FAST_ACTS and not _torch_function_mode()):
            return y
    if (type(x) is not Tensor or not x.is_cpu
            or x.layout is not _STRIDED or x.is_nested or x.dtype not in FLOATS):
        return None
    # (F.linear refuses a sparse, mkldnn or meta bias, but would take a sparse weight, and a
    # meta weight with a CPU x: it returns an uninitialised CPU tensor)
    if (type(w) not in _PLAIN_TYPES or w.layout is not _STRIDED or not w.is_cpu
            or (b is not None and type(b) not in _PLAIN_TYPES)):
        return None
    if _grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return None
    if _tracing_state() is not None or _functorch_level() is not None or _dispatch_modes():
        return None
    try:
        n, k = w.shape  # ValueError: not 2-D
        # M = x.numel() / K (K = 0: M unknown, the general path decides; x.numel() not a multiple
        # of K: F.linear raises below)
        if not k or not backend.gemm.torch_ops_take(x.numel() // k * n, k):
            return None
        if b is not None and (b.dim() != 1 or b.numel() != n):  # F.linear would broadcast it
            return None
        y = _F_LINEAR(x, w, b)
    except (RuntimeError, ValueError):  # mismatched shapes / dtypes / devices: the general path says why
        return None
    return act.ref_(y, slope)


def tiny_cpu_softmax(x: object, dim: object, dtype: object, log: bool) -> Optional[Tensor]:
    """torch.softmax / torch.log_softmax(x, dim, dtype=dtype) for a small CPU tensor, or None: take
    the general path.

    Below cpp.TORCH_SOFTMAX_MAX_NUMEL elements PyTorch's own kernel is faster than the general
    path's fixed cost alone (measured there), and it is the reference these ops match, gradient
    included (its autograd node). Admitted: no backend forced (a forced backend runs its own
    kernels at every size: use_backend("cpp") is how its softmax kernels are tested), a plain dense
    CPU tensor of a floating dtype, an int-like dim in range, no dtype or a floating one, no
    torch.compile / jit.trace recording (they record fastlayers' registered op). Anything else
    (other dims, dtypes, devices, layouts) goes to the general path, which checks and raises
    fastlayers' errors. torch.func transforms and dispatch modes need no check: the general path's
    composite route runs this same torch op for them. As tiny_cpu_linear: the checks and the op in
    C++ (fastlayers._fastpath) where built, else, for a dtype argument or under a mode, in Python."""
    if _is_compiling() or forced() is not None:
        return None
    backend = _cpu_backend[0] if _cpu_backend else _load_cpu_backend()
    if backend is None:
        return None
    if type(dim) is not int:
        # Any int-like dim (numpy integer, 0-d integer tensor) takes the gate as its int would, as
        # normalize_dim takes it on the general path: the same op, the same bits, however dim is
        # spelled. A bool or a non-integer goes on to the general path, which raises.
        if isinstance(dim, bool):
            return None
        try:
            dim = operator.index(dim)
        except TypeError:
            return None
    if dtype is None and _FAST_TINY_SOFTMAX is not None:
        y = _FAST_TINY_SOFTMAX(x, dim, log, backend.softmax.TORCH_SOFTMAX_MAX_NUMEL)
        # Its refusal is final, but under the modes it leaves to the Python gate (which runs
        # torch's op for torch.func transforms, dispatch and function modes).
        if y is not None or not (_torch_function_mode() or _dispatch_modes() or _functorch_level() is not None):
            return y
    if type(x) not in _PLAIN_TYPES or type(dim) is not int or (dtype is not None and dtype not in FLOATS):
        return None
    if not x.is_cpu or x.layout is not _STRIDED or x.is_nested or x.dtype not in FLOATS:
        return None
    n = x.dim() or 1
    if not -n <= dim < n or _tracing_state() is not None or x.numel() >= backend.softmax.TORCH_SOFTMAX_MAX_NUMEL:
        return None
    if dtype is None:  # (a dtype=None keyword costs torch's argument parser ~0.3 us)
        return _LOG_SOFTMAX(x, dim) if log else _SOFTMAX(x, dim)
    return _LOG_SOFTMAX(x, dim, dtype=dtype) if log else _SOFTMAX(x, dim, dtype=dtype)


_SOFTMAX, _LOG_SOFTMAX = torch.softmax, torch.log_softmax  # (tests count the gate's calls here)


def cpu_backend() -> Optional[ModuleType]:
    """The CPU backend module (loaded on first use), or None where it cannot load."""
    return _cpu_backend[0] if _cpu_backend else _load_cpu_backend()


def _load_cpu_backend() -> Optional[ModuleType]:
    try:
        backend = load(_CPU)
    except BackendUnavailableError:
        backend = None
    _cpu_backend.append(backend)
    return backend


def backend_for(op: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The backend module for tensors of `device` and `dtype` (see backends.select)."""
    backend = select(device, op)
    if dtype not in backend.DTYPES:
        ok = ", ".join(str(d).replace("torch.", "") for d in sorted(backend.DTYPES, key=str))
        raise DTypeError(f"{op}: dtype {dtype} is not supported by the {backend.NAME!r} backend "
                         f"(supported: {ok})")
    return backend


# ----------------------------------------------------------------------------- layouts
def as_2d(t: Tensor) -> Tensor:
    """(*, K) -> (M, K) with M = prod(*): a view when the leading dims allow (K may be 0)."""
    if t.dim() == 2:
        return t
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def as_3d(x: Tensor, dim: int) -> Tensor:
    """(*pre, L, *post) -> (outer, L, inner) contiguous, for an op over `dim` (a 0-d x is (1, 1, 1))."""
    x = x.contiguous()
    if x.dim() == 0:
        return x.view(1, 1, 1)
    shape = x.shape
    length, inner = shape[dim], 1
    for s in shape[dim + 1:]:
        inner *= s
    n = length * inner
    outer = x.numel() // n if n else math.prod(shape[:dim])
    return x.view(outer, length, inner)


def contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    """t as the contract hands small operands (biases) over: contiguous (a copy only if needed)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def owned(t: Tensor) -> Tensor:
    """A reshaped result as a tensor of its own rather than a view of the backend's buffer:
    autograd forbids in-place edits of a custom Function's view outputs, and users may
    legitimately write `y += residual` on any op's output."""
    if t._base is None:
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def placeholder(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A new 0-element tensor on like's device (of like's dtype unless given): a custom op's output
    for a result it did not compute (custom ops cannot return None, and outputs may not alias)."""
    return like.new_empty((0,), dtype=dtype)
