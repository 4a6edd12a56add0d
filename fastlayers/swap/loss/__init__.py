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

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.fx as fx
from torch import nn

from ..patterns import fusable_linear, join, linear_problem, path_name
from .calls import CROSS_ENTROPY, FUSED, cross_entropy_as_torch, head_cross_entropy, is_torch_cross_entropy, logits_stand_in
from .hf import causal_lm_loss, hf_causal_lm, hf_loss_of  # noqa: F401 (causal_lm.py reads it here)
from .redirect import _codes, redirect, redirect_plan, redirected_class  # noqa: F401 (causal_lm.py, lm_source.py)
from .traced import GraphLosses

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
