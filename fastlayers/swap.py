"""fastlayers.swap(model): fuse an existing model's Linear -> activation pairs in place.

What is fused, module by module (each module's own forward is read on its own):

* ``nn.Sequential`` (forward not overridden): a Linear child directly followed by an activation child.
* any other module whose forward torch.fx can trace with its submodules as leaves: a Linear child
  whose output goes *only* into an activation — a module child (``self.act(self.fc(x))``, the
  Hugging Face MLP-block pattern) or a functional call (``F.relu``, ``F.gelu(approximate=...)``,
  ``F.leaky_relu(x, slope)``, ``F.silu``, ``torch.sigmoid``, ``torch.tanh``, ``x.relu()``, ...).

Recognised activation modules: nn.ReLU, nn.LeakyReLU, nn.GELU (both approximations), nn.SiLU,
nn.Sigmoid, nn.Tanh, and any parameterless module of another library whose forward traces to
exactly one of the functional calls above (e.g. transformers' GELUActivation).

The Linear becomes a FusedLinear holding the *same* Parameter objects (state_dict keys unchanged,
optimizers keep working); an activation module becomes nn.Identity. A functional activation can
only be removed by editing the forward: the module keeps its class, attributes and state, and gets
an instance-level ``forward`` generated from its rewritten fx graph (it reads the module's live
attributes, and survives deepcopy and pickling). nn.Softmax / nn.LogSoftmax become
fastlayers.Softmax / LogSoftmax with the same dim.

Left alone, with the reason in the report: a Linear whose output is used anywhere else (or
returned), a Linear or activation that has hooks, is shared between modules, is called more than
once, or is a subclass (its forward may differ); modules fx cannot trace; forwards whose traced
graph would specialise to one path (optional arguments, ``*args``, a branch on ``self.training``).
"""
from __future__ import annotations

import inspect
import logging
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import _get_qualified_name

from .nn import FusedLinear, LogSoftmax, Softmax

__all__ = ["swap", "SwapReport"]

log = logging.getLogger(__name__)

_DEFAULT_SLOPE = 0.01


# ----------------------------------------------------------------------------- report
@dataclass
class SwapReport:
    """What :func:`swap` did; also attached to the model as ``model.fastlayers_swap_report``."""
    fused: List[Tuple[str, str, str]] = field(default_factory=list)  # (linear, activation site, name)
    replaced: List[Tuple[str, str]] = field(default_factory=list)     # (module path, new class)
    left: List[Tuple[str, str]] = field(default_factory=list)         # (module path, reason)
    rewritten: List[str] = field(default_factory=list)                # modules given a new forward

    def __str__(self) -> str:
        lines = [f"fastlayers.swap: fused {len(self.fused)} Linear+activation pair(s), "
                 f"replaced {len(self.replaced)} softmax module(s), left {len(self.left)} alone"]
        lines += [f"  fused     {lin} + {site} -> FusedLinear(activation={name})"
                  for lin, site, name in self.fused]
        lines += [f"  replaced  {path} -> {new}" for path, new in self.replaced]
        lines += [f"  rewrote   {path}.forward (functional activations removed)"
                  for path in self.rewritten]
        lines += [f"  left      {path}: {why}" for path, why in self.left]
        return "\n".join(lines)


def _name(path: str) -> str:
    return path or "<model>"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------- recognising activations
_MODULE_ACTS: Dict[type, Callable[[nn.Module], Tuple[str, float]]] = {
    nn.ReLU: lambda m: ("relu", _DEFAULT_SLOPE),
    nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope)),
    nn.GELU: lambda m: ({"none": "gelu", "tanh": "gelu_tanh"}[m.approximate], _DEFAULT_SLOPE),
    nn.SiLU: lambda m: ("silu", _DEFAULT_SLOPE),
    nn.Sigmoid: lambda m: ("sigmoid", _DEFAULT_SLOPE),
    nn.Tanh: lambda m: ("tanh", _DEFAULT_SLOPE),
}


# Signatures of the functional forms, to read fx-recorded (args, kwargs) however they were
# passed. Each returns (activation name or None, negative_slope).
def _sig_inplace(name: str):
    def f(input, inplace=False):
        return name, _DEFAULT_SLOPE
    return f


def _sig_unary(name: str):
    def f(input):
        return name, _DEFAULT_SLOPE
    return f


def _sig_leaky(input, negative_slope=_DEFAULT_SLOPE, inplace=False):
    ok = isinstance(negative_slope, (int, float)) and not isinstance(negative_slope, bool)
    return ("leaky_relu" if ok else None), negative_slope


def _sig_leaky_(input, negative_slope=_DEFAULT_SLOPE):
    return _sig_leaky(input, negative_slope)


def _sig_gelu(input, approximate="none"):
    return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate), _DEFAULT_SLOPE


