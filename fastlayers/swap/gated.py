"""Gated-MLP patterns for fastlayers.swap, found in one module's traced forward (fx graph):

* two Linears on the same input, one through an activation, multiplied --
  ``act(gate(x)) * up(x)`` (Hugging Face Llama / Mistral / Qwen MLPs: gate_proj / up_proj / act_fn;
  timm's SwiGLU: fc1_g / fc1_x / act), either operand order, the activation a module child or a
  functional call;
* one Linear whose output is split in two and gated -- ``a, b = proj(x).chunk(2, dim=-1);
  a * act(b)`` (diffusers-style GeGLU), either half as the gate.

Each match becomes one ``fastlayers.gated_linear`` call in the rewritten forward, reading the
Linears' own Parameters (``self.gate_proj.weight``, ...; the chunked form takes the two row
halves of ``self.proj.weight`` as views), so the modules, their Parameters and the state_dict keys
stay as they were; the activation module is no longer called. Every intermediate must feed only
the next step (the pre-activations, the activation and each half are used nowhere else), the
Linears must be plain nn.Linear with no hooks, called once and not shared, and the forward must
not read Python state (see tracing.frozen_state), exactly as for a functional activation.
"""
from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..ops.gated_linear import gated_linear
from .patterns import call_activation, describe, hooks, hooks_text

_MULS = (operator.mul, torch.mul)


def swap_gated_linear(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                      b_up: Optional[Tensor], activation: str, negative_slope: float) -> Tensor:
    """fastlayers.gated_linear as a rewritten forward calls it: the registered op under
    TorchScript (which cannot compile the Python op's checks), else the eager op."""
    if torch.jit.is_scripting():
        return torch.ops.fastlayers.gated_linear(x, w_gate, w_up, b_gate, b_up, activation, negative_slope)[0]
    else:
        return _eager_gated(x, w_gate, w_up, b_gate, b_up, activation, negative_slope)


@torch.jit.unused
def _eager_gated(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor], b_up: Optional[Tensor],
                 activation: str, negative_slope: float) -> Tensor:
    return gated_linear(x, w_gate, w_up, b_gate, b_up, activation, negative_slope)


def gated_linear_halves(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                        negative_slope: float, gate_half: int) -> Tensor:
    """``a, b = F.linear(x, weight, bias).chunk(2, -1)``, then ``act(gate) * other`` with gate the
    half `gate_half` (0 or 1): one fastlayers.gated_linear over row views of weight and bias
    (narrow, not slices: TorchScript compiles this too)."""
    n = weight.shape[0] // 2
    g0 = n * gate_half
    u0 = n - g0
    b_gate: Optional[Tensor] = None
    b_up: Optional[Tensor] = None
    if bias is not None:
        b_gate = bias.narrow(0, g0, n)
        b_up = bias.narrow(0, u0, n)
    return swap_gated_linear(x, weight.narrow(0, g0, n), weight.narrow(0, u0, n), b_gate, b_up, activation,
                             negative_slope)


