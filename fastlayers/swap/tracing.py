"""torch.fx tracing of one module's own forward, the checks that make a rewritten forward safe,
and the rewritten forward itself (rewrite_forward)."""
from __future__ import annotations

import importlib
import inspect
import linecache
import types
from typing import Any, Dict, Optional, Set, Tuple

import torch.fx as fx
from torch import nn

# Instance attributes every nn.Module has (its registries and flags); reading them is not reading
# user state. `training` is covered by tracing in both modes.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"forward", "__dict__", "__class__"}


class _LeafTracer(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a single call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def trace(mod: nn.Module) -> Tuple[fx.Graph, Optional[Set[str]]]:
    """fx graph of `mod.forward` with its submodules as leaves, leaving `mod` untouched, and the
    names of the instance attributes (Python state: numbers, flags, lists, plain tensors...) the
    forward read while being traced -- values the graph has frozen as constants. The set is None
    when reads could not be recorded (a class whose instances cannot switch class)."""
    before = set(mod.__dict__)
    reads: Set[str] = set()
    cls = type(mod)

    def recording_getattribute(self, name):
        if self is mod and name not in _MODULE_INTERNALS and name in object.__getattribute__(self, "__dict__"):
            reads.add(name)
        return super(recording, self).__getattribute__(name)

    recording = type(cls.__name__, (cls,), {"__getattribute__": recording_getattribute,
                                            "__module__": cls.__module__})
    try:
        mod.__class__ = recording
    except TypeError:
        recording = None
    try:
        return _LeafTracer().trace(mod), (reads if recording is not None else None)
    finally:
        if recording is not None:
            mod.__class__ = cls
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
    state = sorted(reads - {"training"})
    if state:
        names = ", ".join(f"self.{n}" for n in state)
        return (f"{type(mod).__name__}.forward reads Python state ({names}); a forward rewritten "
                "from its trace would freeze it")
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


# ----------------------------------------------------------------------------- the rewritten forward
# A module whose forward is rewritten becomes an instance of a generated subclass of its own class
# whose `forward` is the rewritten graph's code: the module keeps its class's name, attributes,
# other methods and isinstance checks; the code reads `self.<child>` on the live module (later
# `.to()`, `load_state_dict` or submodule replacement act as with the original forward); its
# source is registered with linecache, so TorchScript can compile it; and the instance pickles /
# deep-copies as (original class, source, globals by name), rebuilt on load. One class per
# (original class, source): identical layers share it.
_SWAPPED: Dict[Tuple[type, str], type] = {}


def _globals_by_name(globals_: Dict[str, Any]) -> Dict[str, Tuple[str, Any]]:
    return {k: ("module", v.__name__) if isinstance(v, types.ModuleType) else ("value", v)
            for k, v in globals_.items()}


def _globals_from_names(spec: Dict[str, Tuple[str, Any]]) -> Dict[str, Any]:
    return {k: importlib.import_module(v) if kind == "module" else v for k, (kind, v) in spec.items()}


def _rebuild(base: type, src: str, spec: Dict[str, Tuple[str, Any]]) -> nn.Module:
    obj = base.__new__(base)
    obj.__class__ = swapped_class(base, src, _globals_from_names(spec))
    return obj


def _reduce_ex(self, protocol):
    cls = type(self)
    return (_rebuild, (cls.fastlayers_original_class, cls.fastlayers_forward_src,
                       _globals_by_name(cls.fastlayers_forward_globals)), self.__getstate__())


def swapped_class(base: type, src: str, globals_: Dict[str, Any]) -> type:
    """The subclass of `base` whose forward is compiled from `src` (fx's generated code)."""
    key = (base, src)
    cls = _SWAPPED.get(key)
    if cls is None:
        filename = f"<fastlayers.swap: {base.__qualname__}.forward #{len(_SWAPPED)}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(keepends=True), filename)
        ns = dict(globals_)
        exec(compile(src, filename, "exec"), ns)
        cls = make_subclass(base, ns["forward"], _reduce_ex, fastlayers_forward_src=src,
                            fastlayers_forward_globals=dict(globals_))
        _SWAPPED[key] = cls
    return cls


def make_subclass(base: type, forward, reduce_ex, **attrs: Any) -> type:
    """A subclass of `base` with this forward, passing for `base` (name, module, qualname), that
    pickles and deep-copies through `reduce_ex` (which rebuilds it from
    ``fastlayers_original_class``)."""
    return type(base.__name__, (base,), {
        "forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__,
        "__reduce_ex__": reduce_ex, "fastlayers_original_class": base, **attrs})


def rewrite_forward(mod: nn.Module, src: str, globals_: Dict[str, Any]) -> None:
    """Give `mod` the forward compiled from `src`, in place (see the comment above)."""
    base = getattr(type(mod), "fastlayers_original_class", type(mod))
    mod.__class__ = swapped_class(base, src, globals_)
