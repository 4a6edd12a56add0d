"""The norm modules fastlayers.swap replaces, holding the very same Parameter objects:

* ``nn.LayerNorm`` (exactly that class) -> fastlayers.LayerNorm (an nn.LayerNorm subclass);
* ``nn.RMSNorm`` over one dim -> fastlayers.ops.norms.TorchRMSNorm (an nn.RMSNorm subclass, F.rms_norm's rounding);
* a Hugging Face RMSNorm class (``kernel_layer_name == "RMSNorm"``: 127 model families in
  transformers 5.x) whose forward is LlamaRMSNorm's -> fastlayers.RMSNorm (mode="hf"). "Is
  LlamaRMSNorm's" is checked twice: by structure (a 1-D ``weight`` Parameter, a float
  ``variance_epsilon``, no other parameters, buffers or children) and by behaviour (the module's own
  forward on a probe input, in bfloat16 -- which tells the cast-then-weight rounding, the output
  dtype and ``(1 + weight)`` variants apart -- and float32, must equal fastlayers.rms_norm's).
  Anything else is left alone with the reason in the report.
* a LayerNorm class of another library (nanoGPT's ``LayerNorm(ndim, bias)``) whose forward traces to
  exactly ``F.layer_norm(input, self.weight.shape, self.weight, self.bias, <eps>)``, with a
  ``weight`` Parameter, a ``bias`` Parameter or None, and nothing else (no buffers, children or
  other state read) -> fastlayers.LayerNorm on the same Parameters.

Modules with hooks are left alone (as swap does for Linears); a norm module shared by several parents
becomes one fused module shared by the same parents.
"""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ops.norms import LayerNorm, RMSNorm, TorchRMSNorm, norm_composite
from .patterns import replace_modules
from .report import SwapReport
from .tracing import frozen_state, trace_checked


def hf_rmsnorm_problem(m: nn.Module, class_forward: bool = False) -> Optional[str]:
    """None when m computes LlamaRMSNorm's forward, else why it is left alone. class_forward: probe
    the class's own forward (fastlayers.hf: the instance's forward is already the kernel's)."""
    name = type(m).__name__
    w = getattr(m, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1:
        return f"{name}: no 1-D weight Parameter (not LlamaRMSNorm's layout)"
    eps = getattr(m, "variance_epsilon", None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return f"{name}: no float variance_epsilon attribute (not LlamaRMSNorm's forward)"
    if [n for n, _ in m.named_parameters()] != ["weight"] or list(m.buffers()) or len(m._modules):
        return f"{name}: has parameters, buffers or submodules besides weight"
    if w.device.type == "meta":
        return f"{name}: weight on the meta device (its forward cannot be probed)"
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float32):
            x = (torch.randn(3, w.shape[0], generator=gen) * 3).to(device=w.device, dtype=dtype)
            try:
                got = type(m).forward(m, x) if class_forward else m(x)
            except Exception as e:  # noqa: BLE001 - any failure: not the standard forward
                return f"{name}: its forward failed on a probe input ({type(e).__name__})"
            want = norm_composite(x, w, None, None, float(eps), "rms_hf", 1)
            if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
                return f"{name}: its forward returns another dtype/shape than LlamaRMSNorm's on {dtype} input"
            if not torch.allclose(got, want, rtol=1e-6, atol=1e-6, equal_nan=True):
                return f"{name}: its forward differs from LlamaRMSNorm's (another formula)"
    return None


def _layer_norm_module(m: nn.Module) -> Tuple[Optional[float], Optional[str]]:
    """(eps, None) when m's forward is exactly F.layer_norm(input, self.weight.shape, self.weight,
    self.bias, eps) (nanoGPT's LayerNorm); (None, why) when it calls F.layer_norm otherwise;
    (None, None) when m is not such a module at all."""
    t = type(m)
    if t.__module__.startswith("torch.") or len(m._modules) or list(m.buffers()):
        return None, None
    w = m._parameters.get("weight")
    names = set(m._parameters)
    bias = m._parameters.get("bias", m.__dict__.get("bias"))
    if not isinstance(w, nn.Parameter) or not names <= {"weight", "bias"} or not (
            bias is None or isinstance(bias, nn.Parameter)):
        return None, None
    try:
        if len(inspect.signature(m.forward).parameters) != 1:
            return None, None
    except (TypeError, ValueError):
        return None, None
    graph, why, frozen = trace_checked(m)
    if graph is None:
        return None, None
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target in (F.layer_norm, torch.layer_norm)]
    if len(calls) != 1:
        return None, None
    name = t.__name__
    node = calls[0]
    try:
        b = inspect.signature(F.layer_norm).bind(*node.args, **node.kwargs)
    except TypeError:
        return None, f"{name}: its F.layer_norm call's arguments could not be read"
    a = b.arguments
    nodes = list(graph.nodes)
    ph = [n for n in nodes if n.op == "placeholder"]
    out = nodes[-1]

    def attr(n, target):
        return isinstance(n, fx.Node) and n.op == "get_attr" and n.target == target

    shape = a.get("normalized_shape")
    shape_ok = ((isinstance(shape, fx.Node) and shape.op == "call_function" and shape.target is getattr
                 and attr(shape.args[0], "weight") and shape.args[1] == "shape")
                or (isinstance(shape, (tuple, list)) and tuple(shape) == tuple(w.shape)))
    eps = a.get("eps", 1e-5)
    problems = []
    if not (len(ph) == 1 and a.get("input") is ph[0] and out.args == (node,)):
        problems.append("its forward does more than one F.layer_norm of its input")
    if not shape_ok:
        problems.append("normalized_shape is not weight.shape")
    if not attr(a.get("weight"), "weight"):
        problems.append("the weight passed is not self.weight")
    if not (attr(a.get("bias"), "bias") if bias is not None else a.get("bias") is None):
        problems.append("the bias passed is not self.bias")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        problems.append("eps is not a constant number")
    if frozen is not None and frozen != frozen_state(m, {"self.bias"}):  # bias None: the same in ours
        problems.append(frozen)
    extra = [n for n in nodes if n not in (node, out, shape, *ph) and not attr(n, "weight") and not attr(n, "bias")]
    if extra:
        problems.append("its forward computes more than F.layer_norm")
    if problems:
        return None, f"{name}: calls F.layer_norm, but {'; '.join(problems)}"
    return float(eps), None


