"""fastlayers.swap points forwards that call PyTorch's scaled_dot_product_attention at
fastlayers.scaled_dot_product_attention (swap/sdpa.py): nanoGPT's attention among them; losses,
gradients and training equal to the original model's; copies, pickling and later changes keep
working; forwards it must not recompile are left alone with the reason."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as from_imported_sdpa

import fastlayers as fl
from fastlayers.ops import attention as A

import nanogpt_model
from conftest import assert_close_fp32


def _gpt(n_embd=64, n_head=4, dropout=0.0):
    torch.manual_seed(0)
    cfg = nanogpt_model.GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=n_head, n_embd=n_embd,
                                  dropout=dropout, bias=True)
    return nanogpt_model.GPT(cfg)


def _batch(n=3, t=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 65, (n, t), generator=g)
    return ids, torch.roll(ids, -1, 1)


def _spy(monkeypatch):
    calls = []
    real = A.AttentionFunction.apply
    monkeypatch.setattr(A.AttentionFunction, "apply", lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.mark.parametrize("skip_logits", [False, True])
def test_nanogpt_attention_uses_the_fused_kernels(monkeypatch, skip_logits):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    model, ref = _gpt(), _gpt()
    fl.swap(model, skip_logits=skip_logits)
    report = model.fastlayers_swap_report
    assert [p for p, _ in report.attention] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert "fastlayers.scaled_dot_product_attention" in str(report)
    attn = model.transformer.h[0].attn
    assert type(attn).__name__ == "CausalSelfAttention" and isinstance(attn, nanogpt_model.CausalSelfAttention)
    assert model.state_dict().keys() == ref.state_dict().keys()
    calls = _spy(monkeypatch)
    ids, tg = _batch()
    _, loss = model(ids, tg)
    _, ref_loss = ref(ids, tg)
    assert len(calls) == 2  # one per layer: the kernels, not PyTorch's function
    loss.backward()
    ref_loss.backward()
    assert_close_fp32(loss, ref_loss, 64, "loss")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close_fp32(p.grad, q.grad, 32 * 3, name)
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert_close_fp32(model(ids)[0], ref(ids)[0], 64, "eval logits")


def test_nanogpt_training_follows_the_original(monkeypatch):
    """Train, evaluate, train again: the swapped model's losses track the original's step by step."""
    model, ref = _gpt(), _gpt()
    fl.swap(model, skip_logits=True)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (model, ref)]
    losses = [[], []]
    for step in range(12):
        ids, tg = _batch(seed=0)  # one batch: the loss must fall
        for i, (m, opt) in enumerate(zip((model, ref), opts)):
            m.train(step != 6)
            if step == 6:  # an evaluation in between
                with torch.no_grad():
                    losses[i].append(m(ids, tg)[1].item())
                continue
            _, loss = m(ids, tg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-4)


def test_copies_pickles_and_dropout():
    model = _gpt(dropout=0.1)
    fl.swap(model)
    ids, tg = _batch()
    model.eval()
    want = model(ids, tg)[1]
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(other.transformer.h[0].attn) is type(model.transformer.h[0].attn)
        assert torch.equal(other(ids, tg)[1], want)
    # in training, dropout_p > 0: PyTorch's own function, the same random stream as the original
    ref = _gpt(dropout=0.1)
    model.train()
    ref.train()
    torch.manual_seed(5)
    a = model.transformer.h[0].attn(torch.randn(2, 8, 64))
    torch.manual_seed(5)
    b = ref.transformer.h[0].attn(torch.randn(2, 8, 64))
    assert torch.equal(a, b)


class Spelled(nn.Module):
    """The three spellings of PyTorch's function, and a local variable of that name that is not it."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        b = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        c = from_imported_sdpa(q, k, v, is_causal=True, scale=0.2)
        scaled_dot_product_attention = lambda *t, **kw: t[0]  # noqa: E731  (not PyTorch's: kept)
        d = scaled_dot_product_attention(q, k, v)
        return a + b + c + d


def test_every_spelling_is_redirected(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    torch.manual_seed(0)
    m = Spelled()
    ref = copy.deepcopy(m)
    fl.swap(m)
    assert m.fastlayers_swap_report.attention == [("<model>", "Spelled.forward: 3 call(s)")]
    calls = _spy(monkeypatch)
    x = torch.randn(2, 20, 32)
    assert_close_fp32(m(x), ref(x), 32, "out")
    assert len(calls) == 2  # the two causal calls: the not-causal one is PyTorch's function (faster there)


def _closure_module():
    scale = 0.5

    class Closure(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return Closure()


class WithSuper(nn.Module):
    def forward(self, q, k, v):
        super().forward  # noqa: B018  (reads __class__: a closure cell)
        return F.scaled_dot_product_attention(q, k, v)


class Plain(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_left_alone_with_the_reason():
    model = nn.ModuleDict({"closure": _closure_module(), "super": WithSuper(), "instance": Plain()})
    model["instance"].forward = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    classes = {n: type(m) for n, m in model.items()}
    fl.swap(model)
    left = dict(model.fastlayers_swap_report.left)
    assert "closure variables" in left["closure"] and "closure variables" in left["super"]
    assert "set on the instance" in left["instance"]
    assert {n: type(m) for n, m in model.items()} == classes
    q = torch.randn(1, 2, 5, 16)
    assert torch.equal(model["closure"](q, q, q), F.scaled_dot_product_attention(q, q, q, scale=0.5))


def test_changes_after_swap_still_apply():
    """The new forward calls the module's children and reads its attributes live: a hook or a
    replaced child added after swap takes effect."""
    model, ref = _gpt(), _gpt()
    fl.swap(model, linears=False)
    seen = []
    model.transformer.h[0].attn.c_proj.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    model.transformer.h[1].attn.c_attn = nn.Linear(64, 192)
    ref.transformer.h[1].attn.c_attn = model.transformer.h[1].attn.c_attn
    ids, tg = _batch()
    assert_close_fp32(model(ids, tg)[1], ref(ids, tg)[1], 64, "loss")
    assert seen == [torch.Size([3, 32, 64])]
