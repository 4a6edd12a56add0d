"""The one dispatch point: a registry ``name -> backend module``.

Every backend module implements the same small contract on contiguous 2-D / 3-D tensors
(validation, flattening and autograd live in fastlayers/functional.py, not here):

    NAME: str
    DTYPES: frozenset[torch.dtype]            # dtypes its kernels accept
    unavailable_reason(device) -> str | None  # None when it can run on tensors of `device`

    linear_act_forward(x, w, b, act, slope, save) -> (y, saved)
        x: (M, K), w: (N, K) (any strides), b: (N,) or None -> y: (M, N) contiguous.
        save=False: nothing is needed for backward (saved is None; work may be in place).
        save=True:  saved = y for act.saves(slope) == "output", the pre-activation z (M, N) for
                    "input", None for "nothing". Never write into saved afterwards.
    linear_act_backward(dy, x, w, saved, act, slope, needs) -> (dx, dw, db)
        dy: (M, N) contiguous, needs = (need_dx, need_dw, need_db); a gradient not needed is None.
    Optional (absent: False): plain_linear_gain(m, k, n, dtype, packed) -> bool
        Whether linear_act with activation "none" beats F.linear for an (M, K) x (N, K)^T GEMM
        of `dtype` (packed: on a prepacked weight, FusedLinear's no-grad path);
        FusedLinear(activation="none") calls F.linear where it does not.
    Optional, inference only (FusedLinear's no-grad fast path; a backend without them is simply
    called through linear_act_forward):
    prepack_weight(w, batch_hint) -> packed or None
        An opaque copy of w (N, K) laid out for this backend's GEMM, or None where it has none.
    linear_act_forward_packed(x, w, b, act, slope, packed) -> y
        == linear_act_forward(x, w, b, act, slope, save=False)[0]; b (N,) any strides.
        packed(backend, w, M) -> the caller's cached prepack_weight(w, M), or None (then the
        plain w); the backend calls it only when the GEMM it chose reads a packed weight.
    softmax_forward(x, log) -> y
        x: (outer, L, inner) contiguous, softmax over dim 1; y contiguous, same dtype.
    softmax_backward(dy, y, log) -> dx
        dy, y: (outer, L, inner) contiguous; y is the forward's output.
    gated_forward(x, wg, wu, bg, bu, act, slope, save) -> (h, saved)
        h = act(x @ wg.T + bg) * (x @ wu.T + bu); x: (M, K), wg / wu: (N, K) (any strides),
        bg / bu: (N,) contiguous or None -> h: (M, N) contiguous. saved = (g, u), the biased
        pre-activations (M, N), when save; None otherwise (work may be in place).
    gated_backward(dh, x, wg, wu, saved, act, slope, needs) -> (dx, dwg, dwu, dbg, dbu)
        dh: (M, N) contiguous, saved = (g, u); needs = (dx, dwg, dwu, dbg, dbu); a gradient not
        needed is None.

    cross_entropy_forward(x, target, weight, ignore_index, eps) -> (loss, stats)
        x: (N, C) contiguous; target: (N,) int64 class indices, each in [0, C) or == ignore_index
        (checked before), or (N, C) contiguous class probabilities in x's dtype; weight: (C,)
        contiguous in the compute dtype (float64 for float64 x, else float32) or None; eps: label
        smoothing >= 0. loss: (N,) per-row losses in the compute dtype (0 for ignored rows);
        stats: (N, 3) compute dtype = (row max M, log sum exp(x - M), sum of the row's
        coefficients A) -- the math is in fastlayers/loss.py.
    cross_entropy_backward(x, target, weight, stats, scale, ignore_index, eps, out, col0=0, classes=None) -> out
        out (N, C) contiguous in x's dtype (may be x itself; None: a new tensor) = scale_i * dloss_i/dx;
        scale: (N,) compute dtype. With col0 / classes (class-index targets only): x is the columns
        [col0, col0 + C) of rows with `classes` classes, stats (and weight (classes,)) those of the
        whole rows; a target outside the block contributes only its smoothing share.
    linear_ce_chunk_grads(dz, h, w, dh, dw, db, accumulate) -> None
        dz: (m, V') contiguous dlogits of a block of tokens (h: (m, H)) and vocabulary entries
        (w: (V', H)). dh (m, H), dw (V', H), db (V',) = dz @ w, dz^T @ h, colsum(dz), or += when
        accumulate. Each is in dz's dtype or the compute dtype (an accumulator for 16-bit dz; db is
        summed in the compute dtype), and may be a row block of a contiguous tensor; any may be None.

Choice: a forced backend (``use_backend`` / FASTLAYERS_BACKEND) wins, else by device type:
cpu -> cpp, cuda -> triton, meta -> reference (shapes only).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from types import ModuleType
from typing import Dict, Iterator, List, Optional

import torch

from .._errors import BackendUnavailableError

_MODULES = {
    "reference": "fastlayers.backends.reference",
    "cpp": "fastlayers.backends.cpp",
    "triton": "fastlayers.backends.triton",
}
# meta tensors carry no data: the reference ops give shapes and dtypes (model init on "meta").
_DEFAULT_FOR_DEVICE = {"cpu": "cpp", "cuda": "triton", "meta": "reference"}

_loaded: Dict[str, ModuleType] = {}
_import_errors: Dict[str, str] = {}


class _Forced(threading.local):
    """The backend use_backend forces in this thread. The class default makes an unset name a
    plain attribute read (~30 ns); getattr(local, "name", None) raises and catches an
    AttributeError inside (~0.4 us per call, measured)."""
    name: Optional[str] = None


_forced = _Forced()


def load(name: str) -> ModuleType:
    """Import a backend module, or raise a BackendUnavailableError that says why it can't."""
    mod = _loaded.get(name)
    if mod is not None:
        return mod
    if name not in _MODULES:
        raise ValueError(f"fastlayers: unknown backend {name!r}; expected one of {', '.join(_MODULES)}")
    if name in _import_errors:
        raise BackendUnavailableError(_import_errors[name])
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as e:
        _import_errors[name] = f"fastlayers: backend {name!r} is not available: {e}"
        raise BackendUnavailableError(_import_errors[name]) from e
    _loaded[name] = mod
    return mod


