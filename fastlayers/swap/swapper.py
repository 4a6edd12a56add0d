"""The swapper: walks a model's modules and fuses what the patterns recognise (see __init__)."""
from __future__ import annotations

from collections import Counter
from typing import Dict, Optional, Tuple

from torch import nn

from ..nn import FusedLinear, LogSoftmax, Softmax
from . import gated as _gated
from . import causal_lm as _causal_lm
from . import loss as _loss
from .patterns import (direct_children as _direct_children, fusable_linear, fused_linear, join, linear_problem, path_name, call_activation, describe, hooks,
                       hooks_text, module_activation)
from .report import SwapReport
from .rewrite import rewrite_forward
from .tracing import trace_checked


def _identity_like(m: nn.Module) -> nn.Identity:
    new = nn.Identity()
    new.train(m.training)
    return new


def _set(parent: nn.Module, rel: str, new: nn.Module) -> None:
    owner, _, name = rel.rpartition(".")
    setattr(parent.get_submodule(owner) if owner else parent, name, new)


class _Swapper:
    def __init__(self, model: nn.Module, linears: bool = True, skip_logits: bool = False) -> None:
        self.model = model
        self.linears = linears
        self.skip_logits = skip_logits
        self.report = SwapReport()
        self.refs = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.why_left: Dict[int, str] = {}  # id(Linear) -> reason it was not fused
        self.act_cache: Dict[int, Optional[Tuple[str, float]]] = {}
        self.gated_ids = set()  # id(Linear) of the gate / up Linears now read by a gated_linear call
        self.gated_why: Dict[int, str] = {}  # id(Linear) -> why its gated product was not fused
        self.loss_heads = set()  # id(Linear) of heads now read by a linear_cross_entropy call
        self.loss_decided = set()  # id(module) whose losses the traced route decided (swap/loss/)
        self.loss_frozen: Dict[int, str] = {}  # id(module) -> why its traced losses were not rewritten

    def activation_module(self, m: nn.Module) -> Tuple[Optional[Tuple[str, float]], str]:
        act = module_activation(m, self.act_cache)
        if act is None:
            return None, f"not a supported activation ({type(m).__name__})"
        if hooks(m):
            return None, f"{type(m).__name__} {hooks_text(m)}"
        if self.refs[id(m)] > 1:
            return None, f"the {type(m).__name__} module is shared by several modules"
        return act, ""

    def fuse(self, parent: nn.Module, prefix: str, lin_rel: str, act: Tuple[str, float],
             site: str, act_rel: Optional[str]) -> None:
        lin = parent.get_submodule(lin_rel)
        fused = fused_linear(lin, *act)
        _set(parent, lin_rel, fused)
        owner, _, name = lin_rel.rpartition(".")
        fused._mark_swapped_into(parent.get_submodule(owner) if owner else parent, name)
        if act_rel is not None:
            _set(parent, act_rel, _identity_like(parent.get_submodule(act_rel)))
        self.why_left.pop(id(lin), None)
        self.report.fused.append((join(prefix, lin_rel), site, act[0]))

    def sequential(self, seq: nn.Sequential, prefix: str) -> None:
        names = [k for k, v in seq._modules.items() if v is not None]
        if names and fusable_linear(seq._modules[names[-1]]):
            self.why_left[id(seq._modules[names[-1]])] = "last in its Sequential: its output leaves it"
        for a, b in zip(names, names[1:]):
            lin, nxt = seq._modules[a], seq._modules[b]
            if not fusable_linear(lin):
                continue
            why = linear_problem(lin, self.refs)
            act, why_act = (None, "") if why else self.activation_module(nxt)
            if why or act is None:
                self.why_left[id(lin)] = why or f"followed by {join(prefix, b)}: {why_act}"
                continue
            self.fuse(seq, prefix, a, act, f"{join(prefix, b)} ({type(nxt).__name__})", b)

    def traced(self, mod: nn.Module, prefix: str) -> None:
        children = dict(_direct_children(mod))
        linears = {rel: m for rel, m in children.items() if fusable_linear(m)}
        if not linears:
            return
        graph, why, frozen = trace_checked(mod)
        if graph is None:
            for m in linears.values():
                self.why_left[id(m)] = f"in {path_name(prefix)}: {why}"
            return
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        functional = False  # a functional activation fused into a Linear child
        erased = self.gated(mod, prefix, graph, children, linears, calls, frozen)
        erased = _loss.in_graph(self, mod, prefix, graph, children, calls, frozen) or erased
        for node in list(graph.nodes):
            if node.op != "call_module" or node.target not in linears:
                continue
            lin = linears[node.target]
            if not fusable_linear(mod.get_submodule(node.target)):  # fused via another call
                continue
            why = linear_problem(lin, self.refs)
            if why is None and calls[node.target] > 1:
                why = f"called {calls[node.target]} times in {type(mod).__name__}.forward"
            users = list(node.users)
            if why is None and len(users) != 1:
                why = ("its output is used by " + ", ".join(describe(u) if u.op != "call_module"
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
                    self.why_left[id(lin)] = f"its output goes to {join(prefix, user.target)}: {why_act}"
                    continue
                self.fuse(mod, prefix, node.target, act,
                          f"{join(prefix, user.target)} ({type(act_mod).__name__})", user.target)
            else:
                act = call_activation(user, node)
                if act is None:
                    self.why_left[id(lin)] = f"its output goes to {describe(user)}, not an activation"
                    continue
                if frozen is not None:  # removing the call means rewriting the forward
                    self.why_left[id(lin)] = f"its output goes to {describe(user)}, but {frozen}"
                    continue
                site = f"{describe(user)} in {type(mod).__name__}.forward"
                user.replace_all_uses_with(node)
                graph.erase_node(user)
                erased = functional = True
                self.fuse(mod, prefix, node.target, act, site, None)
        if erased:
            graph.lint()
            code = graph.python_code("self")
            still = {n.target for n in graph.nodes if n.op == "call_module"}
            read = {n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
            rewrite_forward(mod, code.src, code.globals, (set(calls) - still) | (read - {""}),
                            fallback_ok=not functional)
            self.report.rewritten.append(path_name(prefix))

    def gated(self, mod: nn.Module, prefix: str, graph, children, linears, calls, frozen) -> bool:
        """Gated MLPs (swap/gated.py) in mod's graph, rewritten to gated_linear calls; True if any."""
        def linear_ok(target):
            if target not in linears:
                return f"{target} is not a Linear child of {type(mod).__name__}"
            return _gated.linear_problem(mod, target, self.refs)

        def activation_of(node, src):
            if node.op == "call_module":
                act_mod = children.get(node.target)
                if act_mod is None or calls[node.target] > 1 or node.args != (src,) or node.kwargs:
                    return None, "not a single call of an activation child"
                return self.activation_module(act_mod)
            act = call_activation(node, src)
            return act, "" if act else "not an activation"

        matches, why = _gated.find(graph, linear_ok, activation_of, calls)
        for target, reason in why.items():
            if target in linears:
                self.gated_why[id(linears[target])] = reason
            elif _gated.is_lora(children.get(target)):
                lora = children[target]
                self.gated_why[id(lora.get_base_layer())] = _gated.lora_reason(join(prefix, target), lora)
        done = False
        for m in matches:
            names = [t for t in (m.gate, m.up) if t is not None]
            problem = _gated.chunk_problem(mod, m) or frozen
            if problem is not None:
                for t in names:
                    self.gated_why[id(linears[t])] = f"in a gated product ({m.site}), but {problem}"
                continue
            _gated.rewrite(graph, mod, m)
            for t in names:
                self.gated_ids.add(id(linears[t]))
                self.why_left.pop(id(linears[t]), None)
            self.report.gated.append((join(prefix, m.gate) if m.up is None else
                                      f"{join(prefix, m.gate)} + {join(prefix, m.up)}", m.site, m.act[0]))
            done = True
        return done

    def softmaxes(self) -> None:
        done: Dict[int, nn.Module] = {}
        for ppath, parent in list(self.model.named_modules()):
            for name, child in list(parent._modules.items()):
                if type(child) not in (nn.Softmax, nn.LogSoftmax):
                    continue
                path = join(ppath, name)
                if child.dim is None:
                    self.report.left.append((path, f"{type(child).__name__}(dim=None) picks its dim "
                                                   "from the input's rank (deprecated); not replaced"))
                    continue
                if hooks(child):
                    self.report.left.append((path, f"{type(child).__name__} {hooks_text(child)}"))
                    continue
                new = done.get(id(child))
                if new is None:  # a module shared by several parents stays shared
                    new = (Softmax if type(child) is nn.Softmax else LogSoftmax)(child.dim)
                    new.train(child.training)
                    done[id(child)] = new
                setattr(parent, name, new)
                self.report.replaced.append((path, f"fastlayers.{type(new).__name__}(dim={child.dim})"))

    def why_not_fused(self, m: nn.Linear) -> str:
        why = self.gated_why.get(id(m)) or self.why_left.get(id(m))
        if why is not None:
            return why
        if not fusable_linear(m):
            return f"{type(m).__name__} is a subclass of nn.Linear (its forward may differ)"
        return "its output does not go straight into an activation in its parent's forward"

    def plain_linears(self, unfused: Dict[str, nn.Linear]) -> Dict[str, nn.Linear]:
        """Each remaining plain nn.Linear (no hooks) becomes a FusedLinear(activation="none") on
        the same Parameters, every reference to it (a shared Linear stays shared); returns the
        ones left as they were. FusedLinear calls F.linear where that is faster (see nn.py), so
        this only moves GEMMs that fastlayers runs faster (CPU: prepacked oneDNN)."""
        new: Dict[int, FusedLinear] = {}
        left = {}
        for path, m in unfused.items():
            if type(m) is not nn.Linear or hooks(m) or id(m) in self.gated_ids:
                left[path] = m
                continue
            if id(m) not in new:
                new[id(m)] = fused_linear(m, "none", 0.0)
            self.report.linear.append((path, self.why_not_fused(m)))
        for parent in list(self.model.modules()):
            for name, child in list(parent._modules.items()):
                if child is not None and id(child) in new:
                    setattr(parent, name, new[id(child)])
        return left

    def run(self) -> nn.Module:
        for prefix, mod in list(self.model.named_modules()):
            if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
                continue
            if isinstance(mod, nn.Sequential) and type(mod).forward is nn.Sequential.forward:
                self.sequential(mod, prefix)
            else:
                self.traced(mod, prefix)
        self.softmaxes()
        _loss.untraced(self, _causal_lm.apply if self.skip_logits else None)
        unfused = {path: m for path, m in self.model.named_modules()
                   if isinstance(m, nn.Linear) and id(m) not in self.gated_ids and id(m) not in self.loss_heads
                   and not (isinstance(m, FusedLinear) and m.activation != "none")}
        if self.linears:
            unfused = self.plain_linears(unfused)
        for path, m in unfused.items():
            self.report.left.append((path, self.why_not_fused(m)))
        return self.model
