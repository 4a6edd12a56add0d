"""The residual add in front of a norm, for fastlayers.swap (run after swap/norms.py has made the
norms fastlayers modules, whose ``forward(x, residual)`` returns ``(norm(x + residual), x + residual)``).

In a module's traced forward (tracing.trace_checked: the same fx trace, frozen-state checks and
rewritten forward as the gated MLPs and losses), a norm child -- fastlayers.LayerNorm, RMSNorm or
TorchRMSNorm, called with one argument -- whose input is an add of two traced values:

* ``self.LayerNorm(hidden_states + input_tensor)`` (BERT's BertSelfOutput / BertOutput: the sum is
  used only by the norm), and
* ``s = a + b; ...; self.ln_2(s)`` with s used again later (nanoGPT's Block ``x = x +
  self.attn(self.ln_1(x)); x = x + self.mlp(self.ln_2(x))``),

becomes one call ``add_norm(self.<norm>, a, b)`` -> (y, s): the norm module called with the residual,
one pass each way, saving the sum once (eager saves the sum for the norm's backward and the add
creates it; the fused op returns it and saves only it plus per-row statistics). Every other use of
the sum reads the returned s. ``a + b`` and ``b + a`` are the same IEEE value; where the operands
differ in shape (broadcasting), dtype (promotion) or device, or are not tensors, add_norm computes
``s = a + b`` and ``norm(s)`` exactly as written.

Not fused (the graph keeps the add and the norm call): a dropout or anything else between the add
and the norm (``norm(drop(a + b))`` has no add as the norm's input), an add with ``alpha`` or an
in-place add, a sum the forward later modifies in place, a forward that reads Python state (see
tracing.frozen_state), and forwards fx cannot trace or may not rewrite: optional arguments,
``*args`` / ``**kwargs`` (Hugging Face's decoder layers -- LlamaDecoderLayer, MistralDecoderLayer,
Qwen2DecoderLayer, GPT2Block -- take caches and ``**kwargs``, and GPT2Block branches on
``encoder_hidden_states is not None``): the report lists such a module with the reason.

Changed after swap: the rewritten forward checks at each call, as the gated rewrite does, that the
norm children it calls with a residual are the objects swap saw, of the same class, without hooks;
otherwise the original forward runs (the hook sees ``norm(a + b)``'s usual single input).
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..ops.norms import LayerNorm, RMSNorm, TorchRMSNorm
from .patterns import describe, direct_children as _direct_children, join, path_name
from .report import SwapReport
from .rewrite import GUARD, rewrite_forward
from .tracing import trace_checked

NORMS = (LayerNorm, RMSNorm, TorchRMSNorm)
_ADDS = (operator.add, torch.add)
_IN_PLACE = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem)


def add_norm(norm: nn.Module, a, b) -> Tuple[Tensor, Tensor]:
    """``(norm(a + b), a + b)``: the add fused into the norm (norm(a, b)) when a and b are tensors
    of one shape, dtype and device; else the add as written (broadcasting / type promotion), then
    the norm."""
    if (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and a.device == b.device):
        return norm(a, b)
    s = a + b
    return norm(s), s


def _add_operands(node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(a, b) when node is ``a + b`` of two traced values (operator.add, torch.add or Tensor.add
    without alpha / out)."""
    if not isinstance(node, fx.Node) or node.kwargs or len(node.args) != 2:
        return None
    if not ((node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target == "add")):
        return None
    a, b = node.args
    return (a, b) if isinstance(a, fx.Node) and isinstance(b, fx.Node) else None


def _in_place_user(add: fx.Node) -> Optional[fx.Node]:
    """A user of the sum that may modify it in place (a ``*_`` method, an augmented assignment)."""
    for u in add.users:
        if u.op == "call_method" and u.target.endswith("_") and u.args and u.args[0] is add:
            return u
        if u.op == "call_function" and u.target in _IN_PLACE and u.args and u.args[0] is add:
            return u
        if u.kwargs.get("out") is add:
            return u
    return None


