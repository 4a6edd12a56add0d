"""fastlayers.swap and the loss a model computes from its own head (swap/loss/): traced
forwards (F.cross_entropy / nn.CrossEntropyLoss on a Linear child's logits), Hugging Face
`*ForCausalLM` loss functions, and forwards fx cannot trace (nanoGPT's optional targets).
Swapped models are compared with untouched copies at conftest's rule for two fp32 results."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlayers as fl
from fastlayers.swap import loss as swap_loss
from fastlayers.swap.loss import calls as swap_loss_calls
from conftest import INTERPRETED, assert_close_fp32
from integration_helpers import hf_causal_lm
from small_gpt import GPT, train_losses

H, V = 16, 37


def _losses(model):
    return [(path, op) for path, _, op in model.fastlayers_swap_report.losses]


def _left(model):
    return dict(model.fastlayers_swap_report.left)


def _targets(*shape, ignore=-100, seed=1):
    t = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))
    t.view(-1)[::3] = ignore  # every third target ignored
    return t


def _swapped(make):
    """(swapped model, untouched copy) of make()'s model, made under seed 0."""
    torch.manual_seed(0)
    model = make()
    ref = copy.deepcopy(model)
    fl.swap(model)
    return model, ref


def _spy(monkeypatch, name):
    """The shapes of the first argument of each call swap/loss/calls.py makes of its `name`."""
    calls, real = [], getattr(swap_loss_calls, name)
    monkeypatch.setattr(swap_loss_calls, name, lambda *a, **k: calls.append(tuple(a[0].shape)) or real(*a, **k))
    return calls


def _check_same(model, ref, x, *rest, red=H):
    """Swapped vs original: every output (the loss, logits where returned) and every gradient."""
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, exp = model(xs, *rest), ref(xr, *rest)
    got, exp = (got, exp) if isinstance(got, tuple) else ((got,), (exp,))
    for a, b in zip(got, exp):
        assert_close_fp32(a, b, red=red, what="output")
    sum(o.sum() for o in got).backward()
    sum(o.sum() for o in exp).backward()
    assert_close_fp32(xs.grad, xr.grad, red=red, what="dx")
    pr = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close_fp32(p.grad, pr[name].grad, red=red, what=name)


# ----------------------------------------------------------------------------- traced forwards
class HeadLoss(nn.Module):
    """An MLP with a head whose logits only feed the loss (nanoGPT's spelling of the views)."""
    IGNORE = -1

    def __init__(self, bias=False):
        super().__init__()
        self.fc = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=bias)

    def forward(self, x, t):
        logits = self.head(F.gelu(self.fc(x)))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), t.view(-1), ignore_index=-1)


class DefaultIgnore(HeadLoss):
    IGNORE = -100  # F.cross_entropy's default ignore_index


class HeadLossOptions(DefaultIgnore):
    def forward(self, x, t):
        return F.cross_entropy(self.head(x).flatten(0, 1), t.reshape(-1), label_smoothing=0.1, reduction="none")


class HeadLossModule(HeadLoss):
    def __init__(self):
        super().__init__(bias=True)
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=0.05, reduction="sum")

    def forward(self, x, t):
        return self.loss_fn(self.head(x).flatten(0, 1), t.view(-1))


class ReturnsLogits(DefaultIgnore):
    def forward(self, x, t):
        logits = self.head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), t.view(-1))


@pytest.mark.parametrize("cls,bias", [(HeadLoss, False), (HeadLoss, True), (HeadLossOptions, False),
                                      (HeadLossModule, True)])
