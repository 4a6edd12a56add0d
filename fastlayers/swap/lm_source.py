"""Reading a causal LM's forward source for skip_logits (swap/causal_lm.py): where the head's logits go.

* hf_plan: a Hugging Face forward assigning ``logits = self.<head>(...)`` and passing that name,
  untouched in between, with ``labels`` to ``self.loss_function(...)``.
* nanogpt_plan: a nanoGPT-style forward (``logits = self.<head>(x)`` then ``loss =
  F.cross_entropy(<views of logits>, targets...)``, the logits used nowhere else but in the returned
  tuple), rewritten to ``logits = None; loss = self.<head>(x, fastlayers_target=...)`` and compiled
  against the module's live globals.
Each answers why not where it does not match (the report quotes it).
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import types
from typing import Any, Dict, List, Optional, Tuple

import torch.nn.functional as F

from .loss import _codes

_CE_OPTIONS = ("ignore_index", "reduction", "label_smoothing")


def _source_tree(fn: types.FunctionType) -> Tuple[Optional[ast.FunctionDef], str]:
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None, "its forward's source is not available"
    tree = ast.parse(src)
    fdef = tree.body[0] if tree.body else None
    if not isinstance(fdef, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None, "its forward's source is not a function definition"
    return fdef, ""


def _is_self_attr_call(node: ast.AST, attrs: Tuple[str, ...] = ()) -> Optional[str]:
    """'name' when node is ``self.name(...)`` (name in attrs when given)."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"
            and (not attrs or node.func.attr in attrs)):
        return node.func.attr
    return None


def _names(node: ast.AST, name: str, ctx=ast.Load) -> List[ast.Name]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ctx)]


def _head_assignment(stmt: ast.stmt, heads: Tuple[str, ...]) -> Optional[Tuple[str, str, ast.expr]]:
    """(logits name, head attribute, head input) for ``<name> = self.<head>(<input>)``."""
    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        head = _is_self_attr_call(stmt.value, heads)
        if head and len(stmt.value.args) == 1 and not stmt.value.keywords:
            return stmt.targets[0].id, head, stmt.value.args[0]
    return None


def _blocks(fdef: ast.AST):
    """Every statement list in the function (bodies of if / for / with / try ...)."""
    for node in ast.walk(fdef):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                yield block


def _stmt_line(stmt: ast.stmt) -> str:
    return ast.unparse(stmt).splitlines()[0]


# ----------------------------------------------------------------------------- Hugging Face
def hf_plan(base: type, heads: Tuple[str, ...]) -> Tuple[Optional[str], str]:
    """(head attribute, '') when base.forward computes ``loss_function(<head's logits>, labels, ...)``
    with nothing done to the logits in between; (None, why not) otherwise."""
    forward = getattr(base, "forward", None)
    fn = inspect.unwrap(forward) if forward is not None else None
    if not isinstance(fn, types.FunctionType):
        return None, "its forward is not a Python function"
    if "labels" not in inspect.signature(forward).parameters:
        return None, "its forward takes no labels"
    fdef, why = _source_tree(fn)
    if fdef is None:
        return None, why
    for block in _blocks(fdef):
        for i, stmt in enumerate(block):
            found = _head_assignment(stmt, heads)
            if found is None:
                continue
            name, head, _ = found
            # the statements after it in its block, up to the one calling loss_function
            for later in block[i + 1:]:
                calls = [n for n in ast.walk(later) if _is_self_attr_call(n, ("loss_function",))]
                if calls:
                    call = calls[0]
                    logits_arg = call.args[0] if call.args else next(
                        (k.value for k in call.keywords if k.arg == "logits"), None)
                    labels_arg = call.args[1] if len(call.args) > 1 else next(
                        (k.value for k in call.keywords if k.arg == "labels"), None)
                    if not (isinstance(logits_arg, ast.Name) and logits_arg.id == name):
                        return None, f"its loss_function is not given the head's logits ({_stmt_line(later)})"
                    if not (isinstance(labels_arg, ast.Name) and labels_arg.id == "labels"):
                        return None, f"its loss_function is not given the labels ({_stmt_line(later)})"
                    return head, ""
                if _names(later, name) or _names(later, name, ast.Store):
                    return None, (f"its forward transforms the logits between {head} and the loss "
                                  f"(`{_stmt_line(later)}`), which fastlayers' loss does not")
            return None, f"{head}'s logits do not reach self.loss_function in the same block"
    return None, "no `logits = self.<head>(hidden_states)` in its forward"


