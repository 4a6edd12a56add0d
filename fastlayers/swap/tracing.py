"""torch.fx tracing of one module's own forward, and the checks that make a forward rewritten from
its trace safe (the rewritten forward itself: swap/rewrite.py)."""
from __future__ import annotations

import inspect
import os
import sys
import threading
import types
from typing import Any, Optional, Set, Tuple

import torch
import torch.fx as fx
from torch import nn

# Instance attributes every nn.Module has (its registries and flags), and nn.Module's own class
# attributes; reading them is not reading user state. `training` is covered by tracing in both modes.
_MODULE_INTERNALS = (frozenset(nn.Module().__dict__) | frozenset(vars(nn.Module))
                     | {"forward", "__dict__", "__class__"})

# Queries of runtime state a forward may branch on; a trace evaluates them once, as constants.
_STATE_QUERIES = [
    (torch, "is_grad_enabled"), (torch, "is_inference_mode_enabled"), (torch, "is_autocast_enabled"),
    (torch, "is_autocast_cpu_enabled"), (torch, "is_autocast_cache_enabled"), (torch, "get_autocast_dtype"),
    (torch, "get_autocast_gpu_dtype"), (torch, "get_autocast_cpu_dtype"), (torch, "get_default_dtype"),
    (torch, "are_deterministic_algorithms_enabled"), (torch.jit, "is_scripting"), (torch.jit, "is_tracing"),
    (torch.compiler, "is_compiling"), (torch.compiler, "is_dynamo_compiling"),
    (torch._C, "is_grad_enabled"), (torch._C, "is_autocast_enabled"),
]
# Attributes of a Parameter that change at run time (requires_grad_(), .to(), .data = ...); read as
# Python values only where the forward holds the real Parameter (e.g. `for p in self.parameters()`):
# `self.fc.weight` itself is an fx Proxy while tracing.
_PARAM_STATE = ("requires_grad", "dtype", "device", "is_cuda", "grad", "is_leaf")
_TORCH_DIR = os.path.dirname(torch.__file__)
_INTERNAL_FILES = (os.path.join(_TORCH_DIR, "fx") + os.sep, os.path.join(_TORCH_DIR, "nn", "modules", "module.py"),
                   os.path.join(_TORCH_DIR, "_tensor.py"), os.path.join(_TORCH_DIR, "nn", "parameter.py"),
                   os.path.join(_TORCH_DIR, "overrides.py"), os.path.join(_TORCH_DIR, "_jit_internal.py"),
                   os.path.join(_TORCH_DIR, "utils", "_python_dispatch.py"), os.path.dirname(os.path.dirname(__file__)) + os.sep,  # fastlayers' own ops
                   "<fastlayers.swap")  # a forward swap already rewrote (its change check)
# One trace at a time patches torch's state queries (other threads calling them meanwhile get the
# same answers; only the recording is scoped to the trace).
_TRACE_LOCK = threading.RLock()


def _from_user_code(depth: int = 2) -> bool:
    """Whether the caller `depth` frames up is not torch.fx / nn.Module machinery / this package."""
    try:
        filename = sys._getframe(depth).f_code.co_filename
    except ValueError:
        return True
    return not filename.startswith(_INTERNAL_FILES)


def _class_value(cls: type, name: str) -> Tuple[bool, Any]:
    """(True, v) when `name` resolves on the class (below nn.Module) to a plain value, not code."""
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            return False, None
        if name in klass.__dict__:
            v = klass.__dict__[name]
            plain = not callable(v) and not hasattr(v, "__get__")
            return plain, v
    return False, None


class _LeafTracer(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a single call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


class _Recorder:
    """While tracing: what Python-level runtime state the forward read (see trace)."""

    def __init__(self, mod: nn.Module) -> None:
        self.mod = mod
        self.reads: Set[str] = set()
        self.ok = True
        self.swapped: list = []  # (module, its class)
        self.patched: list = []  # (owner, name, original)
        self.injected: list = []  # (globals dict, name)

    def _watch(self, m: nn.Module, label: str) -> None:
        cls = type(m)
        reads = self.reads

        def recording_getattribute(self_, name):
            if (name not in _MODULE_INTERNALS and not name.startswith("__") and _from_user_code()):
                d = object.__getattribute__(self_, "__dict__")
                if name in d:
                    reads.add(label + name)
                elif name not in d.get("_modules", ()) and name not in d.get("_parameters", ()) \
                        and name not in d.get("_buffers", ()):
                    plain, _ = _class_value(cls, name)
                    if plain:
                        reads.add(label + name + " (a class attribute)")
            return super(recording, self_).__getattribute__(name)

        recording = type(cls.__name__, (cls,), {"__getattribute__": recording_getattribute,
                                                "__module__": cls.__module__})
        try:
            m.__class__ = recording
        except TypeError:
            self.ok = False
            return
        self.swapped.append((m, cls))

    def __enter__(self) -> "_Recorder":
        _TRACE_LOCK.acquire()
        try:
            self._watch(self.mod, "self.")
            for rel, child in _children_called(self.mod):
                self._watch(child, f"self.{rel}.")
            reads = self.reads
            for owner, name in _STATE_QUERIES:
                fn = getattr(owner, name, None)
                if fn is None:
                    continue

                def query(*a, __fn=fn, __label=f"{getattr(owner, '__name__', 'torch')}.{name}()", **k):
                    if _from_user_code():
                        reads.add(__label)
                    return __fn(*a, **k)
                setattr(owner, name, query)
                self.patched.append((owner, name, fn))
            for name in _PARAM_STATE:
                base = getattr(torch.Tensor, name)

                def get(p, __base=base, __name=name):
                    if _from_user_code():
                        reads.add(f"a Parameter's .{__name}")
                    return __base.__get__(p)

                def put(p, v, __base=base):
                    __base.__set__(p, v)
                had = name in nn.Parameter.__dict__
                self.patched.append((nn.Parameter, name, nn.Parameter.__dict__[name] if had else _MISSING))
                setattr(nn.Parameter, name, property(get, put))
            g = getattr(type(self.mod).forward, "__globals__", None)
            if isinstance(g, dict) and "isinstance" not in g:
                def recording_isinstance(obj, classinfo):
                    if isinstance(obj, fx.Proxy):
                        reads.add("isinstance() of a traced value (an fx Proxy is no Tensor)")
                    return isinstance(obj, classinfo)
                g["isinstance"] = recording_isinstance
                self.injected.append((g, "isinstance"))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            for g, name in reversed(self.injected):
                g.pop(name, None)
            for owner, name, orig in reversed(self.patched):
                if orig is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, orig)
            for m, cls in reversed(self.swapped):
                m.__class__ = cls
        finally:
            _TRACE_LOCK.release()