_FUNCTION_ACTS: Dict[Any, Callable] = {
    F.relu: _sig_inplace("relu"), F.relu_: _sig_unary("relu"),
    torch.relu: _sig_unary("relu"), torch.relu_: _sig_unary("relu"),
    F.leaky_relu: _sig_leaky, F.leaky_relu_: _sig_leaky_,
    F.gelu: _sig_gelu,
    F.silu: _sig_inplace("silu"),
    torch.sigmoid: _sig_unary("sigmoid"), F.sigmoid: _sig_unary("sigmoid"),
    torch.tanh: _sig_unary("tanh"), F.tanh: _sig_unary("tanh"),
}
_METHOD_ACTS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                "tanh": "tanh", "tanh_": "tanh"}


def _call_activation(node: fx.Node, src: fx.Node) -> Optional[Tuple[str, float]]:
    """(name, slope) when `node` is a recognised functional activation of `src` and nothing else."""
    if node.op == "call_method":
        name = _METHOD_ACTS.get(node.target)
        return (name, _DEFAULT_SLOPE) if name and node.args == (src,) and not node.kwargs else None
    if node.op != "call_function":
        return None
    try:
        sig = _FUNCTION_ACTS.get(node.target)
    except TypeError:  # unhashable target
        return None
    if sig is None:
        return None
    try:
        bound = inspect.signature(sig).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    args = dict(bound.arguments)
    if args.pop("input") is not src:
        return None
    if any(isinstance(a, fx.Node) for a in args.values()):  # e.g. a slope computed at run time
        return None
    name, slope = sig(src, **args)
    return (name, float(slope)) if name else None


def _hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _describe(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        try:
            return _get_qualified_name(node.target)  # e.g. torch.tanh, torch.nn.functional.silu
        except Exception:
            return getattr(node.target, "__name__", str(node.target))
    if node.op == "output":
        return "the forward's return value"
    return f"{node.op} {node.target}"


# ----------------------------------------------------------------------------- fx tracing
class _LeafTracer(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a single call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _trace(mod: nn.Module) -> fx.Graph:
    """fx graph of `mod.forward` with its submodules as leaves, leaving `mod` untouched."""
    before = set(mod.__dict__)
    try:
        return _LeafTracer().trace(mod)
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


def _trace_checked(mod: nn.Module) -> Tuple[Optional[fx.Graph], Optional[str]]:
    """(graph, None), or (None, why not). Traced in train and eval mode: they must agree."""
    why = _traceable_signature(mod)
    if why is not None:
        return None, why
    training = mod.training
    try:
        graph = _trace(mod)
        mod.training = not training  # only mod's own flag: its submodules are leaves
        other = _trace(mod)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError on Proxy bools, ...)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return None, f"torch.fx cannot trace {type(mod).__name__}.forward ({type(e).__name__}: {first})"
    finally:
        mod.training = training
    if graph.python_code("self").src != other.python_code("self").src:
        return None, f"{type(mod).__name__}.forward depends on self.training"
    return graph, None


def _foreign_activation(m: nn.Module, cache: Dict[int, Optional[Tuple[str, float]]]):
    """(name, slope) for a parameterless module whose forward is one recognised functional call."""
    if id(m) in cache:
        return cache[id(m)]
    result = None
    if (not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())
            and not any(True for _ in m.children())):
        try:
            n_params = len(inspect.signature(m.forward).parameters)
            graph = _trace(m) if n_params == 1 else None
        except Exception:
            graph = None
        if graph is not None:
            nodes = list(graph.nodes)
            if (len(nodes) == 3 and nodes[0].op == "placeholder" and nodes[2].op == "output"
                    and nodes[2].args == (nodes[1],)):
                result = _call_activation(nodes[1], nodes[0])
    cache[id(m)] = result
    return result


def _module_activation(m: nn.Module, cache) -> Optional[Tuple[str, float]]:
    known = _MODULE_ACTS.get(type(m))  # exact type: a subclass may override forward, so trace it
    return known(m) if known is not None else _foreign_activation(m, cache)


# ----------------------------------------------------------------------------- the rewritten forward
class _GraphForward:
    """An instance-level ``forward`` compiled from a rewritten fx graph of the module's own forward.

    The generated code reads ``self.<child>`` on the live module, so later ``.to()``,
    ``load_state_dict`` or submodule replacement behave as with the original forward.
    Pickles as (source, globals by name) and recompiles when loaded.
    """

    def __init__(self, module: nn.Module, src: str, globals_: Dict[str, Any]) -> None:
        self.module, self.src, self.globals = module, src, globals_
        self._compile()

    def _compile(self) -> None:
        ns = dict(self.globals)
        exec(compile(self.src, f"<fastlayers.swap: {type(self.module).__name__}.forward>", "exec"), ns)
        self._fn = ns["forward"]

    def __call__(self, *args, **kwargs):
        return self._fn(self.module, *args, **kwargs)

    def __getstate__(self) -> Dict[str, Any]:
        globals_ = {k: ("module", v.__name__) if isinstance(v, types.ModuleType) else ("value", v)
                    for k, v in self.globals.items()}
        return {"module": self.module, "src": self.src, "globals": globals_}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        import importlib
        self.module, self.src = state["module"], state["src"]
        self.globals = {k: importlib.import_module(v) if kind == "module" else v
                        for k, (kind, v) in state["globals"].items()}
        self._compile()


