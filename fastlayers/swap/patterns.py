"""Which modules and calls fastlayers.swap recognises as activations, read from a module or from
an fx node: (activation name, negative_slope) or None."""
from __future__ import annotations

import inspect
from collections import Counter
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import _get_qualified_name

from ..activations import DEFAULT_SLOPE as _DEFAULT_SLOPE
from ..nn import FusedLinear
from .tracing import trace

_MODULE_ACTS: Dict[type, Callable[[nn.Module], Tuple[str, float]]] = {
    nn.ReLU: lambda m: ("relu", _DEFAULT_SLOPE),
    nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope)),
    nn.GELU: lambda m: ({"none": "gelu", "tanh": "gelu_tanh"}[m.approximate], _DEFAULT_SLOPE),
    nn.SiLU: lambda m: ("silu", _DEFAULT_SLOPE),
    nn.Sigmoid: lambda m: ("sigmoid", _DEFAULT_SLOPE),
    nn.Tanh: lambda m: ("tanh", _DEFAULT_SLOPE),
    nn.Hardswish: lambda m: ("hardswish", _DEFAULT_SLOPE),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", _DEFAULT_SLOPE),
    nn.ReLU6: lambda m: ("relu6", _DEFAULT_SLOPE),
    nn.Mish: lambda m: ("mish", _DEFAULT_SLOPE),
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
    F.hardswish: _sig_inplace("hardswish"), F.hardsigmoid: _sig_inplace("hardsigmoid"),
    F.relu6: _sig_inplace("relu6"), F.mish: _sig_inplace("mish"),
}
_METHOD_ACTS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                "tanh": "tanh", "tanh_": "tanh"}


def call_activation(node: fx.Node, src: fx.Node) -> Optional[Tuple[str, float]]:
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


def hooks(m: nn.Module) -> bool:
    """Hooks, or an instance-level forward (kernels' kernelize, accelerate's hooks set one): a module
    whose calls would not run its class's forward. swap leaves such modules alone (hooks_text: why)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None) or "forward" in m.__dict__)


def hooks_text(m: nn.Module) -> str:
    """Why hooks(m): for the report."""
    if "forward" in m.__dict__ and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                        or getattr(m, "_backward_pre_hooks", None)):
        return "has an instance-level forward (e.g. set by kernels' kernelize or accelerate)"
    return "has hooks registered"


def describe(node: fx.Node) -> str:
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


def _foreign_activation(m: nn.Module, cache: Dict[int, Optional[Tuple[str, float]]]):
    """(name, slope) for a parameterless module whose forward is one recognised functional call."""
    if id(m) in cache:
        return cache[id(m)]
    result = None
    if (not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())
            and not any(True for _ in m.children())):
        try:
            n_params = len(inspect.signature(m.forward).parameters)
            graph = trace(m)[0] if n_params == 1 else None
        except Exception:
            graph = None
        if graph is not None:
            nodes = list(graph.nodes)
            if (len(nodes) == 3 and nodes[0].op == "placeholder" and nodes[2].op == "output"
                    and nodes[2].args == (nodes[1],)):
                result = call_activation(nodes[1], nodes[0])
    cache[id(m)] = result
    return result


def module_activation(m: nn.Module, cache) -> Optional[Tuple[str, float]]:
    known = _MODULE_ACTS.get(type(m))  # exact type: a subclass may override forward, so trace it
    return known(m) if known is not None else _foreign_activation(m, cache)


# --- helpers the swapper and the loss patterns share
def path_name(path: str) -> str:
    return path or "<model>"


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def fusable_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or (type(m) is FusedLinear and m.activation == "none")


def linear_problem(m: nn.Module, refs: Counter) -> Optional[str]:
    if hooks(m):
        return f"{hooks_text(m)} (fusing would change what runs)"
    if refs[id(m)] > 1:
        return "the same Linear is shared by several modules"
    return None


def fused_linear(lin: nn.Linear, act: str, slope: float) -> FusedLinear:
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


def direct_children(mod: nn.Module, prefix: str = "") -> Iterator[Tuple[str, nn.Module]]:
    """Children as mod.forward calls them: through ModuleList / ModuleDict (which have no forward)."""
    for name, child in mod._modules.items():
        if child is None:
            continue
        rel = join(prefix, name)
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from direct_children(child, rel)
        else:
            yield rel, child


def replace_modules(model: nn.Module, report, replacement: Callable[[nn.Module], Tuple[Optional[nn.Module], Optional[str]]],
                    label: Callable[[nn.Module], str]) -> None:
    """Replace model's modules in place, each as `replacement(module)` says: (new module, None), (None,
    why it stays) or (None, None) when it is not one of the kinds asked for. A module with hooks stays
    (hooks_text). The new module takes the old one's train / eval mode; a module shared by several
    parents gets one replacement, shared too. Entries go to report.replaced (path, label(new)) and
    report.left (path, why)."""
    done: Dict[int, nn.Module] = {}  # id(original) -> its replacement
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = join(prefix, name)
            if id(child) in done:
                setattr(parent, name, done[id(child)])
                report.replaced.append((path, label(done[id(child)])))
                continue
            new, why = replacement(child)
            if new is None and why is None:
                continue
            if new is not None and hooks(child):
                new, why = None, f"{type(child).__name__} {hooks_text(child)}"
            if new is None:
                report.left.append((path, why))
                continue
            new.train(child.training)
            setattr(parent, name, new)
            done[id(child)] = new
            report.replaced.append((path, label(new)))
