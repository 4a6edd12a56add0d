"""PyTorch's scaled_dot_product_attention, called in a module's own forward, pointed at
fastlayers.scaled_dot_product_attention (fastlayers/ops/attention.py).

That function has PyTorch's signature and is PyTorch's function wherever the fused kernels do not
take a call (masks, dropout, grouped-query heads, head dims above MAX_HEAD_DIM, other devices), so
the change is safe wherever the call is: outputs equal PyTorch's up to floating-point rounding. The
forward is read from its source (torch.fx cannot trace nanoGPT's attention: it branches on
``self.flash`` and ``self.training``); each call whose callee resolves, through the forward's own
globals, to torch.nn.functional.scaled_dot_product_attention (``F.``, ``torch.nn.functional.``,
a from-import) is redirected. The new forward is compiled against the module's live globals
(nothing global is patched) and given to the module as a subclass of its class, one per class,
as swap's other rewritten forwards are (swap/rewrite.py: name, isinstance, pickling kept).

Left alone, with the reason in the report: forwards with closure variables (a recompiled copy
would lose them; ``super()`` is one), without source, set on the instance, or already rewritten by
swap (their code is fx's: it calls torch._C's function directly).
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import types
from typing import Dict, Optional, Tuple

import torch.nn.functional as F
from torch import nn

from ..ops import attention as _attention
from .report import SwapReport
from .rewrite import make_subclass

_NAME = "_fastlayers_sdpa"
_PLANS: Dict[type, Tuple[Optional[type], str]] = {}  # class -> (its subclass or None, why not)


def _resolves_to_sdpa(node: ast.expr, glb: dict) -> bool:
    """Whether the callee expression names PyTorch's scaled_dot_product_attention through `glb`:
    a global name, or attributes of modules down from one (``torch.nn.functional.x``, ``F.x``)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in glb:
        return False
    obj = glb[node.id]
    for name in reversed(parts):
        if not isinstance(obj, types.ModuleType):
            return False
        obj = getattr(obj, name, None)
    return obj is F.scaled_dot_product_attention


class _Redirect(ast.NodeTransformer):
    def __init__(self, glb: dict) -> None:
        self.glb, self.count = glb, 0

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if _resolves_to_sdpa(node.func, self.glb):
            self.count += 1
            node.func = ast.copy_location(ast.Name(id=_NAME, ctx=ast.Load()), node.func)
        return node


def _rebuild(base: type) -> nn.Module:
    obj = base.__new__(base)
    obj.__class__ = plan(base)[0]
    return obj


def _reduce_ex(self, protocol):
    return (_rebuild, (type(self).fastlayers_original_class,), self.__getstate__())


def plan(base: type) -> Tuple[Optional[type], str]:
    """(the subclass of base whose forward calls fastlayers' function, '') or (None, why not; '' when
    the forward calls no scaled_dot_product_attention at all). Cached per class."""
    if base in _PLANS:
        return _PLANS[base]
    _PLANS[base] = result = _plan(base)
    return result


def _plan(base: type) -> Tuple[Optional[type], str]:
    fn = inspect.unwrap(base.forward) if isinstance(getattr(base, "forward", None), types.FunctionType) else None
    if fn is None or "scaled_dot_product_attention" not in fn.__code__.co_names:
        return None, ""
    if fn.__code__.co_freevars:
        return None, "its forward reads closure variables (a recompiled copy would lose them)"
    try:
        src = textwrap.dedent(inspect.getsource(fn))
        first = inspect.getsourcelines(fn)[1]
    except (OSError, TypeError):
        return None, "its forward's source is not available"
    tree = ast.parse(src)
    fdef = tree.body[0] if tree.body else None
    if not isinstance(fdef, ast.FunctionDef):
        return None, "its forward's source is not a function definition"
    redirect = _Redirect(fn.__globals__)
    fdef = redirect.visit(fdef)
    if not redirect.count:
        return None, ""
    fdef.decorator_list = []
    # def _make(_fastlayers_sdpa): <forward>; return <forward>  -- the function closes over the
    # redirect, its globals stay the module's own (read live)
    maker = ast.FunctionDef(name="_fastlayers_make", args=ast.arguments(
        posonlyargs=[], args=[ast.arg(arg=_NAME)], kwonlyargs=[], kw_defaults=[], defaults=[]),
        body=[fdef, ast.Return(value=ast.Name(id=fdef.name, ctx=ast.Load()))], decorator_list=[], returns=None,
        **({"type_params": []} if "type_params" in ast.FunctionDef._fields else {}))
    for node in (maker, maker.body[1], maker.body[1].value):
        ast.copy_location(node, fdef)
    module = ast.Module(body=[maker], type_ignores=[])
    ast.increment_lineno(module, first - 1)  # tracebacks point at the original lines
    ast.fix_missing_locations(module)
    ns: dict = {}
    exec(compile(module, inspect.getsourcefile(fn) or "<fastlayers.swap sdpa>", "exec"), fn.__globals__, ns)
    forward = ns["_fastlayers_make"](_attention.scaled_dot_product_attention)
    forward.__qualname__ = fn.__qualname__
    forward.__defaults__, forward.__kwdefaults__ = fn.__defaults__, fn.__kwdefaults__
    forward.__doc__ = fn.__doc__
    return make_subclass(base, forward, _reduce_ex, fastlayers_sdpa_calls=redirect.count), ""


def swap_sdpa(model: nn.Module, report: SwapReport) -> None:
    """Point each module's own calls of PyTorch's scaled_dot_product_attention at fastlayers'."""
    for path, mod in model.named_modules():
        name = path or "<model>"
        base = type(mod)
        if getattr(base, "fastlayers_original_class", None) is not None:
            continue  # rewritten by swap already (fx code, or a class made here)
        if "forward" in mod.__dict__:
            if plan(base)[0] is not None:
                report.left.append((name, "scaled_dot_product_attention: its forward is set on the instance"))
            continue
        cls, why = plan(base)
        if cls is None:
            if why:
                report.left.append((name, f"scaled_dot_product_attention: {why}"))
            continue
        mod.__class__ = cls
        report.attention.append((name, f"{base.__name__}.forward: {cls.fastlayers_sdpa_calls} call(s)"))


__all__ = ["swap_sdpa", "plan"]