# ----------------------------------------------------------------------------- swapping
def _fusable_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or (type(m) is FusedLinear and m.activation == "none")


def _linear_problem(m: nn.Module, refs: Counter) -> Optional[str]:
    if _hooks(m):
        return "has hooks registered (fusing would change what they see)"
    if refs[id(m)] > 1:
        return "the same Linear is shared by several modules"
    return None


def _fused_linear(lin: nn.Linear, act: str, slope: float) -> FusedLinear:
    """A FusedLinear around the very same Parameter objects (no copy, same state_dict keys)."""
    new = FusedLinear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                      activation=act, negative_slope=slope, device="meta")
    new.weight = lin.weight
    if lin.bias is not None:
        new.bias = lin.bias
    for k, v in lin.__dict__.items():  # keep user attributes (e.g. library init flags)
        if k not in new.__dict__:
            new.__dict__[k] = v
    new.train(lin.training)
    return new


def _identity_like(m: nn.Module) -> nn.Identity:
    new = nn.Identity()
    new.train(m.training)
    return new


def _set(parent: nn.Module, rel: str, new: nn.Module) -> None:
    owner, _, name = rel.rpartition(".")
    setattr(parent.get_submodule(owner) if owner else parent, name, new)


def _direct_children(mod: nn.Module, prefix: str = "") -> Iterator[Tuple[str, nn.Module]]:
    """Children as mod.forward calls them: through ModuleList / ModuleDict (which have no forward)."""
    for name, child in mod._modules.items():
        if child is None:
            continue
        rel = _join(prefix, name)
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from _direct_children(child, rel)
        else:
            yield rel, child


