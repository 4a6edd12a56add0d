"""The one dispatch point: a registry ``name -> backend module``.

Every backend module implements one small contract: the Protocol ``Backend`` in
fastlayers/backends/contract.py (optional members: ``PackedGemm``), which
tests/backends/test_backend_contract.py checks every backend against.

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
    "cpp": "fastlayers.backends.cpu",
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
