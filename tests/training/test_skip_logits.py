"""fastlayers.swap(model, skip_logits=True) (swap/causal_lm.py): in training with labels, Hugging Face
causal LMs and nanoGPT-style forwards compute the loss with fastlayers.linear_cross_entropy on the
head's own Parameters and return no logits; loss and every gradient equal the original model's
(conftest's fp32 rule). In eval, without labels, or without the option, the outputs are bit for
bit those of the model swapped without it. FSDP2 (2 gloo processes): the same loss and gradients."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastlayers as fl
from fastlayers.swap import causal_lm
from conftest import assert_close_fp32
from integration_helpers import backend_skip_reason, hf_causal_lm, run_gloo_rank

import nanogpt_model
import small_gpt

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
VOCAB = 101


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _hf(name):
    return _gpt2() if name == "gpt2" else hf_causal_lm(name)


HF = ["llama", "mistral", "qwen2", "gpt2"]


def _ids(b=2, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[0, 7] = -100
    return ids, labels


def _pair(make, **kw):
    """(model swapped with skip_logits, the same model swapped without it, the untouched original)."""
    model = make()
    orig, plain = copy.deepcopy(model), copy.deepcopy(model)
    fl.swap(model, skip_logits=True, **kw)
    fl.swap(plain, **kw)
    return model, plain, orig


def _losses(model):
    return [(path, op) for path, _, op in model.fastlayers_swap_report.losses]


def _grads_equal(model, ref, red):
    pr = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert_close_fp32(p.grad, pr[n].grad, red=red, what=n)


@pytest.mark.parametrize("name", HF)
def test_hf_training_with_labels_is_logit_free(name, monkeypatch):
    model, _, orig = _pair(lambda: _hf(name))
    assert _losses(model) == [("lm_head", "linear_cross_entropy")], str(model.fastlayers_swap_report)
    assert "returns no logits" in str(model.fastlayers_swap_report)
    assert isinstance(model, type(orig)) and type(model).__name__ == type(orig).__name__
    assert list(model.state_dict()) == list(orig.state_dict())
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    calls = []
    real = causal_lm.linear_cross_entropy
    monkeypatch.setattr(causal_lm, "linear_cross_entropy", lambda h, w, *a, **k: calls.append(w) or real(h, w, *a, **k))
    ids, labels = _ids()
    for kw in ({}, {"num_items_in_batch": torch.tensor(13)}, {"num_items_in_batch": 7}):
        model.zero_grad()
        orig.zero_grad()
        out, ref = model(ids, labels=labels, **kw), orig(ids, labels=labels, **kw)
        assert out.logits is None and ref.logits is not None
        assert out.loss.dtype == ref.loss.dtype == torch.float32
        assert_close_fp32(out.loss, ref.loss, red=64, what=f"loss {kw}")
        out.loss.backward()
        ref.loss.backward()
        _grads_equal(model, orig, 64)
        assert calls and calls[-1] is model.lm_head.weight
    # return_dict=False: the tuple without the logits, as transformers' to_tuple drops a None field
    tup, ref = model(ids, labels=labels, return_dict=False), orig(ids, labels=labels, return_dict=False)
    assert len(tup) == len(ref) - 1 and all(a is b for a, b in zip(tup[1:], (tup[1],)))
    assert_close_fp32(tup[0], ref[0], red=64, what="tuple loss")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hf_eval_no_labels_and_option_off_are_unchanged(name):
    model, plain, orig = _pair(lambda: _hf(name))
    ids, labels = _ids()
    model.train(), plain.train()
    a, b = model(ids), plain(ids)  # training without labels
    assert torch.equal(a.logits, b.logits) and a.loss is None
    model.eval(), plain.eval()
    with torch.no_grad():
        for kw in ({}, {"labels": labels}):
            a, b = model(ids, **kw), plain(ids, **kw)
            assert torch.equal(a.logits, b.logits)
            assert (a.loss is None and b.loss is None) or torch.equal(a.loss, b.loss)
        # generation (eval, logits_to_keep) runs the original path
        g1 = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
        g2 = plain.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
        assert torch.equal(g1, g2)


def test_hf_ignore_index_shift_labels_and_logits_to_keep():
    model, _, orig = _pair(lambda: _hf("llama"))
    ids, labels = _ids()
    lab4 = labels.clone()
    lab4[lab4 == -100] = 4  # a class index as ignore_index
    shifted = torch.roll(labels, -1, dims=1)
    shifted[:, -1] = -100
    for kw in ({"labels": lab4, "ignore_index": 4}, {"labels": labels, "shift_labels": shifted},
               {"labels": labels[:, -5:], "logits_to_keep": 5}, {"labels": torch.full_like(labels, -100),
                                                                 "num_items_in_batch": 1}):
        model.zero_grad()
        orig.zero_grad()
        out, ref = model(ids, **kw), orig(ids, **kw)
        assert out.logits is None
        assert_close_fp32(out.loss, ref.loss, red=64, what=str(list(kw)))
        out.loss.backward()
        ref.loss.backward()
        _grads_equal(model, orig, 64)


def test_gemma2_softcapping_is_left_alone_with_a_reason():
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg)
    orig = copy.deepcopy(model)
    fl.swap(model, skip_logits=True)
    left = dict(model.fastlayers_swap_report.left)
    assert "softcapping" in left.get("<model>", ""), str(model.fastlayers_swap_report)
    assert "transforms the logits" in left["<model>"]
    assert not any(op == "linear_cross_entropy" for _, op in _losses(model))
    ids, labels = _ids()
    out, ref = model(ids, labels=labels), orig(ids, labels=labels)
    assert out.logits is not None
    assert_close_fp32(out.loss, ref.loss, red=64, what="loss")


def test_hf_logit_free_model_copies_and_pickles():
    model, _, _ = _pair(lambda: _hf("llama"))
    ids, labels = _ids()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for m in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        out = m(ids, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, model(ids, labels=labels).loss)
    fl.swap(model, skip_logits=True)  # a second swap changes nothing
    assert not model.fastlayers_swap_report.losses, str(model.fastlayers_swap_report)


# ----------------------------------------------------------------------------- nanoGPT
def _nanogpt():
    torch.manual_seed(0)
    return nanogpt_model.GPT(nanogpt_model.GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))


def _tiny_gpt():
    torch.manual_seed(0)
    return small_gpt.GPT(vocab=VOCAB, block=32)


@pytest.mark.parametrize("make", [_nanogpt, _tiny_gpt], ids=["nanogpt", "nanogpt_style"])
def test_nanogpt_training_with_targets_is_logit_free(make):
    model, plain, orig = _pair(make)
    assert _losses(model) == [("lm_head", "linear_cross_entropy")], str(model.fastlayers_swap_report)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model, type(orig)) and list(model.state_dict()) == list(orig.state_dict())
    idx, _ = _ids(t=16)
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -1
    targets[1, :4] = -1
    logits, loss = model(idx, targets)
    ref_logits, ref_loss = orig(idx, targets)
    assert logits is None and ref_logits is not None
    assert_close_fp32(loss, ref_loss, red=128, what="loss")
    loss.backward()
    ref_loss.backward()
    _grads_equal(model, orig, 128)
    # no targets (training), eval with and without targets: bit for bit the model swapped without the option
    a, b = model(idx), plain(idx)
    assert torch.equal(a[0], b[0]) and a[1] is None
    model.eval(), plain.eval()
    with torch.no_grad():
        for args in ((idx,), (idx, targets)):
            a, b = model(*args), plain(*args)
            assert torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))


def test_nanogpt_training_follows_the_original_curve():
    model, orig = fl.swap(_nanogpt(), skip_logits=True), _nanogpt()
    curves = [small_gpt.train_losses(m, VOCAB, 8) for m in (model, orig)]
    torch.testing.assert_close(curves[0], curves[1], rtol=1e-3, atol=1e-4)


def test_nanogpt_logit_free_model_copies_and_pickles():
    model = fl.swap(_nanogpt(), skip_logits=True)
    idx, _ = _ids(t=16)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for m in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        logits, loss = m(idx, idx)
        assert logits is None
        torch.testing.assert_close(loss, model(idx, idx)[1])


class UsesLogits(small_gpt.GPT):
    def forward(self, idx, targets=None):
        x = self.transformer.ln_f(self.transformer.wte(idx))
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits.float(), loss


def test_forward_using_the_logits_is_left_alone():
    torch.manual_seed(0)
    model = fl.swap(UsesLogits(vocab=VOCAB), skip_logits=True)
    assert not any(op == "linear_cross_entropy" for _, op in _losses(model)), str(model.fastlayers_swap_report)
    idx, _ = _ids()
    assert model(idx, idx)[0] is not None


# ----------------------------------------------------------------------------- FSDP2
WORLD = 2
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def _fsdp_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return fl.swap(transformers.LlamaForCausalLM(cfg), skip_logits=True)


def _fsdp_worker(rank, store, backend, out):
    run_gloo_rank(rank, WORLD, store, backend, lambda: _fsdp_step(rank, out))


def _fsdp_step(rank, out):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    model = _fsdp_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)
    fully_shard(model)
    assert isinstance(model.lm_head.weight, DTensor)
    seen = []
    real = causal_lm.linear_cross_entropy
    causal_lm.linear_cross_entropy = lambda h, w, *a, **k: seen.append(
        (type(w).__name__, tuple(w.shape))) or real(h, w, *a, **k)
    ids, labels = _ids()  # the same batch on both ranks: FSDP's averaged gradient is the full one
    out_ = model(ids, labels=labels)
    out_.loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"loss": out_.loss.detach(), "logits": out_.logits, "grads": grads, "seen": seen}, out)


@needs_gloo
def test_fsdp2_loss_and_gradients_equal_the_unsharded_model(tmp_path):
    backend = "cpp" if backend_skip_reason("cpp") is None else "reference"
    out = str(tmp_path / "out.pt")
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "rendezvous"), backend, out), nprocs=WORLD, join=True)
    got = torch.load(out)
    # the fused loss got the full, all-gathered head weight (a plain tensor, not a sharded DTensor)
    assert got["seen"] == [("Parameter", (VOCAB, 32))] or got["seen"] == [("Tensor", (VOCAB, 32))], got["seen"]
    assert got["logits"] is None
    with fl.use_backend(backend):
        model = _fsdp_model()
        ids, labels = _ids()
        ref = model(ids, labels=labels)
        ref.loss.backward()
    assert_close_fp32(got["loss"], ref.loss.detach(), red=64, what="loss")
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_hf_bfloat16_loss_is_float32_like_transformers():
    model, _, orig = _pair(lambda: _hf("llama").to(torch.bfloat16))
    ids, labels = _ids()
    out, ref = model(ids, labels=labels), orig(ids, labels=labels)
    assert out.logits is None and out.loss.dtype == ref.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)
    out.loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16
