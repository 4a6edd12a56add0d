"""Eager attention's score softmax, fused, in Hugging Face models (transformers 5.x).

Their attention modules call
    ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
with a module-level ``eager_attention_forward`` per modeling file. swap registers
:func:`fastlayers_attention_forward` under the name ``"fastlayers"`` in transformers'
AttentionInterface (and eager's mask function under the same name in AttentionMaskInterface, so
the model builds the very masks it built for "eager"), and points a model at it by giving the model
**its own copy** of its config with ``_attn_implementation = "fastlayers"``: every module of the
model that held the old config object holds the copy. Another model sharing that config object
(``ModelB(modelA.config)``), or of the same class, keeps "eager"; registering a name changes nothing
for models that do not ask for it.

Only where the model's eager function is Llama's (Llama, Mistral, Qwen2 and the many families that
copy it): ``softmax(q @ k^T * scaling + mask, dim=-1, dtype=float32).to(q.dtype)``, k / v repeated
``num_key_value_groups`` times, dropout on the probabilities, ``(p @ v).transpose(1, 2).contiguous()``,
returning the probabilities. Checked by behaviour, as swap/norms.py checks RMSNorm: the module's own
eager function and fastlayers' are run on probe inputs (float32 and bfloat16, with an additive causal
mask and without, fastlayers' side on its reference backend) and must agree bit for bit, and a call
with ``scaling=None`` must fail in both (GPT-2's and BERT's eager functions default the scaling and
softmax in the scores' own dtype; GPT-2's module also branches on ``_attn_implementation == "eager"``:
they are left alone, the reason in the report). Configs whose attention is not "eager" (sdpa, flash)
are not touched.

After swap, ``model.config`` is the copy (a reference taken before swap still sees "eager").
A boolean 4-D attention mask handed to the model is added as 0 / 1, as eager's ``+`` does.
"""
from __future__ import annotations

import copy
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import use_backend
from ..ops.attention_softmax import attention_softmax
from .report import SwapReport

NAME = "fastlayers"


def _repeat_kv(h: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * groups, L, D), as transformers' repeat_kv."""
    if groups == 1:
        return h
    b, hkv, n, d = h.shape
    return h[:, :, None, :, :].expand(b, hkv, groups, n, d).reshape(b, hkv * groups, n, d)


def fastlayers_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0,
                                 **kwargs):
    """Llama's eager_attention_forward with the score softmax fused (fastlayers.attention_softmax:
    the scale, the mask add and the float32 softmax in one pass each way, saving only the
    probabilities). Same arguments and returns (attn_output, attn_weights)."""
    groups = getattr(module, "num_key_value_groups", 1)
    key_states = _repeat_kv(key, groups)
    value_states = _repeat_kv(value, groups)
    scores = torch.matmul(query, key_states.transpose(2, 3))
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = attention_mask.to(scores.dtype)  # eager adds a bool mask as 0 / 1
    attn_weights = attention_softmax(scores, scaling, attention_mask).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


_registered: List[bool] = []


def _register() -> bool:
    """Register NAME with transformers (once); False when transformers has no such interfaces."""
    if _registered:
        return _registered[0]
    try:
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        _registered.append(False)
        return False
    AttentionInterface.register(NAME, fastlayers_attention_forward)
    AttentionMaskInterface.register(NAME, eager_mask)
    _registered.append(True)
    return True


def _eager_problem(m: nn.Module, fn) -> Optional[str]:
    """None when fn (the module's eager_attention_forward) computes what fastlayers' does."""
    name = type(m).__name__
    p = next(iter(m.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    if device.type == "meta":
        return f"{name}: parameters on the meta device (its attention function cannot be probed)"
    groups = getattr(m, "num_key_value_groups", 1)
    if not isinstance(groups, int) or groups < 1:
        return f"{name}: num_key_value_groups is not a positive int"
    gen = torch.Generator(device="cpu").manual_seed(0)
    hkv, L, D = 2, 5, 8

    def rnd(*shape, dtype):
        return (torch.randn(*shape, generator=gen) * 2).to(device=device, dtype=dtype)

    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = rnd(1, hkv * groups, L, D, dtype=dtype), rnd(1, hkv, L, D, dtype=dtype), rnd(1, hkv, L, D, dtype=dtype)
            mask = torch.full((L, L), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]
            mask[..., 0, 1:] = 0.0  # not only the causal pattern
            for msk in (mask, None):
                try:
                    want = fn(m, q, k, v, msk, 0.35, 0.0)
                except Exception as e:  # noqa: BLE001 - any failure: not the standard function
                    return f"{name}: its eager_attention_forward failed on a probe input ({type(e).__name__})"
                with use_backend("reference"):
                    got = fastlayers_attention_forward(m, q, k, v, msk, 0.35, 0.0)
                if (not isinstance(want, tuple) or len(want) != 2
                        or any(not isinstance(w, torch.Tensor) or w.dtype != g.dtype or w.shape != g.shape
                               or w.stride() != g.stride() or not torch.equal(w, g)
                               for w, g in zip(want, got))):
                    return (f"{name}: its eager_attention_forward differs from Llama's on {dtype} probes "
                            "(another formula, rounding or layout)")
        try:
            fn(m, q, k, v, None, None, 0.0)
        except Exception:  # noqa: BLE001 - Llama's: scaling is required
            return None
    return (f"{name}: its eager_attention_forward defaults scaling (scaling=None works): GPT-2 / BERT's "
            "variant (softmax in the scores' dtype), not Llama's")


def _module_configs(model: nn.Module) -> Dict[int, object]:
    out = {}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            out[id(cfg)] = cfg
    return out


def swap_attention(model: nn.Module, report: SwapReport) -> None:
    """Point model's eager attention at fastlayers_attention_forward (see the module docstring);
    entries go to report.replaced ("<path>.attention", the function) and report.left."""
    candidates: Dict[int, list] = {}  # id(config) -> [(path, module, eager fn)]
    for path, mod in model.named_modules():
        cfg = getattr(mod, "config", None)
        fn = getattr(sys.modules.get(type(mod).__module__), "eager_attention_forward", None)
        if cfg is None or fn is None or not callable(fn) or not type(mod).__name__.endswith("Attention"):
            continue
        if getattr(cfg, "_attn_implementation", None) != "eager":
            continue
        candidates.setdefault(id(cfg), []).append((path, mod, fn))
    if not candidates or not _register():
        return
    configs = _module_configs(model)
    for key, mods in candidates.items():
        cfg = configs[key]
        problems = [(path, why) for path, mod, fn in mods if (why := _eager_problem(mod, fn)) is not None]
        if not problems and any(getattr(other, k, None) is cfg for other in configs.values() if other is not cfg
                                for k in getattr(other, "sub_configs", {})):
            problems = [(mods[0][0], "its config is a sub-config of another config of the model (not handled)")]
        if problems:
            report.left += [(path, f"eager attention kept: {why}") for path, why in problems]
            continue
        new_cfg = copy.deepcopy(cfg)
        new_cfg._attn_implementation = NAME
        for mod in model.modules():
            if getattr(mod, "config", None) is cfg:
                mod.config = new_cfg
        report.replaced += [(f"{path}.attention", "fastlayers.attention_softmax (attn_implementation='fastlayers')")
                            for path, _, _ in mods]
