"""The loss a model computes from its own head, for fastlayers.swap.

Three routes, tried in this order for each module:

* traced forward (fx, as for activations): every call of torch's cross-entropy --
  ``F.cross_entropy(...)`` or an ``nn.CrossEntropyLoss`` child -- becomes fastlayers' (with
  F.cross_entropy's signature: cross_entropy_as_torch). When its input is the output of a Linear
  child (the head), through view / reshape / flatten / contiguous only, and the logits are used
  nowhere else (shape reads such as ``logits.size(-1)`` aside), the head's call and the loss
  become one head_cross_entropy call: fastlayers.linear_cross_entropy reading the head's own
  Parameters, without materialising the logits.
* Hugging Face models whose ``loss_function`` is transformers' ForCausalLMLoss (``*ForCausalLM``
  called with ``labels``): the model's loss_function is set to causal_lm_loss, the same
  computation on fastlayers.cross_entropy (the logits are returned, so they exist anyway).
* a module with a Linear child whose forward fx cannot trace (nanoGPT's ``forward(idx,
  targets=None)`` branches on its optional argument) or whose trace froze Python state (a rewritten
  graph may not replace it): the module gets a copy of its forward function
  whose globals resolve ``F.cross_entropy`` (F: the torch.nn.functional module, any name) or a
  from-imported ``cross_entropy`` to cross_entropy_as_torch -- only where that name really is
  torch's function at swap time. The copy's globals hold the values the forward reads at swap
  time, so it is made only when they are all code (modules, functions, classes), as for traced
  rewrites; nothing global (torch, the user's module) is modified.
"""
from __future__ import annotations

import dis
import inspect
import sys
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..loss import cross_entropy, linear_cross_entropy
from .patterns import fusable_linear, join, linear_problem, path_name, describe, hooks
from .tracing import _global_values, make_subclass

FUSED, CROSS_ENTROPY = "linear_cross_entropy", "cross_entropy"


def is_torch_cross_entropy(obj: Any) -> bool:
    """PyTorch's own F.cross_entropy (not a replacement someone installed in its place)."""
    return (isinstance(obj, types.FunctionType) and obj.__module__ == "torch.nn.functional"
            and obj.__qualname__ == "cross_entropy")


def cross_entropy_as_torch(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                           size_average: Optional[bool] = None, ignore_index: int = -100,
                           reduce: Optional[bool] = None, reduction: str = "mean",
                           label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy`` with its own signature, computed by fastlayers.cross_entropy (the
    deprecated size_average / reduce arguments go to PyTorch's own)."""
    if size_average is not None or reduce is not None:
        return F.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                               label_smoothing)
    return cross_entropy(input, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         reduction=reduction, weight=weight)


# ----------------------------------------------------------------------------- traced forwards
def logits_stand_in(h: Tensor, weight: Tensor) -> Tensor:
    """A meta tensor of the head's logits' shape, for the shape reads and views the forward does
    on them (no data, no memory)."""
    return torch.empty((*h.shape[:-1], weight.shape[0]), dtype=h.dtype, device="meta")


def head_cross_entropy(h: Tensor, weight: Tensor, bias: Optional[Tensor], logits_view: Tensor,
                       target: Tensor, class_weight: Optional[Tensor] = None, ignore_index: int = -100,
                       reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """``cross_entropy(<views of> F.linear(h, weight, bias), target, class_weight, ...)``;
    logits_view is the stand-in after the forward's views. Views keep the row-major order, so a
    (N, vocab) view is h's leading dims flattened: one linear_cross_entropy. Anything else (class
    weights, class-probability targets, another shape) computes the logits and the loss as written."""
    vocab = weight.shape[0]
    if (class_weight is None and logits_view.dim() == 2 and logits_view.shape[1] == vocab
            and isinstance(target, Tensor) and not target.is_floating_point()
            and target.shape == logits_view.shape[:1]):
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), weight, target, bias, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, reduction=reduction)
    logits = F.linear(h, weight, bias).reshape(logits_view.shape)
    return cross_entropy_as_torch(logits, target, class_weight, ignore_index=ignore_index, reduction=reduction,
                                  label_smoothing=label_smoothing)


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
                       f"{node.target} has hooks registered" if hooks(m) else None)
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


