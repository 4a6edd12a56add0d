"""fl.swap on Hugging Face models with eager attention: the score softmax runs fastlayers'
attention_softmax (swap/attention.py) only in the swapped model, with the original's outputs, loss,
gradients and attention probabilities."""
import importlib

import pytest
import torch

import fastlayers as fl
from fastlayers.ops import attention_softmax as A

from conftest import assert_close_fp32

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
}


def tiny(family, attn="eager", seed=0):
    cfg_name, cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn,
                                          **extra)
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(cfg)


def _copy(model):
    twin = type(model)(model.config).to(model.dtype)  # shares the config object: must keep "eager"
    twin.load_state_dict(model.state_dict())
    return twin


def _run(model, ids, mask):
    out = model(ids, attention_mask=mask, labels=ids, output_attentions=True)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_swapped_equals_eager(family, monkeypatch):
    model = tiny(family)
    original = _copy(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: fully masked query rows in HF's min-valued mask
    fl.swap(model)
    report = model.fastlayers_swap_report
    assert sum(path.endswith(".attention") for path, _ in report.replaced) == 2, str(report)
    assert model.config._attn_implementation == "fastlayers"
    assert original.config._attn_implementation == "eager"  # the shared config object is untouched
    assert all(m.config is model.config for m in model.modules() if hasattr(m, "config"))

    calls = []
    real = A.attention_softmax
    SA = importlib.import_module("fastlayers.swap.attention")  # (fl.swap is the function)
    monkeypatch.setattr(SA, "attention_softmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    with fl.use_backend("cpp"):  # the fused kernels at every size
        out, grads = _run(model, ids, mask)
    assert len(calls) == 2
    calls.clear()
    ref, ref_grads = _run(original, ids, mask)
    assert not calls, "the unswapped model (same config object, same class) must stay eager"
    assert_close_fp32(out.logits, ref.logits, 32, "logits")
    assert_close_fp32(out.loss, ref.loss, 32, "loss")
    assert len(out.attentions) == len(ref.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close_fp32(a, b, 9, "attentions")
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert_close_fp32(grads[name], ref_grads[name], 64, f"grad {name}")


def test_bf16_probabilities_match_eager_closely():
    model = tiny("llama").to(torch.bfloat16)
    original = _copy(model)
    fl.swap(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), fl.use_backend("reference"):  # the composite: Hugging Face's expression, bit for bit
        a = model(ids, output_attentions=True).attentions
    with torch.no_grad():
        b = original(ids, output_attentions=True).attentions
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_sdpa_models_untouched():
    model = tiny("llama", attn="sdpa")
    fl.swap(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(path.endswith(".attention") for path, _ in model.fastlayers_swap_report.replaced)


def test_gpt2_and_bert_left_alone_with_reason():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                                               bos_token_id=0, eos_token_id=0,
                                                               attn_implementation="eager"))
    fl.swap(gpt2)
    assert gpt2.config._attn_implementation == "eager"
    left = dict(gpt2.fastlayers_swap_report.left)
    assert "eager attention kept" in left["transformer.h.0.attn"]
    bert = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=4, intermediate_size=64,
                                                                attn_implementation="eager"))
    fl.swap(bert)
    assert bert.config._attn_implementation == "eager"
    assert any("eager attention kept" in why for _, why in bert.fastlayers_swap_report.left)


def test_probe_rejects_a_different_formula(monkeypatch):
    """An eager function that differs from Llama's (here: no float32 upcast, GPT-2's softmax) is left
    alone by the behaviour probe."""
    import transformers.models.llama.modeling_llama as L

    def other(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = L.repeat_kv(key, module.num_key_value_groups)
        v = L.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, -1) * 1.0001
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(L, "eager_attention_forward", other)
    model = tiny("llama")
    fl.swap(model)
    assert model.config._attn_implementation == "eager"
    assert any("differs from Llama's" in why for _, why in model.fastlayers_swap_report.left)