class _Swapper:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.report = SwapReport()
        self.refs = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.why_left: Dict[int, str] = {}  # id(Linear) -> reason it was not fused
        self.act_cache: Dict[int, Optional[Tuple[str, float]]] = {}

    def activation_module(self, m: nn.Module) -> Tuple[Optional[Tuple[str, float]], str]:
        act = _module_activation(m, self.act_cache)
        if act is None:
            return None, f"not a supported activation ({type(m).__name__})"
        if _hooks(m):
            return None, f"{type(m).__name__} has hooks registered"
        if self.refs[id(m)] > 1:
            return None, f"the {type(m).__name__} module is shared by several modules"
        return act, ""

    def fuse(self, parent: nn.Module, prefix: str, lin_rel: str, act: Tuple[str, float],
             site: str, act_rel: Optional[str]) -> None:
        lin = parent.get_submodule(lin_rel)
        _set(parent, lin_rel, _fused_linear(lin, *act))
        if act_rel is not None:
            _set(parent, act_rel, _identity_like(parent.get_submodule(act_rel)))
        self.why_left.pop(id(lin), None)
        self.report.fused.append((_join(prefix, lin_rel), site, act[0]))

    def sequential(self, seq: nn.Sequential, prefix: str) -> None:
        names = [k for k, v in seq._modules.items() if v is not None]
        if names and _fusable_linear(seq._modules[names[-1]]):
            self.why_left[id(seq._modules[names[-1]])] = "last in its Sequential: its output leaves it"
        for a, b in zip(names, names[1:]):
            lin, nxt = seq._modules[a], seq._modules[b]
            if not _fusable_linear(lin):
                continue
            why = _linear_problem(lin, self.refs)
            act, why_act = (None, "") if why else self.activation_module(nxt)
            if why or act is None:
                self.why_left[id(lin)] = why or f"followed by {_join(prefix, b)}: {why_act}"
                continue
            self.fuse(seq, prefix, a, act, f"{_join(prefix, b)} ({type(nxt).__name__})", b)

    def traced(self, mod: nn.Module, prefix: str) -> None:
        children = dict(_direct_children(mod))
        linears = {rel: m for rel, m in children.items() if _fusable_linear(m)}
        if not linears:
            return
        graph, why = _trace_checked(mod)
        if graph is None:
            for m in linears.values():
                self.why_left[id(m)] = f"in {_name(prefix)}: {why}"
            return
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        erased = False
        for node in list(graph.nodes):
            if node.op != "call_module" or node.target not in linears:
                continue
            lin = linears[node.target]
            if not _fusable_linear(mod.get_submodule(node.target)):  # fused via another call
                continue
            why = _linear_problem(lin, self.refs)
            if why is None and calls[node.target] > 1:
                why = f"called {calls[node.target]} times in {type(mod).__name__}.forward"
            users = list(node.users)
            if why is None and len(users) != 1:
                why = ("its output is used by " + ", ".join(_describe(u) if u.op != "call_module"
                                                             else u.target for u in users)
                       if users else "its output is unused")
            if why is not None:
                self.why_left[id(lin)] = why
                continue
            user = users[0]
            if user.op == "call_module":
                act_mod = children.get(user.target)
                if act_mod is None:
                    self.why_left[id(lin)] = f"its output goes to {user.target}, not a direct child"
                    continue
                act, why_act = self.activation_module(act_mod)
                if act is not None and (calls[user.target] > 1 or user.args != (node,) or user.kwargs):
                    act, why_act = None, f"{user.target} is called more than once or with more arguments"
                if act is None:
                    self.why_left[id(lin)] = f"its output goes to {_join(prefix, user.target)}: {why_act}"
                    continue
                self.fuse(mod, prefix, node.target, act,
                          f"{_join(prefix, user.target)} ({type(act_mod).__name__})", user.target)
            else:
                act = _call_activation(user, node)
                if act is None:
                    self.why_left[id(lin)] = f"its output goes to {_describe(user)}, not an activation"
                    continue
                site = f"{_describe(user)} in {type(mod).__name__}.forward"
                user.replace_all_uses_with(node)
                graph.erase_node(user)
                erased = True
                self.fuse(mod, prefix, node.target, act, site, None)
        if erased:
            graph.lint()
            code = graph.python_code("self")
            mod.forward = _GraphForward(mod, code.src, code.globals)
            self.report.rewritten.append(_name(prefix))

    def softmaxes(self) -> None:
        done: Dict[int, nn.Module] = {}
        for ppath, parent in list(self.model.named_modules()):
            for name, child in list(parent._modules.items()):
                if type(child) not in (nn.Softmax, nn.LogSoftmax):
                    continue
                path = _join(ppath, name)
                if child.dim is None:
                    self.report.left.append((path, f"{type(child).__name__}(dim=None) picks its dim "
                                                   "from the input's rank (deprecated); not replaced"))
                    continue
                if _hooks(child):
                    self.report.left.append((path, f"{type(child).__name__} has hooks registered"))
                    continue
                new = done.get(id(child))
                if new is None:  # a module shared by several parents stays shared
                    new = (Softmax if type(child) is nn.Softmax else LogSoftmax)(child.dim)
                    new.train(child.training)
                    done[id(child)] = new
                setattr(parent, name, new)
                self.report.replaced.append((path, f"fastlayers.{type(new).__name__}(dim={child.dim})"))

    def run(self) -> nn.Module:
        for prefix, mod in list(self.model.named_modules()):
            if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
                continue
            if isinstance(mod, nn.Sequential) and type(mod).forward is nn.Sequential.forward:
                self.sequential(mod, prefix)
            else:
                self.traced(mod, prefix)
        self.softmaxes()
        for path, m in self.model.named_modules():
            if isinstance(m, FusedLinear) and m.activation != "none":
                continue
            if isinstance(m, nn.Linear):
                why = self.why_left.get(id(m))
                if why is None:
                    why = (f"{type(m).__name__} is a subclass of nn.Linear (its forward may differ)"
                           if not _fusable_linear(m) else
                           "its output does not go straight into an activation in its parent's forward")
                self.report.left.append((path, why))
        return self.model


def swap(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Fuse `model`'s Linear -> activation pairs and softmax modules in place; returns `model`.

    Parameters stay the same objects (state_dict keys and optimizers unchanged); outputs and
    gradients match the original model up to floating-point rounding. The report of what was
    fused and what was left and why is printed when `verbose` and attached as
    ``model.fastlayers_swap_report`` (a :class:`SwapReport`). A model that *is* an nn.Softmax /
    nn.LogSoftmax is returned replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlayers.swap: expected an nn.Module, got {type(model).__name__}")
    if type(model) in (nn.Softmax, nn.LogSoftmax) and model.dim is not None and not _hooks(model):
        new = (Softmax if type(model) is nn.Softmax else LogSoftmax)(model.dim)
        new.train(model.training)
        model, report = new, SwapReport(replaced=[("<model>", f"fastlayers.{type(new).__name__}")])
    else:
        swapper = _Swapper(model)
        swapper.run()
        report = swapper.report
    model.fastlayers_swap_report = report
    log.info("%s", report)
    if verbose:
        print(report)
    return model