# ----------------------------------------------------------------------------- Hugging Face
def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch: Optional[Tensor] = None,
                   ignore_index: int = -100, shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """transformers' ForCausalLMLoss (5.x) on fastlayers.cross_entropy: logits in float32, labels
    shifted left (pad with ignore_index), "sum" / num_items_in_batch when given, else "mean"."""
    logits = logits.float()
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, vocab_size)
    shift_labels = shift_labels.view(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


_HF_CAUSAL_LM_PARAMS = ("logits", "labels", "vocab_size", "num_items_in_batch", "ignore_index", "shift_labels",
                        "kwargs")


def hf_loss_of(lu: types.ModuleType, mod: nn.Module) -> Any:
    """The function transformers' loss_function property gives without a user's _loss_function: the
    loss_type's in LOSS_MAPPING, ForCausalLM's when loss_type is None or unknown (GPT-2)."""
    mapping = getattr(lu, "LOSS_MAPPING", {})
    loss_type = getattr(mod, "loss_type", None)
    if loss_type in mapping:
        return mapping[loss_type]
    try:  # a base model (LlamaModel) computes no loss: only a forward taking labels uses the default
        takes_labels = "labels" in inspect.signature(type(mod).forward).parameters
    except (TypeError, ValueError):
        takes_labels = False
    return mapping.get("ForCausalLM") if takes_labels else None


def hf_causal_lm(mod: nn.Module) -> Tuple[bool, str]:
    """(True, site) when mod's loss_function was transformers' ForCausalLMLoss and is now
    causal_lm_loss; (False, why) when it is an HF causal-LM loss left alone; (False, "") otherwise."""
    lu = sys.modules.get("transformers.loss.loss_utils")
    if lu is None or not isinstance(getattr(type(mod), "loss_function", None), property):
        return False, ""
    if mod.__dict__.get("_loss_function") is causal_lm_loss:
        return False, ""  # swapped before
    if hf_loss_of(lu, mod) is not getattr(lu, "ForCausalLMLoss", None):  # (loss_type None: GPT-2)
        return False, ""
    if "_loss_function" in mod.__dict__:
        return False, "its loss_function was set by the user"
    if tuple(inspect.signature(lu.ForCausalLMLoss).parameters) != _HF_CAUSAL_LM_PARAMS:
        return False, "transformers' ForCausalLMLoss has a signature fastlayers does not know"
    mod.loss_function = causal_lm_loss
    return True, "loss_function (transformers' ForCausalLMLoss)"


# ----------------------------------------------------------------------------- untraced forwards
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


__all__ = ["cross_entropy_as_torch", "head_cross_entropy", "logits_stand_in", "causal_lm_loss",
           "GraphLosses", "hf_causal_lm", "redirect", "redirected_class", "is_torch_cross_entropy",
           "FUSED", "CROSS_ENTROPY"]


# ----------------------------------------------------------------------------- the swapper's hooks
def in_graph(sw, mod: nn.Module, prefix: str, graph: fx.Graph, children: Dict[str, nn.Module],
             calls: Dict[str, int], frozen: Optional[str]) -> bool:
    """The traced route for `mod` (called by the swapper with mod's graph); True if the graph changed.
    A forward that may not be rewritten (`frozen`) is left to the untraced route."""

    def head_problem(target: str) -> Optional[str]:
        m = children[target]
        if not fusable_linear(m):
            return f"{type(m).__name__} is not a plain nn.Linear"
        return linear_problem(m, sw.refs)

    losses = GraphLosses(graph, children, head_problem, calls)
    sites, left = losses.sites()
    for what, why in left:
        sw.report.left.append((path_name(prefix), f"loss {what}: {why}"))
    if frozen is not None:
        if sites:  # the untraced route may still redirect F.cross_entropy; else this is why not
            sw.loss_frozen[id(mod)] = f"loss {', '.join(s.what for s in sites)}: {frozen}"
        return False
    sw.loss_decided.add(id(mod))
    for site in sites:
        head, why = losses.head_of(site)
        where = f"{site.what} in {type(mod).__name__}.forward"
        if head is not None:
            lin = children[head.target]
            sw.loss_heads.add(id(lin))
            sw.why_left.pop(id(lin), None)
            sw.report.losses.append((join(prefix, head.target), where, FUSED))
        else:
            sw.report.losses.append((path_name(prefix), f"{where}; not fused with the head: {why}", CROSS_ENTROPY))
        losses.rewrite(site, head)
    return bool(sites)


def untraced(sw, first: Optional[Callable[[Any, str, nn.Module], bool]] = None) -> None:
    """Hugging Face loss functions, and forwards the traced route did not decide (see the module
    docstring); run by the swapper after its walk. first(sw, prefix, module): tried first on each
    module the traced route left undecided (skip_logits: causal_lm.apply); True: it took it."""

    plans: Dict[Any, Tuple[Dict[str, Any], List[str], str]] = {}
    for prefix, mod in sw.model.named_modules():
        if first is not None and id(mod) not in sw.loss_decided and first(sw, prefix, mod):
            continue
        ok, what = hf_causal_lm(mod)
        if ok:
            sw.report.losses.append((path_name(prefix), what, CROSS_ENTROPY))
        elif what:
            sw.report.left.append((path_name(prefix), f"loss_function: {what}"))
        if id(mod) in sw.loss_decided or not any(isinstance(c, nn.Linear) for c in mod.children()):
            continue
        sites, why = redirect(mod, plans)
        where = f"{type(mod).__name__}.forward"
        if sites:
            sw.report.losses.append((path_name(prefix), f"{', '.join(sites)} in a copy of {where} (not traced: "
                                                     "the head's logits are materialised)", CROSS_ENTROPY))
        elif why or id(mod) in sw.loss_frozen:
            sw.report.left.append((path_name(prefix), f"loss in {where}: {why}" if why else sw.loss_frozen[id(mod)]))
