"""fastlayers.swap fuses the residual add in front of a norm (swap/residual.py) where the forward is
traceable, keeps outputs, loss and gradients, reports what it fused and why not, and honours hooks and
module replacements made after swap."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlayers as fl
from fastlayers.ops import norms as _norms_mod
from fastlayers.swap.residual import add_norm

import nanogpt_model
from integration_helpers import assert_same_grads, small_model

transformers = pytest.importorskip("transformers")


# norm paths whose residual add is fused, and modules left alone with (a part of) the reason
_FUSED = {
    "bert": [f"bert.encoder.layer.{i}.{s}.LayerNorm" for i in range(2) for s in ("attention.output", "output")],
    "nanogpt": [f"transformer.h.{i}.ln_2" for i in range(2)],
}
_LEFT = {  # decoder layers: optional arguments, caches, **kwargs: not traced (see swap/residual.py)
    "llama": ("model.layers.0.post_attention_layernorm", "optional argument"),
    "mistral": ("model.layers.1.post_attention_layernorm", "optional argument"),
    "qwen2": ("model.layers.0.post_attention_layernorm", "optional argument"),
    "gpt2": ("transformer.h.0.ln_2", "optional argument"),
}


class _Count:
    """Counts fastlayers.layer_norm / rms_norm calls given a residual (what the norm modules call),
    and the modules' small-call fast path taken with one (_small_cpu_norm, which does not call them)."""

    def __init__(self, monkeypatch):
        self.n = 0
        fast = _norms_mod._small_cpu_norm

        def counting_fast(x, weight, bias, residual, *a):
            out = fast(x, weight, bias, residual, *a)
            self.n += out is not None and residual is not None
            return out
        monkeypatch.setattr(_norms_mod, "_small_cpu_norm", counting_fast)
        for name, at in (("layer_norm", 5), ("rms_norm", 3)):  # residual's position in each signature
            orig = getattr(_norms_mod, name)

            def counting(*a, __orig=orig, __at=at, **k):
                if k.get("residual", a[__at] if len(a) > __at else None) is not None:
                    self.n += 1
                return __orig(*a, **k)
            monkeypatch.setattr(_norms_mod, name, counting)


def _randomise_norms(model):
    with torch.no_grad():  # their init is ones / zeros: a wrong weight or bias would hide
        for m in model.modules():
            if "Norm" in type(m).__name__:
                if isinstance(getattr(m, "weight", None), torch.Tensor):
                    m.weight.normal_(1.0, 0.2)
                if isinstance(getattr(m, "bias", None), torch.Tensor):
                    m.bias.normal_(0.0, 0.2)


def _run(model, name, ids):
    if name == "nanogpt":
        logits, loss = model(ids, ids)
        return logits, loss
    out = model(input_ids=ids, labels=ids)
    return out.logits, out.loss


def _check_same(model, ref, name, ids):
    logits, loss = _run(model, name, ids)
    logits_r, loss_r = _run(ref, name, ids)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, logits_r, rtol=1e-4, atol=1e-4)
    loss.backward()
    loss_r.backward()
    assert_same_grads(model, ref)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gpt2", "bert", "nanogpt"])
def test_models_residual_fused_same_results(name, train, monkeypatch):
    torch.manual_seed(0)
    model = small_model(name).float()
    _randomise_norms(model)
    model.train(train)
    ref = copy.deepcopy(model)
    fl.swap(model)
    report = model.fastlayers_swap_report
    norms = [p for p, new in report.replaced if new in ("fastlayers.LayerNorm", "fastlayers.RMSNorm")]
    assert len(norms) >= 5, report  # every model's norms are fastlayers modules
    fused = [p for p, _ in report.residual]
    assert fused == _FUSED.get(name, []), str(report)
    assert set(fused) <= set(norms)
    if name in _LEFT:
        path, why = _LEFT[name]
        assert any(p == path and "residual add" in w and why in w for p, w in report.left), str(report)
    for path in norms:  # each norm: its add fused, or why not (or it is only an input's norm: no add)
        assert path in fused or any(p == path and "residual add" in w for p, w in report.left) or \
            path.endswith(("input_layernorm", "ln_1", "transform.LayerNorm")), (path, str(report))
    count = _Count(monkeypatch)
    ids = torch.randint(0, 128, (2, 24))
    _check_same(model, ref, name, ids)
    assert count.n == len(_FUSED.get(name, []))  # the fused path ran, once per fused add


@pytest.mark.parametrize("name", ["bert", "nanogpt"])
def test_models_residual_fused_kernels(name):
    """The same through the C++ kernels (tiny CPU calls otherwise run PyTorch's ops)."""
    torch.manual_seed(1)
    model = small_model(name).float().train()
    _randomise_norms(model)
    ref = copy.deepcopy(model)
    fl.swap(model)
    ids = torch.randint(0, 128, (2, 16))
    with fl.use_backend("cpp"):
        _check_same(model, ref, name, ids)


