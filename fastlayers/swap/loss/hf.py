"""Hugging Face causal LMs: the model's loss_function (transformers' ForCausalLMLoss) computed by
fastlayers.cross_entropy."""
from __future__ import annotations

import inspect
import sys
import types
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops.cross_entropy import cross_entropy


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
