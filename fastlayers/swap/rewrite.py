"""The rewritten forward (rewrite_forward) and the change check in front of it.

A module whose forward is rewritten becomes an instance of a generated subclass of its own class
whose `forward` is the rewritten graph's code: the module keeps its class's name, attributes,
other methods and isinstance checks; the code reads `self.<child>` on the live module (later
`.to()`, `load_state_dict` or submodule replacement act as with the original forward); its
source is registered with linecache, so TorchScript can compile it; and the instance pickles /
deep-copies as (original class, source, globals by name), rebuilt on load. One class per
(original class, source): identical layers share it. make_subclass is also the subclass maker of
the other rewritten forwards (swap/loss, swap/causal_lm.py).
"""
from __future__ import annotations

import importlib
import inspect
import linecache
import types
from typing import Any, Dict, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module_mod

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


# --- the change check. A rewritten forward reads Parameters of children it no longer calls (the
# gated product's gate / up projections, a fused loss's head) and skips activation modules it
# inlined. Each call first checks, cheaply, that those children are still the objects swap saw,
# of the same class (not replaced, wrapped by PEFT / quantization, or re-parametrised: parametrize
# changes the class), without forward / backward hooks or an instance-level forward (accelerate's
# offloading hooks set one), and that no global module hook is set;
# otherwise it runs the original forward, which calls the modules as it always did.
_GLOBAL_HOOKS = tuple(getattr(_module_mod, n) for n in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks") if isinstance(getattr(_module_mod, n, None), dict))
_GFH, _GFPH, _GBH, _GBPH = (_GLOBAL_HOOKS + ({},) * 4)[:4]
GUARD = "_fastlayers_guard"


def changed(self: nn.Module) -> bool:
    """True when a child the rewritten forward depends on changed since swap (see above)."""
    guard = self.__dict__.get(GUARD)
    if not guard:
        return False
    if _GFH or _GFPH or _GBH or _GBPH:
        return True
    for owner, name, child, cls in guard[1]:
        if owner.get(name) is not child or child.__class__ is not cls:
            return True
        d = child.__dict__
        if (d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d.get("_backward_pre_hooks")
                or "forward" in d):  # e.g. accelerate's hooks replace an instance's forward
            return True
    return False


def _original_forward(self: nn.Module, *args):
    """The forward swap replaced, for a module whose children changed since (see changed)."""
    guard = self.__dict__[GUARD]
    if not guard[0]:
        raise RuntimeError(
            f"fastlayers.swap: {type(self).__name__}'s rewritten forward reads children ({guard[2]}) that "
            "changed since swap (replaced, wrapped, re-parametrised or hooked, or a global module hook is "
            "set), and its original forward cannot run on the swapped children (a functional activation "
            "was fused into a Linear there). Make such changes before fastlayers.swap.")
    return type(self).fastlayers_original_class.forward(self, *args)


def _guarded_src(src: str, fn) -> str:
    """fx's source with the change check as the first statement (skipped under TorchScript)."""
    names = list(inspect.signature(fn).parameters)
    at = src.index("def forward(")
    eol = src.index("\n", at) + 1
    check = ("    if not torch.jit.is_scripting():\n"
             "        if _fastlayers_changed(self):\n"
             f"            return _fastlayers_original({', '.join(names)})\n")
    return src[:eol] + check + src[eol:]


def guard_children(mod: nn.Module, targets, fallback_ok: bool) -> None:
    """Record the children (fx targets, relative to mod) the rewritten forward depends on."""
    entries = []
    for target in sorted(targets):
        owner_path, _, name = target.rpartition(".")
        owner = mod.get_submodule(owner_path) if owner_path else mod
        child = owner._modules.get(name)
        if child is not None:
            entries.append((owner._modules, name, child, type(child)))
    # None: nothing to check (a forward that only inlined functional activations calls its children)
    mod.__dict__[GUARD] = (fallback_ok, tuple(entries), ", ".join(sorted(targets))) if entries else None


def swapped_class(base: type, src: str, globals_: Dict[str, Any]) -> type:
    """The subclass of `base` whose forward is compiled from `src` (fx's generated code) behind
    the change check."""
    key = (base, src)
    cls = _SWAPPED.get(key)
    if cls is None:
        filename = f"<fastlayers.swap: {base.__qualname__}.forward #{len(_SWAPPED)}>"
        ns = dict(globals_)
        exec(compile(src, filename, "exec"), ns)
        full = _guarded_src(src, ns["forward"])
        linecache.cache[filename] = (len(full), None, full.splitlines(keepends=True), filename)
        ns = dict(globals_, torch=torch, _fastlayers_changed=changed, _fastlayers_original=_original_forward)
        exec(compile(full, filename, "exec"), ns)
        ignored = list(getattr(base, "__jit_ignored_attributes__", [])) + [GUARD]
        cls = make_subclass(base, ns["forward"], _reduce_ex, fastlayers_forward_src=src,
                            fastlayers_forward_globals=dict(globals_), __jit_ignored_attributes__=ignored)
        _SWAPPED[key] = cls
    return cls


def make_subclass(base: type, forward, reduce_ex, **attrs: Any) -> type:
    """A subclass of `base` with this forward, passing for `base` (name, module, qualname), that
    pickles and deep-copies through `reduce_ex` (which rebuilds it from
    ``fastlayers_original_class``)."""
    return type(base.__name__, (base,), {
        "forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__,
        "__reduce_ex__": reduce_ex, "fastlayers_original_class": base, **attrs})


def rewrite_forward(mod: nn.Module, src: str, globals_: Dict[str, Any], guarded=(),
                    fallback_ok: bool = True) -> None:
    """Give `mod` the forward compiled from `src`, in place (see the comment above); `guarded`:
    the children (fx targets) whose change since swap sends calls to the original forward
    (fallback_ok) or raises (not fallback_ok: the original forward would not match the swapped
    children)."""
    base = getattr(type(mod), "fastlayers_original_class", type(mod))
    mod.__class__ = swapped_class(base, src, globals_)
    guard_children(mod, guarded, fallback_ok)