def test_bert_train_with_dropout_same_results():
    """BERT's dropout comes before the add: fused, and the same random masks (the same call order)."""
    T = transformers
    torch.manual_seed(0)
    model = T.BertForMaskedLM(T.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, max_position_embeddings=64,
                                           hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0)).train()
    ref = copy.deepcopy(model)
    fl.swap(model)
    assert len(model.fastlayers_swap_report.residual) == 4
    ids = torch.randint(0, 128, (2, 16))
    torch.manual_seed(5)
    out = model(input_ids=ids, labels=ids)
    torch.manual_seed(5)
    out_r = ref(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, out_r.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, out_r.logits, rtol=1e-4, atol=1e-4)


def test_hook_after_swap_is_honoured(monkeypatch):
    torch.manual_seed(0)
    model = small_model("bert").float().eval()
    _randomise_norms(model)
    ref = copy.deepcopy(model)
    fl.swap(model)
    path = "bert.encoder.layer.0.output.LayerNorm"
    seen = []

    def hook(mod, inputs, out):
        seen.append(len(inputs))
        return out * 1.5

    h = model.get_submodule(path).register_forward_hook(hook)
    ref.get_submodule(path).register_forward_hook(hook)
    count = _Count(monkeypatch)
    ids = torch.randint(0, 128, (2, 16))
    _check_same(model, ref, "bert", ids)
    assert seen == [1, 1]  # fired, with the sum as its one input, in both models
    assert count.n == 3  # that layer's forward fell back to the original; the other three fused
    h.remove()
    count.n = 0
    model(input_ids=ids)
    assert count.n == 4


def test_norm_replaced_or_lora_after_swap():
    torch.manual_seed(0)
    model = small_model("bert").float().eval()
    _randomise_norms(model)
    ref = copy.deepcopy(model)
    fl.swap(model)
    so = model.bert.encoder.layer[1].attention.output
    plain = nn.LayerNorm(64, eps=so.LayerNorm.eps)
    plain.weight, plain.bias = so.LayerNorm.weight, so.LayerNorm.bias
    so.LayerNorm = plain  # takes no residual: the rewritten forward must not call it with one
    ids = torch.randint(0, 128, (2, 16))
    _check_same(model, ref, "bert", ids)
    # LoRA on the Linears the rewritten forwards call (a Linear fused with its activation refuses a
    # later wrapper: see FusedLinear)
    peft = pytest.importorskip("peft")
    model.zero_grad(), ref.zero_grad()
    cfg = dict(r=4, lora_alpha=8, target_modules=r".*layer\.\d+\.(attention\.)?output\.dense", init_lora_weights=False)
    torch.manual_seed(3)
    lm = peft.get_peft_model(model, peft.LoraConfig(**cfg))
    torch.manual_seed(3)
    lr = peft.get_peft_model(ref, peft.LoraConfig(**cfg))
    out, out_r = lm(input_ids=ids, labels=ids), lr(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, out_r.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, out_r.logits, rtol=1e-4, atol=1e-4)


class _PostNorm(nn.Module):  # BERT-style: norm(drop(f(x)) + x)
    def __init__(self, norm, drop=0.0):
        super().__init__()
        self.f = nn.Linear(16, 16)
        self.drop = nn.Dropout(drop)
        self.norm = norm

    def forward(self, x, r):
        return self.norm(self.drop(self.f(x)) + r)


class _PreNorm(nn.Module):  # s = r + f(x); y = norm(s); the sum goes on
    def __init__(self, norm):
        super().__init__()
        self.f = nn.Linear(16, 16)
        self.norm = norm

    def forward(self, x, r):
        s = r + self.f(x)
        y = self.norm(s)
        return y, s * 2


class _DropOnSum(_PostNorm):
    def forward(self, x, r):
        return self.norm(self.drop(self.f(x) + r))


class _InPlace(_PreNorm):
    def forward(self, x, r):
        s = torch.add(r, self.f(x))
        s.mul_(2)  # between the add and the norm: fx still shows the add as the norm's input
        y = self.norm(s)
        return y, s


class _GatedAndNorm(nn.Module):  # a forward the gated rewrite also changes
    def __init__(self, norm):
        super().__init__()
        self.gate, self.up = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.act = nn.SiLU()
        self.norm = norm

    def forward(self, x, r):
        return self.norm(r + self.act(self.gate(x)) * self.up(x))


_NORMS = {"layer": lambda: nn.LayerNorm(16), "rms": lambda: nn.RMSNorm(16, eps=1e-6)}