def _find(graph: fx.Graph, norms: Dict[str, nn.Module]) -> Tuple[List[Tuple[fx.Node, fx.Node]], List[Tuple[str, str]]]:
    """(norm call, add) pairs to fuse, and (norm target, why not) for norms fed by an add left alone."""
    found, left, used = [], [], set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in norms:
            continue
        src = node.args[0] if node.args else node.kwargs.get("x", node.kwargs.get("input"))
        ops = _add_operands(src)
        if ops is None:
            if isinstance(src, fx.Node) and ((src.op == "call_function" and src.target in _ADDS + (operator.iadd,))
                                             or (src.op == "call_method" and src.target in ("add", "add_"))):
                left.append((node.target, f"its input is {describe(src)} in place, with alpha / out, or of a "
                                          "constant"))
            continue
        why = None
        if len(node.args) != 1 or node.kwargs:
            why = "it is not called with its input alone, positionally"
        elif src in used:
            why = "the same sum is already fused into another norm call"
        else:
            ip = _in_place_user(src)
            if ip is not None:
                why = f"the sum is modified in place later ({describe(ip)})"
        if why:
            left.append((node.target, why))
            continue
        used.add(src)
        found.append((node, src))
    return found, left


def _rewrite(graph: fx.Graph, norm: fx.Node, add: fx.Node) -> None:
    a, b = _add_operands(add)
    with graph.inserting_before(add):
        mod = graph.get_attr(norm.target)
        pair = graph.call_function(add_norm, (mod, a, b))
        s = graph.call_function(operator.getitem, (pair, 1))
        y = graph.call_function(operator.getitem, (pair, 0))
    norm.replace_all_uses_with(y)
    graph.erase_node(norm)
    add.replace_all_uses_with(s)
    graph.erase_node(add)


def swap_residual(model: nn.Module, report: SwapReport) -> None:
    """Fuse the residual adds in front of model's fastlayers norms (see the module docstring);
    report.residual gets (norm path, site), report.left (module path, why not)."""
    for prefix, mod in list(model.named_modules()):
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict) + NORMS):
            continue
        norms = {rel: c for rel, c in _direct_children(mod) if type(c) in NORMS}
        if not norms:
            continue
        graph, why, frozen = trace_checked(mod)
        if graph is None:  # listed under each norm's path (the module's own path may carry other reasons)
            for n in norms:
                report.left.append((join(prefix, n), f"a residual add in front is not looked for: "
                                                     f"{path_name(prefix)} ({type(mod).__name__}): {why}"))
            continue
        found, left = _find(graph, norms)
        for target, reason in left:
            report.left.append((join(prefix, target), f"residual add not fused: {reason}"))
        if not found:
            continue
        if frozen is not None:
            for node, _ in found:
                report.left.append((join(prefix, node.target), f"residual add not fused: {frozen}"))
            continue
        rewritten = hasattr(type(mod), "fastlayers_original_class")
        if rewritten and not hasattr(type(mod), "fastlayers_forward_src"):  # e.g. swap/loss/redirect.py's copy
            for node, _ in found:
                report.left.append((join(prefix, node.target), "residual add not fused: the forward is already a "
                                    "copy swap made (not a traced rewrite)"))
            continue
        # A forward swap already rewrote (a gated product, a loss) keeps what its change check guards.
        guard = mod.__dict__.get(GUARD)
        guarded = set(guard[2].split(", ")) if guard else set()
        fallback_ok = guard[0] if guard else not rewritten  # rewritten, no guard: functional acts inlined
        for node, add in found:
            site = f"{describe(add)} -> {node.target} in {type(mod).__name__}.forward"
            _rewrite(graph, node, add)
            guarded.add(node.target)
            report.residual.append((join(prefix, node.target), site))
        graph.lint()
        code = graph.python_code("self")
        rewrite_forward(mod, code.src, code.globals, guarded, fallback_ok=fallback_ok)
        if path_name(prefix) not in report.rewritten:
            report.rewritten.append(path_name(prefix))


__all__ = ["swap_residual", "add_norm", "NORMS"]