def test_head_loss_becomes_linear_cross_entropy(backend, monkeypatch, cls, bias):
    """The head's logits feed only the loss: one linear_cross_entropy on the head's Parameters,
    the head itself never called, no (tokens, vocab) logits."""
    torch.manual_seed(0)
    model = cls(bias) if cls is not HeadLossModule else cls()
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    fl.swap(model)
    assert _losses(model) == [("head", "linear_cross_entropy")], str(model.fastlayers_swap_report)
    assert "head" not in _left(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    calls = _spy(monkeypatch, "linear_cross_entropy")
    # (a hook on the head would now send the call to the original forward: calls proves the fused path ran)
    x, t = torch.randn(3, 5, H), _targets(3, 5, ignore=cls.IGNORE)
    _check_same(model, ref, x, t)
    assert calls == [(15, H)]


def test_module_loss_options_are_read_live(backend):
    """nn.CrossEntropyLoss's attributes are read at each call, as its own forward does."""
    model, ref = _swapped(HeadLossModule)
    x, t = torch.randn(2, 4, H), _targets(2, 4, ignore=3)
    for m in (model, ref):
        m.loss_fn.ignore_index, m.loss_fn.reduction = 3, "mean"
    _check_same(model, ref, x, t)
    w = torch.rand(V)
    for m in (model, ref):  # class weights: the logits are computed, the loss is still fastlayers'
        m.loss_fn.weight = w
    _check_same(model, ref, x, t)


class WeightedLoss(DefaultIgnore):
    def forward(self, x, t, w):
        return F.cross_entropy(self.head(x).flatten(0, 1), t.view(-1), weight=w)


class LogitsUsedTwice(DefaultIgnore):
    def forward(self, x, t):
        logits = self.head(x)
        return F.cross_entropy(logits.flatten(0, 1), t.view(-1)) + logits.pow(2).mean()


class HeadCalledTwice(DefaultIgnore):
    def forward(self, x, t):
        return F.cross_entropy(self.head(x).flatten(0, 1), t.view(-1)) + self.head(x).mean()


class NotFromAHead(DefaultIgnore):
    def forward(self, x, t):
        return F.cross_entropy(self.head(x).flatten(0, 1) * 2, t.view(-1))


class ProbabilityTargets(DefaultIgnore):
    def forward(self, x, q):
        return F.cross_entropy(self.head(x).flatten(0, 1), q.flatten(0, 1))


def _hooked():
    m = HeadLoss()
    m.head.register_forward_hook(lambda *a: None)
    return m


CE_ONLY = [
    (lambda: ReturnsLogits(), "the logits are also used by the forward's return value", lambda t: (t,)),
    (lambda: WeightedLoss(), "class weights (weight=) are given", lambda t: (t, torch.rand(V))),
    (lambda: LogitsUsedTwice(), "the logits are also used by .pow()", lambda t: (t,)),
    (lambda: HeadCalledTwice(), "called 2 times", lambda t: (t,)),
    (lambda: NotFromAHead(), "its input is not a Linear child's output", lambda t: (t,)),
    (_hooked, "has hooks registered", lambda t: (t,)),
]


@pytest.mark.parametrize("make,why,args", CE_ONLY,
                         ids=["returned", "weight", "logits-used", "head-twice", "not-a-head", "hooks"])
def test_loss_not_fused_with_the_head_is_still_fastlayers(backend, monkeypatch, make, why, args):
    """Where the head's logits are needed anyway (returned, used, class weights...), only the loss
    call becomes fastlayers'; the report says why the head was not fused into it."""
    model, ref = _swapped(make)
    rep = model.fastlayers_swap_report
    assert _losses(model) == [("<model>", "cross_entropy")], str(rep)
    assert why in rep.losses[0][1], str(rep)
    calls = _spy(monkeypatch, "cross_entropy")
    _check_same(model, ref, torch.randn(2, 5, H), *args(_targets(2, 5, ignore=model.IGNORE)))
    assert calls == [(10, V)]


def test_probability_targets_fall_back_at_run_time(backend):
    """Class-probability targets cannot be seen when swapping: the fused call computes the logits."""
    model, ref = _swapped(ProbabilityTargets)
    assert _losses(model) == [("head", "linear_cross_entropy")]
    _check_same(model, ref, torch.randn(2, 5, H), torch.softmax(torch.randn(2, 5, V), -1))


class ReadsVocab(DefaultIgnore):
    def __init__(self):
        super().__init__()
        self.vocab = V

    def forward(self, x, t):
        return F.cross_entropy(self.head(x).view(-1, self.vocab), t.view(-1))


class SubclassLoss(nn.CrossEntropyLoss):
    pass


class SubclassLossModel(DefaultIgnore):
    def __init__(self):
        super().__init__()
        self.loss_fn = SubclassLoss()

    def forward(self, x, t):
        return self.loss_fn(self.head(x).flatten(0, 1), t.view(-1))


SCALE = 1.0


class ReadsGlobal(DefaultIgnore):
    def forward(self, x, t=None):
        return F.cross_entropy(self.head(x).flatten(0, 1) * SCALE, t.view(-1))


class LongSpelling(DefaultIgnore):
    def forward(self, x, t=None):
        return torch.nn.functional.cross_entropy(self.head(x).flatten(0, 1), t.view(-1))


class FrozenModuleLoss(HeadLossModule):
    def forward(self, x, t):
        return self.loss_fn(self.head(x).reshape(-1, V), t.view(-1))


LEFT = [(SubclassLossModel, "<model>", "loss loss_fn: loss_fn is a subclass of nn.CrossEntropyLoss"),
        (FrozenModuleLoss, "<model>", "loss loss_fn (CrossEntropyLoss): FrozenModuleLoss.forward reads global"),
        (ReadsGlobal, "<model>", "reads global or closure value(s) (SCALE)"),
        (LongSpelling, "<model>", "it reaches cross_entropy as torch.nn.functional.cross_entropy")]


@pytest.mark.parametrize("cls,path,why", LEFT, ids=[c[0].__name__ for c in LEFT])
def test_losses_left_alone_with_a_reason(backend, cls, path, why):
    model, ref = _swapped(cls)
    rep = model.fastlayers_swap_report
    assert not rep.losses, str(rep)
    assert why in _left(model)[path], str(rep)
    _check_same(model, ref, torch.randn(2, 5, H), _targets(2, 5, ignore=model.IGNORE))


def test_replaced_torch_cross_entropy_is_left_alone(backend, monkeypatch):
    """Someone else's F.cross_entropy (installed in torch's place) is theirs: not redirected."""
    theirs = lambda *a, **k: torch.zeros(())  # noqa: E731
    monkeypatch.setattr(F, "cross_entropy", theirs)
    model = fl.swap(_gpt())
    assert not model.fastlayers_swap_report.losses, str(model.fastlayers_swap_report)
    assert "is not PyTorch's own" in _left(model)["<model>"]
    idx = _targets(2, 5).clamp(min=0)
    assert model(idx, idx)[1] is not None and float(model(idx, idx)[1]) == 0.0


def test_forward_reading_state_gets_a_redirected_copy(backend):
    """A traced forward that reads Python state is not rewritten; its F.cross_entropy is
    redirected in a copy of the forward instead (the state is still read live)."""
    model, ref = _swapped(ReadsVocab)
    assert _losses(model) == [("<model>", "cross_entropy")], str(model.fastlayers_swap_report)
    assert type(model).__name__ == "ReadsVocab" and isinstance(model, ReadsVocab)
    _check_same(model, ref, torch.randn(2, 5, H), _targets(2, 5, ignore=model.IGNORE))


# ----------------------------------------------------------------------------- nanoGPT style
def _gpt():
    torch.manual_seed(0)
    return GPT()


def test_nanogpt_style_loss_and_mlps(backend):
    model = _gpt()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    fl.swap(model)
    rep = model.fastlayers_swap_report
    assert _losses(model) == [("<model>", "cross_entropy")], str(rep)
    assert [f[0] for f in rep.fused] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"], str(rep)
    assert model.lm_head.weight is model.transformer.wte.weight  # tying kept
    assert list(model.state_dict()) == keys and isinstance(model, GPT)
    idx, tgt = _targets(2, 9, ignore=-1).clamp(min=0), _targets(2, 9, ignore=-1, seed=2)
    got, exp = model(idx, tgt), ref(idx, tgt)
    assert_close_fp32(got[0], exp[0], red=4 * H, what="logits")
    assert_close_fp32(got[1], exp[1], red=4 * H, what="loss")
    got[1].backward()
    exp[1].backward()
    pr = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close_fp32(p.grad, pr[name].grad, red=4 * H, what=name)
    assert_close_fp32(model(idx)[0], ref(idx)[0], red=4 * H, what="generation logits")
    assert model(idx)[1] is None


def test_nanogpt_style_redirected_forward_survives_copies(backend, monkeypatch):
    """deepcopy and torch.save / load rebuild the redirected forward; a second swap changes nothing."""
    model = _gpt()
    fl.swap(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for m in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        calls = _spy(monkeypatch, "cross_entropy")
        idx = _targets(2, 5).clamp(min=0)
        torch.testing.assert_close(m(idx, idx)[1], model(idx, idx)[1])
        assert len(calls) == 2 and m.lm_head.weight is m.transformer.wte.weight
        monkeypatch.undo()
    fl.swap(model)
    assert not model.fastlayers_swap_report.losses, str(model.fastlayers_swap_report)


def test_nanogpt_style_training_follows_the_original_curve(backend):
    if backend == "triton" and INTERPRETED:
        pytest.skip("20 training steps through the Triton interpreter take ~30 s (4x the cpp run); the kernels' "
                    "correctness is the op suites' job (this test runs on a GPU)")
    ref, model = _gpt(), fl.swap(_gpt())
    ref_l, our_l = train_losses(ref, V, 20), train_losses(model, V, 20)
    # fp32 round-off compounds over the AdamW steps: the curves agree to 1e-3 relative + 1e-4
    torch.testing.assert_close(our_l, ref_l, rtol=1e-3, atol=1e-4)
    assert our_l[-5:].mean() < our_l[:5].mean()  # it learned


# ----------------------------------------------------------------------------- Hugging Face
def test_hf_llama_fuses_every_mlp_and_the_loss(backend):
    model = hf_causal_lm("llama")
    ref = copy.deepcopy(model)
    fl.swap(model)
    rep = model.fastlayers_swap_report
    assert len(rep.gated) == model.config.num_hidden_layers, str(rep)
    assert _losses(model) == [("<model>", "cross_entropy")], str(rep)
    assert model.loss_function is swap_loss.causal_lm_loss
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    for kw in ({}, {"num_items_in_batch": torch.tensor(11)}):
        model.zero_grad()
        ref.zero_grad()
        out, outr = model(ids, labels=labels, **kw), ref(ids, labels=labels, **kw)
        assert_close_fp32(out.logits, outr.logits, red=72, what="logits")
        assert_close_fp32(out.loss, outr.loss, red=72, what="loss")
        out.loss.backward()
        outr.loss.backward()
        pr = dict(ref.named_parameters())
        for n, p in model.named_parameters():
            assert_close_fp32(p.grad, pr[n].grad, red=72, what=n)
    copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_lm_loss_equals_transformers(dtype):
    """causal_lm_loss against transformers' own ForCausalLMLoss, every argument form."""
    loss_utils = pytest.importorskip("transformers.loss.loss_utils", reason="transformers is not installed")
    torch.manual_seed(0)
    logits = torch.randn(2, 7, V, dtype=dtype)
    shifted = _targets(2, 7, seed=4)
    for kw in ({}, {"num_items_in_batch": 9}, {"num_items_in_batch": torch.tensor(5)}, {"shift_labels": shifted},
               {"ignore_index": 4}, {"some_other_kwarg": 1}):
        labels = _targets(2, 7, ignore=kw.get("ignore_index", -100))
        a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        got = swap_loss.causal_lm_loss(a, labels, V, **kw)
        exp = loss_utils.ForCausalLMLoss(b, labels, V, **kw)
        assert got.dtype == exp.dtype == torch.float32
        assert_close_fp32(got, exp, red=V, what=str(kw))
        got.backward()
        exp.backward()
        assert a.grad.dtype == dtype
        if dtype == torch.float32:
            assert_close_fp32(a.grad, b.grad, red=V, what=f"dlogits {kw}")
        else:  # both the float32 gradient rounded to bf16
            torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"dlogits {kw}: {m}")
