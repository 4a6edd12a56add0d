"""The traced route: torch cross-entropy calls in an fx graph, and the head Linear whose logits only
they read (then fused into one head_cross_entropy call)."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..patterns import describe, hooks, hooks_text
from .calls import cross_entropy_as_torch, head_cross_entropy, is_torch_cross_entropy, logits_stand_in


_VIEW_METHODS = ("view", "reshape", "flatten", "contiguous")
_VIEW_FUNCTIONS = (torch.reshape, torch.flatten)
_SHAPE_READS = ("size", "dim")  # methods; and getattr(x, "shape" / "ndim")


def _is_view(node: fx.Node) -> bool:
    return bool(node.args) and ((node.op == "call_method" and node.target in _VIEW_METHODS)
                                or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS))


def _is_shape_read(node: fx.Node, src: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_READS and node.args[0] is src
    return (node.op == "call_function" and node.target is getattr and len(node.args) == 2
            and node.args[0] is src and node.args[1] in ("shape", "ndim"))


_MODULE_OPTIONS = ("weight", "ignore_index", "reduction", "label_smoothing")


class LossSite:
    """One call of torch's cross-entropy in a traced forward: its input and target nodes, and its
    options -- graph arguments of an F.cross_entropy call, or (module) the name of an
    nn.CrossEntropyLoss child whose attributes the rewritten call reads live."""

    def __init__(self, node: fx.Node, input: Any, target: Any, options: Dict[str, Any],
                 module: Optional[str] = None) -> None:
        self.node, self.input, self.target, self.options, self.module = node, input, target, options, module
        self.what = f"{module} (CrossEntropyLoss)" if module else describe(node)


def _bind_function(node: fx.Node) -> Optional[LossSite]:
    try:
        b = inspect.signature(F.cross_entropy).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    b.apply_defaults()
    a = dict(b.arguments)
    return LossSite(node, a.pop("input"), a.pop("target"), a)


def _bind_module(node: fx.Node) -> Optional[LossSite]:
    try:
        b = inspect.signature(nn.CrossEntropyLoss.forward).bind(None, *node.args, **node.kwargs)
    except TypeError:
        return None
    return LossSite(node, b.arguments["input"], b.arguments["target"], {}, module=node.target)


class GraphLosses:
    """The traced route for one module's graph (see the module docstring). linear_problem(target)
    says why a Linear child may not be fused (None if it may); calls counts call_module nodes."""

    def __init__(self, graph: fx.Graph, children: Dict[str, nn.Module],
                 linear_problem: Callable[[str], Optional[str]], calls: Dict[str, int]) -> None:
        self.graph, self.children, self.linear_problem, self.calls = graph, children, linear_problem, calls

    def sites(self) -> Tuple[List[LossSite], List[Tuple[str, str]]]:
        """The loss calls to replace, and (call, why) for those left alone."""
        sites, left = [], []
        for node in list(self.graph.nodes):
            if node.op == "call_function" and node.target is F.cross_entropy:
                if not is_torch_cross_entropy(node.target):
                    left.append((describe(node), "torch.nn.functional.cross_entropy is not PyTorch's own "
                                 f"(replaced by {node.target!r})"))
                    continue
                site = _bind_function(node)
            elif node.op == "call_module" and isinstance(self.children.get(node.target), nn.CrossEntropyLoss):
                m = self.children[node.target]
                why = (f"{node.target} is a subclass of nn.CrossEntropyLoss ({type(m).__name__})"
                       if type(m) is not nn.CrossEntropyLoss else
                       f"{node.target} {hooks_text(m)}" if hooks(m) else None)
                if why:
                    left.append((node.target, why))
                    continue
                site = _bind_module(node)
            else:
                continue
            if site is None:
                left.append((describe(node), "its arguments could not be read"))
            else:
                sites.append(site)
        return sites, left

    def head_of(self, site: LossSite) -> Tuple[Optional[fx.Node], str]:
        """(the head's call node, "") when the loss can read the head's Parameters instead of its
        logits; (None, why not) otherwise."""
        chain = []  # the views from the loss's input back to the head
        node = site.input
        while isinstance(node, fx.Node) and _is_view(node):
            chain.append(node)
            node = node.args[0]
        if not (isinstance(node, fx.Node) and node.op == "call_module"
                and isinstance(self.children.get(node.target), nn.Linear)):
            return None, "its input is not a Linear child's output (a head)"
        head = node.target
        why = self.linear_problem(head)
        if why is None and self.calls[head] > 1:
            why = f"called {self.calls[head]} times"
        if why is None and (len(node.args) != 1 or node.kwargs):
            why = "called with more than one argument"
        path = [node] + chain[::-1]
        for n, nxt in zip(path, path[1:] + [site.node]):
            if why is not None:
                break
            others = [u for u in n.users if u is not nxt and not _is_shape_read(u, n)]
            if others:
                why = "the logits are also used by " + ", ".join(
                    u.target if u.op == "call_module" else describe(u) for u in others)
            elif n is site.target or n in nxt.args[1:] or n in nxt.kwargs.values():
                why = "the logits are also passed as another argument"
        opts = site.options
        if why is None:
            weight = self.children[site.module].weight if site.module else opts["weight"]
            if weight is not None:
                why = "class weights (weight=) are given"
            elif opts.get("size_average") is not None or opts.get("reduce") is not None:
                why = "the deprecated size_average / reduce arguments are given"
        return (None, f"{head}: {why}") if why else (node, "")

    def rewrite(self, site: LossSite, head: Optional[fx.Node]) -> None:
        """Replace the loss call by cross_entropy_as_torch (head None), or the head's call and the
        loss by one head_cross_entropy reading the head's Parameters."""
        g = self.graph
        with g.inserting_before(site.node):
            opts = ({k: g.get_attr(f"{site.module}.{k}") for k in _MODULE_OPTIONS} if site.module
                    else dict(site.options))
            if head is None:
                new = g.call_function(cross_entropy_as_torch, (site.input, site.target), opts)
            else:
                with g.inserting_before(head):
                    w = g.get_attr(f"{head.target}.weight")
                    b = (g.get_attr(f"{head.target}.bias") if self.children[head.target].bias is not None
                         else None)
                    stand_in = g.call_function(logits_stand_in, (head.args[0], w))
                head.replace_all_uses_with(stand_in)
                g.erase_node(head)
                new = g.call_function(head_cross_entropy, (stand_in.args[0], w, b, site.input, site.target), {
                    "class_weight": opts["weight"], **{k: opts[k] for k in _MODULE_OPTIONS[1:]}})
        site.node.replace_all_uses_with(new)
        g.erase_node(site.node)