def _mul_operands(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    if node.op == "call_function" and node.target in _MULS and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
    elif node.op == "call_method" and node.target == "mul" and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
    else:
        return None
    return (a, b) if isinstance(a, fx.Node) and isinstance(b, fx.Node) else None


def _chunk_halves(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node, fx.Node]]:
    """(source, first half, second half) when node is getitem(chunk(source, 2, dim=-1), i) and
    the chunk's only users are its two getitems."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return None
    chunk = node.args[0]
    if not isinstance(chunk, fx.Node):
        return None
    if chunk.op == "call_method" and chunk.target == "chunk":
        args = chunk.args[1:]
    elif chunk.op == "call_function" and chunk.target is torch.chunk:
        args = chunk.args[1:]
    else:
        return None
    src = chunk.args[0]
    kw = dict(chunk.kwargs)
    pos = list(args)
    chunks = pos.pop(0) if pos else kw.pop("chunks", None)
    dim = pos.pop(0) if pos else kw.pop("dim", 0)
    if pos or kw or chunks != 2 or dim != -1 or not isinstance(src, fx.Node):
        return None
    items = {}
    for u in chunk.users:
        if not (u.op == "call_function" and u.target is operator.getitem and u.args[0] is chunk
                and u.args[1] in (0, 1) and u.args[1] not in items):
            return None
        items[u.args[1]] = u
    if set(items) != {0, 1}:
        return None
    return src, items[0], items[1]


class GatedMatch:
    """One match: what to call, and which nodes it replaces."""

    def __init__(self, mul: fx.Node, x: fx.Node, act: Tuple[str, float], act_node: fx.Node,
                 gate: str, up: Optional[str], gate_half: Optional[int], erase: List[fx.Node],
                 site: str) -> None:
        self.mul, self.x, self.act, self.act_node = mul, x, act, act_node
        self.gate, self.up, self.gate_half, self.erase, self.site = gate, up, gate_half, erase, site


def find(graph: fx.Graph, linear_ok: Callable[[str], Optional[str]],
         activation_of: Callable[[fx.Node, fx.Node], Tuple[Optional[Tuple[str, float]], str]],
         calls: Dict[str, int]) -> Tuple[List[GatedMatch], Dict[str, str]]:
    """Gated patterns in `graph`. linear_ok(target) -> None or why that Linear cannot be fused;
    activation_of(node, src) -> ((name, slope) or None, why) for node applied to src.
    Returns the matches and, for Linears seen in a gated product but not fused, why not."""
    matches: List[GatedMatch] = []
    why: Dict[str, str] = {}
    for mul in list(graph.nodes):
        ops = _mul_operands(mul)
        if ops is None:
            continue
        for act_node, other in (ops, ops[::-1]):
            if len(act_node.users) != 1 or len(act_node.all_input_nodes) != 1:
                continue
            src = act_node.all_input_nodes[0]
            act, why_act = activation_of(act_node, src)
            if act is None:
                continue
            if len(src.users) != 1 or len(other.users) != 1 or other is src:
                continue
            # two Linears on the same input
            if (src.op == "call_module" and other.op == "call_module" and len(src.args) == 1
                    and len(other.args) == 1 and not src.kwargs and not other.kwargs
                    and src.args[0] is other.args[0] and isinstance(src.args[0], fx.Node)):
                problems = [(t, linear_ok(t)) for t in (src.target, other.target)]
                problems += [(t, f"called {calls[t]} times") for t in (src.target, other.target) if calls[t] > 1]
                bad = [(t, p) for t, p in problems if p]
                if bad:
                    for t, p in bad:
                        why[t] = f"in a gated product ({describe(mul)}), but {p}"
                    break
                matches.append(GatedMatch(mul, src.args[0], act, act_node, src.target, other.target, None,
                                          [mul, act_node, src, other],
                                          f"{src.target} -> {describe(act_node) if act_node.op != 'call_module' else act_node.target} * {other.target}"))
                break
            # one Linear, chunked in two halves
            a, b = _chunk_halves(src), _chunk_halves(other)
            if a is not None and b is not None and a[0] is b[0] and {src, other} == {a[1], a[2]}:
                proj = a[0]
                chunk = src.args[0]
                if not (proj.op == "call_module" and len(proj.args) == 1 and not proj.kwargs
                        and isinstance(proj.args[0], fx.Node) and len(proj.users) == 1):
                    break
                p = linear_ok(proj.target) or (f"called {calls[proj.target]} times" if calls[proj.target] > 1
                                               else None)
                if p:
                    why[proj.target] = f"in a chunked gated product ({describe(mul)}), but {p}"
                    break
                gate_half = 0 if src is a[1] else 1
                matches.append(GatedMatch(mul, proj.args[0], act, act_node, proj.target, None, gate_half,
                                          [mul, act_node, src, other, chunk, proj],
                                          f"{proj}.chunk(2) -> half {gate_half} through "
                                          f"{describe(act_node) if act_node.op != 'call_module' else act_node.target}"))
                break
    return matches, why


def rewrite(graph: fx.Graph, mod: nn.Module, m: GatedMatch) -> None:
    """Replace the matched nodes by one gated call reading the Linears' Parameters."""
    def param(target: str, name: str):
        return graph.get_attr(f"{target}.{name}") if getattr(mod.get_submodule(target), name) is not None else None

    with graph.inserting_before(m.mul):
        if m.up is not None:
            new = graph.call_function(swap_gated_linear, (m.x, param(m.gate, "weight"), param(m.up, "weight"),
                                                     param(m.gate, "bias"), param(m.up, "bias")),
                                      {"activation": m.act[0], "negative_slope": float(m.act[1])})
        else:
            new = graph.call_function(gated_linear_halves, (m.x, param(m.gate, "weight"), param(m.gate, "bias"),
                                                            m.act[0], float(m.act[1]), m.gate_half))
    m.mul.replace_all_uses_with(new)
    for node in m.erase:  # users first
        graph.erase_node(node)


def linear_problem(mod: nn.Module, target: str, refs) -> Optional[str]:
    lin = mod.get_submodule(target)
    if type(lin) is not nn.Linear:
        return f"{target} is not a plain nn.Linear ({type(lin).__name__})"
    if hooks(lin):
        return f"{target} {hooks_text(lin)}"
    if refs[id(lin)] > 1:
        return f"{target} is shared by several modules"
    return None


def is_lora(m) -> bool:
    """A PEFT LoRA layer (peft.tuners.lora.LoraLayer) wrapping a base layer."""
    return (m is not None and hasattr(m, "lora_A") and hasattr(m, "get_base_layer")
            and any(c.__module__.startswith("peft.") for c in type(m).__mro__))


def lora_reason(path: str, m) -> str:
    return (f"in a gated product, but {path} is a PEFT LoRA layer ({type(m).__name__}): its low-rank update "
            "s * B(A(dropout(x))) is added to the pre-activation, before the activation, and "
            "fastlayers.gated_linear takes no such addend (folding it into the weight would not be PEFT's "
            "computation); left unfused. Fused after peft's merge_and_unload(), or apply LoRA after swap "
            "(the rewritten forward then runs the original one)")


def chunk_problem(mod: nn.Module, m: GatedMatch) -> Optional[str]:
    if m.gate_half is not None and mod.get_submodule(m.gate).out_features % 2:
        return f"{m.gate} has an odd number of outputs"
    if m.up is not None:
        g, u = mod.get_submodule(m.gate), mod.get_submodule(m.up)
        if g.weight.shape != u.weight.shape or (g.bias is None) != (u.bias is None):
            return f"{m.gate} and {m.up} differ in shape or bias"
    return None


__all__ = ["find", "rewrite", "gated_linear_halves", "is_lora", "lora_reason", "swap_gated_linear", "GatedMatch", "linear_problem", "chunk_problem"]