# ----------------------------------------------------------------------------- nanoGPT style
_VIEWS = ("view", "reshape")


def _logits_view_ok(arg: ast.expr, name: str) -> bool:
    """``name`` itself, or ``name.view(-1, name.size(-1))`` / ``.reshape(-1, name.shape[-1])``."""
    if isinstance(arg, ast.Name):
        return arg.id == name
    if not (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr in _VIEWS
            and isinstance(arg.func.value, ast.Name) and arg.func.value.id == name and len(arg.args) == 2
            and not arg.keywords):
        return False
    first, second = (ast.unparse(a).replace(" ", "") for a in arg.args)
    return first == "-1" and second in (f"{name}.size(-1)", f"{name}.shape[-1]")


def _ce_call(value: ast.expr, glb: Dict[str, Any]) -> bool:
    """``F.cross_entropy(...)`` (F: torch.nn.functional) or a global ``cross_entropy`` that is torch's."""
    from .loss import is_torch_cross_entropy
    if not isinstance(value, ast.Call):
        return False
    f = value.func
    if isinstance(f, ast.Attribute) and f.attr == "cross_entropy" and isinstance(f.value, ast.Name):
        return glb.get(f.value.id) is F and is_torch_cross_entropy(F.cross_entropy)
    return isinstance(f, ast.Name) and is_torch_cross_entropy(glb.get(f.id))


def nanogpt_plan(base: type, heads: Tuple[str, ...]) -> Tuple[Optional[types.FunctionType], str, str]:
    """(rewritten forward, head, '') or (None, '', why not): see the module docstring."""
    fn = getattr(base, "forward", None)
    if not isinstance(fn, types.FunctionType) or not any("cross_entropy" in c.co_names for c in _codes(fn.__code__)):
        return None, "", ""
    if fn.__code__.co_freevars:
        return None, "", "its forward reads closure variables (a recompiled copy would lose them)"
    fdef, why = _source_tree(fn)
    if fdef is None or fdef.decorator_list:
        return None, "", why or "its forward is decorated"
    glb = fn.__globals__
    for block in _blocks(fdef):
        for i in range(len(block) - 1):
            found = _head_assignment(block[i], heads)
            nxt = block[i + 1]
            if found is None or not (isinstance(nxt, ast.Assign) and _ce_call(nxt.value, glb)):
                continue
            name, head, h = found
            call = nxt.value
            if len(call.args) < 2 or any(k.arg not in _CE_OPTIONS for k in call.keywords) or len(call.args) > 2:
                return None, "", f"its loss call has options fastlayers' fused loss does not take ({_stmt_line(nxt)})"
            if not _logits_view_ok(call.args[0], name) or _names(call.args[1], name):
                return None, "", f"its loss is not computed from (tokens, vocab) views of the logits ({_stmt_line(nxt)})"
            # every other read of the logits: a bare element of a returned tuple
            returned = {id(e) for n in ast.walk(fdef) if isinstance(n, ast.Return) and isinstance(n.value, ast.Tuple)
                        for e in n.value.elts}
            others = [n for n in _names(fdef, name) if id(n) not in returned
                      and not any(n is m for m in _names(call, name))]
            if others:
                return None, "", f"its logits are used beyond the loss and the returned tuple (line {others[0].lineno})"
            new_call = ast.Call(func=ast.Attribute(value=ast.Name("self", ast.Load()), attr=head, ctx=ast.Load()),
                                args=[h], keywords=[ast.keyword("fastlayers_target", call.args[1])] + call.keywords)
            block[i] = ast.copy_location(ast.Assign(targets=[ast.Name(name, ast.Store())],
                                                    value=ast.Constant(None)), block[i])
            nxt.value = ast.copy_location(new_call, call)
            fdef.name = fn.__name__
            module = ast.fix_missing_locations(ast.Module(body=[fdef], type_ignores=[]))
            ast.increment_lineno(module, fn.__code__.co_firstlineno - 1)
            code = compile(module, inspect.getsourcefile(fn) or "<fastlayers skip_logits>", "exec")
            ns: Dict[str, Any] = {}
            exec(code, glb, ns)  # globals: the module's own dict, read live
            new = ns[fn.__name__]
            new.__defaults__, new.__kwdefaults__ = fn.__defaults__, fn.__kwdefaults__
            new.__qualname__, new.__doc__ = fn.__qualname__, fn.__doc__
            return new, head, ""
    return None, "", ""


__all__ = ["hf_plan", "nanogpt_plan"]