_MISSING = object()


def _children_called(mod: nn.Module):
    """Direct children, through ModuleList / ModuleDict (as the forward reaches them)."""
    stack = [("", mod)]
    while stack:
        prefix, m = stack.pop()
        for name, child in m._modules.items():
            if child is None:
                continue
            rel = f"{prefix}{name}"
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                stack.append((rel + ".", child))
            yield rel, child


def trace(mod: nn.Module) -> Tuple[fx.Graph, Optional[Set[str]]]:
    """fx graph of `mod.forward` with its submodules as leaves, leaving `mod` untouched, and the
    runtime state the forward read while being traced -- values the graph has frozen as
    constants: its own and its children's instance attributes (numbers, flags, lists, plain
    tensors...) and plain class attributes, Parameters' requires_grad / dtype / device read as
    Python values, grad / inference / autocast / scripting / compiling queries, isinstance() of a
    traced value. The set is None when reads could not be recorded (a class whose instances cannot
    switch class)."""
    before = set(mod.__dict__)
    try:
        with _Recorder(mod) as rec:
            graph = _LeafTracer().trace(mod)
        return graph, (rec.reads if rec.ok else None)
    finally:
        for k in set(mod.__dict__) - before:  # the tracer may stash tensor constants on the root
            delattr(mod, k)


def _traceable_signature(mod: nn.Module) -> Optional[str]:
    """Why tracing `mod.forward` could bake one path into the graph, or None when it is safe."""
    try:
        params = inspect.signature(mod.forward).parameters.values()
    except (TypeError, ValueError) as e:
        return f"forward has no readable signature ({e})"
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return f"forward takes *args/**kwargs ({p.name}); a traced graph would fix one call form"
        if p.default is not p.empty:
            return (f"forward has optional argument {p.name!r}; a traced graph would fix one "
                    "path (e.g. `if mask is not None`)")
    return None


def _global_values(mod: nn.Module) -> Set[str]:
    """Module-level or closure variables of mod's forward holding plain values (numbers, flags,
    containers, tensors), which a trace freezes; modules, functions and classes are code."""
    try:
        cv = inspect.getclosurevars(type(mod).forward)
    except (TypeError, ValueError):
        return set()
    code_like = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type,
                 types.MethodType)
    found = {**cv.globals, **cv.nonlocals}
    return {k for k, v in found.items() if not isinstance(v, code_like) and not callable(v)}


def frozen_state(mod: nn.Module, reads: Optional[Set[str]]) -> Optional[str]:
    """Why a forward rewritten from its trace would behave differently later, or None."""
    if reads is None:
        return f"{type(mod).__name__}'s attribute reads cannot be recorded while tracing"
    state = sorted(reads - {"self.training"})
    if state:
        return (f"{type(mod).__name__}.forward reads Python state ({', '.join(state)}); a forward "
                "rewritten from its trace would freeze it")
    glob = sorted(_global_values(mod))
    if glob:
        return (f"{type(mod).__name__}.forward reads global or closure value(s) ({', '.join(glob)}); "
                "a forward rewritten from its trace would freeze them")
    return None


def trace_checked(mod: nn.Module) -> Tuple[Optional[fx.Graph], Optional[str], Optional[str]]:
    """(graph, None, frozen), or (None, why not, None). Traced in train and eval mode: they must
    agree. `frozen` says why the graph may not replace the forward (see frozen_state)."""
    why = _traceable_signature(mod)
    if why is not None:
        return None, why, None
    training = mod.training
    try:
        graph, reads = trace(mod)
        mod.training = not training  # only mod's own flag: its submodules are leaves
        other, _ = trace(mod)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError on Proxy bools, ...)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return None, f"torch.fx cannot trace {type(mod).__name__}.forward ({type(e).__name__}: {first})", None
    finally:
        mod.training = training
    if graph.python_code("self").src != other.python_code("self").src:
        return None, f"{type(mod).__name__}.forward depends on self.training", None
    return graph, None, frozen_state(mod, reads)