def available_backends() -> List[str]:
    """Backends that can run on at least one device of this machine."""
    out = []
    for name in _MODULES:
        try:
            mod = load(name)
        except BackendUnavailableError:
            continue
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if any(mod.unavailable_reason(torch.device(d)) is None for d in devices):
            out.append(name)
    return out


def _env_reader():
    """A cheap, exact reader of FASTLAYERS_BACKEND, read on every call (tests and launchers set it
    after import). os.environ.get costs a raised and caught KeyError when the variable is unset
    (~0.5 us, an eighth of a whole 1 x 64 -> 64 eager linear); CPython's os.environ keeps its
    entries in the dict ``_data`` under encoded keys, which it updates on every change, so one
    dict lookup there gives the same answer. Other Pythons: os.environ.get."""
    data = getattr(os.environ, "_data", None)
    try:
        key = os.environ.encodekey("FASTLAYERS_BACKEND")
        decode = os.environ.decodevalue
    except AttributeError:
        data = None
    if not isinstance(data, dict):
        return lambda: os.environ.get("FASTLAYERS_BACKEND")

    def read() -> Optional[str]:
        value = data.get(key)
        return None if value is None else decode(value)
    return read


_read_env = _env_reader()


def forced() -> Optional[str]:
    return _forced.name or _read_env() or None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every fastlayers op in this thread to run on backend `name` inside the block."""
    if name not in _MODULES:
        raise ValueError(f"fastlayers.use_backend: unknown backend {name!r}; expected one of {', '.join(_MODULES)}")
    prev = _forced.name
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = prev


_selected: Dict[tuple, ModuleType] = {}  # (device type, forced name) -> a backend that can run there


def select(device: torch.device, op: str) -> ModuleType:
    """The backend for tensors on `device`; raises a clear error when it cannot run there."""
    name = forced()
    mod = _selected.get((device.type, name))
    if mod is not None:  # the per-call fast path: one dict lookup
        return mod
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"{op}: got a tensor on {device}, but CUDA is not available "
                                      f"(torch {torch.__version__} sees no GPU)")
    chosen = name
    if chosen is None:
        chosen = _DEFAULT_FOR_DEVICE.get(device.type)
        if chosen is None:
            raise BackendUnavailableError(
                f"{op}: no fastlayers backend runs on device {device.type!r} "
                f"(cpu -> cpp, cuda -> triton; or force one with fastlayers.use_backend)")
    mod = load(chosen)
    why = mod.unavailable_reason(device)
    if why is not None:
        raise BackendUnavailableError(f"{op}: backend {chosen!r} cannot run on {device}: {why}")
    _selected[(device.type, name)] = mod
    return mod
