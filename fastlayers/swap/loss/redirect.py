"""The untraced route: a copy of a forward fx cannot trace, whose globals resolve torch's
cross_entropy to fastlayers'."""
from __future__ import annotations

import dis
import types
from typing import Any, Dict, List, Optional, Tuple

import torch.nn.functional as F
from torch import nn

from ..rewrite import make_subclass
from ..tracing import _global_values
from .calls import cross_entropy_as_torch, is_torch_cross_entropy


def _functional_with_fastlayers_ce() -> types.ModuleType:
    """A module object with torch.nn.functional's namespace whose cross_entropy is fastlayers'."""
    global _FUNCTIONAL
    if _FUNCTIONAL is None:
        m = types.ModuleType(F.__name__, F.__doc__)
        m.__dict__.update(vars(F))
        m.cross_entropy = cross_entropy_as_torch
        _FUNCTIONAL = m
    return _FUNCTIONAL


_FUNCTIONAL: Optional[types.ModuleType] = None


def _codes(code: types.CodeType):
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _codes(c)


def _global_chains(code: types.CodeType):
    """(global name, attribute names after it) for each global read in code and nested code."""
    for c in _codes(code):
        ins = list(dis.get_instructions(c))
        for i, x in enumerate(ins):
            if x.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                attrs = []
                for y in ins[i + 1:]:
                    if y.opname not in ("LOAD_ATTR", "LOAD_METHOD"):
                        break
                    attrs.append(y.argval)
                yield x.argval, attrs


def redirect_plan(forward: types.FunctionType) -> Tuple[Dict[str, Any], List[str], str]:
    """(global overrides, sites, "") for a forward calling torch's cross_entropy by a global name;
    ({}, [], why) when it does but cannot be redirected; ({}, [], "") when it does not."""
    g = forward.__globals__
    overrides, sites, why = {}, [], ""
    for name, attrs in _global_chains(forward.__code__):
        obj = g.get(name)
        if is_torch_cross_entropy(obj):
            overrides[name] = cross_entropy_as_torch
            sites.append(name)
        elif obj is F and attrs[:1] == ["cross_entropy"]:
            if not is_torch_cross_entropy(F.cross_entropy):
                why = f"torch.nn.functional.cross_entropy is not PyTorch's own (replaced by {F.cross_entropy!r})"
                break
            overrides[name] = _functional_with_fastlayers_ce()
            sites.append(f"{name}.cross_entropy")
        elif isinstance(obj, types.ModuleType) and obj is not F:
            for i, a in enumerate(attrs):  # torch.nn.functional.cross_entropy and the like
                obj = getattr(obj, a, None)
                if is_torch_cross_entropy(obj):
                    why = (f"it reaches cross_entropy as {'.'.join([name] + attrs[:i + 1])}; only "
                           "F.cross_entropy (F the torch.nn.functional module) or a global cross_entropy "
                           "are redirected")
                if not isinstance(obj, types.ModuleType):
                    break
    if why:
        return {}, [], why
    if not overrides:
        return {}, [], ""
    stores = {x.opname for c in _codes(forward.__code__) for x in dis.get_instructions(c)}
    if stores & {"STORE_GLOBAL", "DELETE_GLOBAL"}:
        return {}, [], "it assigns global variables"
    return overrides, sorted(set(sites)), ""


def _redirected_forward(forward: types.FunctionType, overrides: Dict[str, Any]) -> types.FunctionType:
    g = forward.__globals__
    names = {name for name, _ in _global_chains(forward.__code__) if name in g}
    new_globals = {"__builtins__": g.get("__builtins__", __builtins__), "__name__": g.get("__name__")}
    new_globals.update({n: g[n] for n in names})
    new_globals.update(overrides)
    f = types.FunctionType(forward.__code__, new_globals, forward.__name__, forward.__defaults__,
                           forward.__closure__)
    f.__kwdefaults__ = forward.__kwdefaults__
    f.__dict__.update(forward.__dict__)
    f.__qualname__, f.__doc__, f.__module__ = forward.__qualname__, forward.__doc__, forward.__module__
    f.__annotations__ = dict(getattr(forward, "__annotations__", {}))
    return f


_REDIRECTED: Dict[type, type] = {}


def _rebuild(base: type) -> nn.Module:
    obj = base.__new__(base)
    obj.__class__ = redirected_class(base)
    return obj


def _reduce_ex(self, protocol):
    return _rebuild, (type(self).fastlayers_original_class,), self.__getstate__()


def redirected_class(base: type) -> type:
    """The subclass of `base` whose forward is a copy of base.forward reading fastlayers' cross_entropy."""
    cls = _REDIRECTED.get(base)
    if cls is None:
        overrides, _, why = redirect_plan(base.forward)
        if not overrides:
            raise RuntimeError(f"fastlayers.swap: {base.__qualname__}.forward cannot be redirected "
                               f"({why or 'it calls no cross_entropy'})")
        cls = make_subclass(base, _redirected_forward(base.forward, overrides), _reduce_ex)
        _REDIRECTED[base] = cls
    return cls


def redirect(mod: nn.Module, plans: Dict[Any, Tuple[Dict[str, Any], List[str], str]]) -> Tuple[List[str], str]:
    """Give mod the redirected forward (see the module docstring): (sites, "") or ([], why not).
    plans: redirect_plan's answers by forward function, for this swap."""
    base = type(mod)
    forward = getattr(base, "forward", None)
    if not isinstance(forward, types.FunctionType) or hasattr(base, "fastlayers_original_class"):
        return [], ""
    if forward not in plans:
        plans[forward] = redirect_plan(forward)
    overrides, sites, why = plans[forward]
    if not overrides:
        return [], why
    glob = sorted(_global_values(mod))
    if glob:
        return [], (f"{base.__name__}.forward reads global or closure value(s) ({', '.join(glob)}); a copy of "
                    "the forward would freeze them")
    mod.__class__ = redirected_class(base)
    return sites, ""
