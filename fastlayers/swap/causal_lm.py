"""Logit-free training for fastlayers.swap(model, skip_logits=True).

A language model's training step holds its (tokens x vocab) logits, their float32 log-probabilities
and their gradient: most of a small LM's step memory. fastlayers.linear_cross_entropy computes the
same loss from the head's input and weight without them. Where a model's forward returns its logits
(Hugging Face ``*ForCausalLM``, nanoGPT's ``GPT``), swap cannot fuse the loss without changing what
the forward returns; with ``skip_logits=True`` it does, in training with labels only:

* Hugging Face causal LMs, found structurally: a ``loss_function`` that is transformers'
  ForCausalLMLoss (not set by the user), and a forward whose source assigns
  ``logits = self.<head>(...)`` (the head a plain nn.Linear / FusedLinear child) and passes that
  name, untouched in between, as the logits of ``self.loss_function(...)`` together with
  ``labels``. The model becomes an instance of a subclass whose forward, when ``model.training``
  and ``labels`` is not None, runs the original forward with the head's next call computing the
  loss (label shift, ``ignore_index``, ``shift_labels``, "sum" / ``num_items_in_batch`` else
  "mean", as ForCausalLMLoss) and returns the output with ``logits=None`` (a tuple output without
  the logits, as transformers' ``to_tuple`` drops None fields). ``logits_to_keep`` is applied by
  the forward itself, before the head. A forward that transforms the logits between the head and
  the loss (Gemma2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
  ``logits_scaling``) is left alone, the statement quoted in the report.
* nanoGPT-style forwards (``if targets is not None: logits = self.lm_head(x); loss =
  F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ...)``): the model's class
  becomes a subclass whose forward, in training, is a copy of the forward's source with those two
  statements rewritten to ``logits = None; loss = self.lm_head(x, fastlayers_target=targets.view(-1),
  ...)`` (compiled against the module's live globals; nothing global changes). The copy is made
  only where ``logits`` is used nowhere else but in the returned tuple.

Everything else -- eval mode, no labels / targets -- runs the class's original forward: the same
outputs, bit for bit. The forwards are recognised by reading their source (swap/lm_source.py).

The loss is computed *inside a call of the head module* (its class becomes a subclass whose forward
takes the target): hooks on the head run as for any call, so FSDP2 (``fully_shard(lm_head)``)
all-gathers the full weight before it and registers its backward hooks on the loss, and the
gradient reaches the sharded Parameter through FSDP's own reduce-scatter. The head's Parameters are
the same objects (tied weights stay tied, state_dict keys unchanged).
"""
from __future__ import annotations

import inspect
import sys
import threading
import types
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.linear_cross_entropy import _linear_cross_entropy as linear_cross_entropy
from .lm_source import hf_plan, nanogpt_plan
from .loss import hf_loss_of
from .patterns import fusable_linear, fused_linear, hooks, join, path_name
from .rewrite import make_subclass

FUSED = "linear_cross_entropy"

# ----------------------------------------------------------------------------- the head
class _Pending:
    """What the next call of an HF head computes: the loss of the model's call in flight."""

    def __init__(self, labels: Tensor, loss_kwargs: Dict[str, Any]) -> None:
        self.labels = labels
        self.num_items_in_batch = loss_kwargs.get("num_items_in_batch")
        self.ignore_index = loss_kwargs.get("ignore_index", -100)
        self.shift_labels = loss_kwargs.get("shift_labels")
        self.loss: Optional[Tensor] = None

    def compute(self, head: nn.Module, h: Tensor) -> Tensor:
        """transformers' ForCausalLMLoss of the logits F.linear(h, W, b), without them."""
        shift = self.shift_labels
        if shift is None:
            shift = F.pad(self.labels, (0, 1), value=self.ignore_index)[..., 1:]
        shift = shift.reshape(-1).to(h.device)
        reduction = "sum" if self.num_items_in_batch is not None else "mean"
        # ForCausalLMLoss computes in float32 (logits.float()): a float32 loss for 16-bit models
        loss = head_loss(head, h, shift, ignore_index=self.ignore_index, reduction=reduction,
                         out_dtype=torch.float32 if h.dtype != torch.float64 else None)
        if reduction == "sum":
            n = self.num_items_in_batch
            loss = loss / (n.to(loss.device) if torch.is_tensor(n) else n)
        return loss