def _compare(mod, args):
    ref = copy.deepcopy(mod)
    fl.swap(mod)
    a1 = [t.detach().clone().requires_grad_() for t in args]
    a2 = [t.detach().clone().requires_grad_() for t in args]
    out, out_r = mod(*a1), ref(*a2)
    out = out if isinstance(out, tuple) else (out,)
    out_r = out_r if isinstance(out_r, tuple) else (out_r,)
    for o, o_r in zip(out, out_r):
        assert o.dtype == o_r.dtype
        torch.testing.assert_close(o, o_r)
    sum(o.float().sum() * (i + 1) for i, o in enumerate(out)).backward()
    sum(o.float().sum() * (i + 1) for i, o in enumerate(out_r)).backward()
    for t, t_r in zip(a1, a2):
        torch.testing.assert_close(t.grad, t_r.grad)
    for (n, p), p_r in zip(mod.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_r.grad, msg=n)
    return mod.fastlayers_swap_report


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("cls", [_PostNorm, _PreNorm, _GatedAndNorm])
def test_patterns_fused(cls, kind, monkeypatch):
    torch.manual_seed(0)
    mod = cls(_NORMS[kind]())
    count = _Count(monkeypatch)
    report = _compare(mod, [torch.randn(3, 5, 16), torch.randn(3, 5, 16)])
    assert [p for p, _ in report.residual] == ["norm"], str(report)
    assert count.n == 1
    with fl.use_backend("cpp"):
        _compare(cls(_NORMS[kind]()), [torch.randn(3, 5, 16), torch.randn(3, 5, 16)])


def test_gated_and_residual_guard_together():
    """Both rewrites in one forward: a hook on either child sends calls to the original forward."""
    torch.manual_seed(0)
    mod = _GatedAndNorm(nn.LayerNorm(16))
    ref = copy.deepcopy(mod)
    fl.swap(mod)
    report = mod.fastlayers_swap_report
    assert report.gated and report.residual, str(report)
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    for child in ("norm", "gate"):
        h = getattr(mod, child).register_forward_pre_hook(lambda m, i: (i[0] * 0.5,))
        h_r = getattr(ref, child).register_forward_pre_hook(lambda m, i: (i[0] * 0.5,))
        torch.testing.assert_close(mod(x, r), ref(x, r))
        h.remove(), h_r.remove()
    torch.testing.assert_close(mod(x, r), ref(x, r))


@pytest.mark.parametrize("cls,why", [(_DropOnSum, None), (_InPlace, "modified in place")])
def test_patterns_left_alone(cls, why):
    torch.manual_seed(0)
    mod = cls(nn.LayerNorm(16)) if cls is _InPlace else cls(nn.LayerNorm(16), drop=0.5).eval()
    report = _compare(mod, [torch.randn(3, 16), torch.randn(3, 16)])
    assert not report.residual
    if why:
        assert any(p == "norm" and why in w for p, w in report.left), str(report)


def test_operands_differing_in_dtype_or_shape_run_as_written():
    norm = fl.LayerNorm(16)
    a = torch.randn(3, 16)
    for b in (torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(16), torch.tensor(0.5)):  # dtype, broadcast, 0-d
        for x, r in ((a, b), (b, a)):
            y, s = add_norm(norm, x, r)
            want = x + r
            assert s.dtype == want.dtype and s.shape == want.shape
            torch.testing.assert_close(s, want, rtol=0, atol=0)
            torch.testing.assert_close(y, F.layer_norm(want, (16,), norm.weight, norm.bias))
    # and a whole module called with a broadcast residual
    torch.manual_seed(0)
    _compare(_PostNorm(nn.LayerNorm(16)), [torch.randn(3, 5, 16), torch.randn(16)])


def test_untraceable_forward_reported():
    class Opt(_PostNorm):
        def forward(self, x, r=None):
            return self.norm(self.f(x) + (r if r is not None else 0))

    mod = Opt(nn.LayerNorm(16))
    fl.swap(mod)
    report = mod.fastlayers_swap_report
    assert any(p == "norm" and "optional argument 'r'" in w for p, w in report.left), str(report)


def test_foreign_layer_norm_class():
    """nanoGPT's LayerNorm (F.layer_norm of weight.shape, weight, bias) is replaced; one that reads
    other state (its eps attribute) or computes more is left alone with the reason."""
    class ReadsEps(nanogpt_model.LayerNorm):
        def __init__(self, n):
            super().__init__(n, True)
            self.eps = 1e-5

        def forward(self, input):
            return F.layer_norm(input, self.weight.shape, self.weight, self.bias, self.eps)

    class Scaled(nanogpt_model.LayerNorm):
        def forward(self, input):
            return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5) * 2

    model = nn.ModuleDict({"a": nanogpt_model.LayerNorm(8, False), "b": ReadsEps(8), "c": Scaled(8, True)})
    fl.swap(model)
    report = model.fastlayers_swap_report
    assert dict(report.replaced) == {"a": "fastlayers.LayerNorm"}
    assert model.a.bias is None and model.a.eps == 1e-5
    left = dict(report.left)
    assert "self.eps" in left["b"] and "more than F.layer_norm" in left["c"], left