def _replacement(m: nn.Module):
    """(new module, None) or (None, why it stays) for a norm module; (None, None) when not a norm."""
    t = type(m)
    if t is nn.LayerNorm:
        new = LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                        bias=m.bias is not None, device="meta")
        new.weight, new.bias = m.weight, m.bias
        return new, None
    if t is nn.RMSNorm:
        if len(m.normalized_shape) != 1:
            return None, "nn.RMSNorm over several dims (fastlayers.rms_norm normalises the last dim)"
        new = TorchRMSNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine, device="meta")
        new.weight = m.weight
        return new, None
    if getattr(t, "kernel_layer_name", None) == "RMSNorm":
        why = hf_rmsnorm_problem(m)
        if why is not None:
            return None, why
        new = RMSNorm(m.weight.shape[0], eps=float(m.variance_epsilon), mode="hf", device="meta")
        new.weight = m.weight
        return new, None
    eps, why = _layer_norm_module(m)
    if eps is not None:
        bias = m._parameters.get("bias")
        new = LayerNorm(tuple(m.weight.shape), eps=eps, bias=bias is not None, device="meta")
        new.weight = m.weight
        if bias is not None:
            new.bias = bias
        return new, None
    return None, why


def _replacement_keeping_attributes(m: nn.Module):
    """_replacement, the new module given m's user attributes (nanoGPT's plain bias = None too)."""
    new, why = _replacement(m)
    if new is not None:
        for k, v in m.__dict__.items():
            if k not in new.__dict__ and k not in new._parameters:
                new.__dict__[k] = v
    return new, why


def swap_norms(model: nn.Module, report: SwapReport) -> None:
    """Replace model's norm modules in place (see the module docstring); entries go to report.replaced
    (path, new class) and report.left (path, reason)."""
    replace_modules(model, report, _replacement_keeping_attributes, lambda new: f"fastlayers.{type(new).__name__}")