def head_loss(head: nn.Module, h: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean",
              label_smoothing: float = 0.0, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """F.cross_entropy(head(h).view(-1, vocab), target.view(-1), ...) without the logits."""
    return linear_cross_entropy(h.reshape(-1, h.shape[-1]), head.weight, target.reshape(-1), head.bias,
                                ignore_index, label_smoothing, reduction, out_dtype)


def _head_forward(self, input: Tensor, fastlayers_target: Optional[Tensor] = None, **options: Any) -> Tensor:
    """The head's forward: its class's own, except in a logit-free call (see the module docstring),
    where it returns the loss."""
    pending = self.__dict__.pop("_fastlayers_pending", None)
    if pending is not None:
        pending.loss = pending.compute(self, input)
        return pending.loss
    if fastlayers_target is not None:
        return head_loss(self, input, fastlayers_target, **options)
    return type(self).fastlayers_original_class.forward(self, input)


_HEADS: Dict[type, type] = {}


def _rebuild(base: type, kind: str) -> nn.Module:
    cls = head_class(base) if kind == "head" else model_class(base)
    return cls.__new__(cls)


def _reduce_head(self, protocol):
    return _rebuild, (type(self).fastlayers_original_class, "head"), self.__getstate__()


def _reduce_model(self, protocol):
    return _rebuild, (type(self).fastlayers_original_class, "model"), self.__getstate__()


def head_class(base: type) -> type:
    cls = _HEADS.get(base)
    if cls is None:
        cls = _HEADS[base] = make_subclass(base, _head_forward, _reduce_head, fastlayers_logit_free_head=True)
    return cls


# ----------------------------------------------------------------------------- Hugging Face
def _is_for_causal_lm_loss(mod: nn.Module) -> str:
    """'' when mod's loss_function is transformers' ForCausalLMLoss; else why not ('-' if no HF loss)."""
    lu = sys.modules.get("transformers.loss.loss_utils")
    if lu is None or not isinstance(getattr(type(mod), "loss_function", None), property):
        return "-"
    from .loss import causal_lm_loss
    if mod.__dict__.get("_loss_function") in (causal_lm_loss, skip_logits_loss):
        return ""  # swapped before
    if hf_loss_of(lu, mod) is not getattr(lu, "ForCausalLMLoss", None):
        return "-"
    if "_loss_function" in mod.__dict__:
        return "its loss_function was set by the user"
    return ""


def skip_logits_loss(logits: Tensor, labels: Tensor, vocab_size: int, **kwargs: Any) -> Tensor:
    """The loss_function of a logit-free HF model: in a logit-free call, the loss the head returned
    (as `logits`); otherwise transformers' ForCausalLMLoss on fastlayers.cross_entropy."""
    pending = getattr(_ACTIVE, "pending", None)
    if pending is None:
        from .loss import causal_lm_loss
        return causal_lm_loss(logits, labels, vocab_size, **kwargs)
    if pending.loss is None or logits is not pending.loss or labels is not pending.labels:
        raise RuntimeError("fastlayers.swap(skip_logits=True): the model's forward did not pass its head's output "
                           "and its labels to loss_function as it did when swapped; swap it without skip_logits")
    return logits


_ACTIVE = threading.local()


def _hf_forward(self, *args: Any, **kwargs: Any) -> Any:
    """A logit-free HF causal LM's forward (module docstring)."""
    base = type(self).fastlayers_original_class
    if not self.training:
        return base.forward(self, *args, **kwargs)
    sig = _signature(base)
    try:
        bound = sig.bind(self, *args, **kwargs)
    except TypeError:
        return base.forward(self, *args, **kwargs)
    labels = bound.arguments.get("labels")
    if labels is None:
        return base.forward(self, *args, **kwargs)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    head = getattr(self, type(self).fastlayers_head)
    pending = _Pending(labels, bound.arguments.get(var_kw, {}) if var_kw else {})
    outer = getattr(_ACTIVE, "pending", None)
    _ACTIVE.pending = pending
    head.__dict__["_fastlayers_pending"] = pending
    try:
        out = base.forward(self, *args, **kwargs)
    finally:
        _ACTIVE.pending = outer
        head.__dict__.pop("_fastlayers_pending", None)
    if pending.loss is None:
        raise RuntimeError("fastlayers.swap(skip_logits=True): the model's forward did not call its head")
    if isinstance(out, tuple):  # (loss, logits, ...): as to_tuple() drops a None field
        return out[:1] + out[2:] if len(out) > 1 and out[1] is pending.loss else out
    if getattr(out, "logits", None) is pending.loss:
        fields = {k: v for k, v in out.items() if k != "logits"}
        out = type(out)(**fields)
    return out


_SIGNATURES: Dict[type, inspect.Signature] = {}


def _signature(base: type) -> inspect.Signature:
    sig = _SIGNATURES.get(base)
    if sig is None:
        sig = _SIGNATURES[base] = inspect.signature(base.forward)
    return sig


# ----------------------------------------------------------------------------- nanoGPT style
def _nanogpt_forward(self, *args: Any, **kwargs: Any) -> Any:
    cls = type(self)
    if self.training:
        return cls.fastlayers_training_forward(self, *args, **kwargs)
    return cls.fastlayers_other_forward(self, *args, **kwargs)


def _other_forward(base: type) -> types.FunctionType:
    """The forward outside training: the one swap gives without skip_logits (a copy reading
    fastlayers.cross_entropy, swap/loss.py) where it would, else the class's own."""
    from .loss import redirect_plan, redirected_class
    from .tracing import _global_values
    if redirect_plan(base.forward)[0] and not _global_values(base.__new__(base)):
        return redirected_class(base).forward
    return base.forward


# ----------------------------------------------------------------------------- the model classes
_MODELS: Dict[type, Tuple[Optional[type], str]] = {}


def model_class(base: type) -> type:
    cls = _plan(base)[0]
    if cls is None:
        raise RuntimeError(f"fastlayers.swap: {base.__qualname__} cannot be made logit-free")
    return cls


def _plan(base: type, heads: Tuple[str, ...] = ("lm_head",), hf: Optional[bool] = None) -> Tuple[Optional[type], str]:
    """(subclass, '') or (None, why not); cached per class (heads / hf only matter on first use)."""
    if base in _MODELS:
        return _MODELS[base]
    if hf is None:
        hf = isinstance(getattr(base, "loss_function", None), property)
    if hf:
        head, why = hf_plan(base, heads)
        cls = None if head is None else make_subclass(base, _hf_forward, _reduce_model, fastlayers_head=head)
    else:
        fwd, head, why = nanogpt_plan(base, heads)
        cls = None if fwd is None else make_subclass(base, _nanogpt_forward, _reduce_model, fastlayers_head=head,
                                                     fastlayers_training_forward=fwd,
                                                     fastlayers_other_forward=_other_forward(base))
    _MODELS[base] = (cls, why)
    return cls, why


def _head_ok(sw, head: nn.Module) -> str:
    if not fusable_linear(head):
        return f"{type(head).__name__} is not a plain nn.Linear / FusedLinear"
    if hooks(head):
        return "it has hooks registered (they would see the loss, not the logits)"
    if sw.refs[id(head)] > 1:
        return "the head module is shared by several modules"
    return ""


def apply(sw, prefix: str, mod: nn.Module) -> bool:
    """Make mod logit-free in training when it is an HF causal LM / a nanoGPT-style forward; True
    if it was (or was decided: the reason is in the report)."""
    base = type(mod)
    if getattr(base, "fastlayers_head", None) is not None:
        return True  # swapped before
    heads = tuple(n for n, c in mod._modules.items() if isinstance(c, nn.Linear))
    if not heads:
        return False
    hf_why = _is_for_causal_lm_loss(mod)
    if hf_why == "-" and isinstance(getattr(base, "loss_function", None), property):
        return False  # an HF model that is not a causal LM
    hf = hf_why != "-"
    if hasattr(base, "fastlayers_original_class"):
        if hf or nanogpt_plan(base, heads)[0] is not None:
            sw.report.left.append((path_name(prefix), "skip_logits: its forward was already rewritten by swap"))
            return hf
        return False
    if hf and hf_why:
        sw.report.left.append((path_name(prefix), f"skip_logits: {hf_why}"))
        return False
    cls, why = _plan(base, heads, hf)
    if cls is None:
        if why:
            sw.report.left.append((path_name(prefix), f"skip_logits: {why}"))
        return False
    head_name = cls.fastlayers_head
    head = mod._modules[head_name]
    why = _head_ok(sw, head)
    if hf and head.out_features != mod.config.vocab_size:
        why = why or f"{head_name} has {head.out_features} outputs, the config's vocab_size is {mod.config.vocab_size}"
    if why:
        sw.report.left.append((join(prefix, head_name), f"skip_logits: {why}"))
        return False
    if sw.linears and type(head) is nn.Linear:  # as swap makes every plain Linear (the same Parameters)
        head = fused_linear(head, "none", 0.0)
        setattr(mod, head_name, head)
    head.__class__ = head_class(type(head))
    mod.__class__ = cls
    if hf:
        mod.loss_function = skip_logits_loss
    sw.loss_heads.add(id(head))
    sw.why_left.pop(id(head), None)
    sw.report.losses.append((join(prefix, head_name), f"{base.__name__}.forward in training with "
                             f"{'labels' if hf else 'targets'} (returns no logits)", FUSED))
    return True


__all__ = ["apply", "head_loss", "skip_logits_loss", "head_class", "model_class"]
