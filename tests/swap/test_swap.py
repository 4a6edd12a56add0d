"""fastlayers.swap: what gets fused, what is left and why, and that the swapped
model is the same model: outputs, gradients, state_dict keys, Parameter objects, save/load."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlayers as fl
from fastlayers.swap import SwapReport
from integration_helpers import assert_close_gemm

H = 16


def _check_same(model: nn.Module, ref: nn.Module, *inputs: torch.Tensor, k: int = H) -> None:
    """Swapped `model` vs untouched `ref`: outputs and all gradients at fp32 tolerance."""
    xs = [x.clone().requires_grad_() for x in inputs]
    xr = [x.clone().requires_grad_() for x in inputs]
    out, exp = model(*xs), ref(*xr)
    assert_close_gemm(out, exp, k)
    g = torch.randn_like(exp)
    out.backward(g)
    exp.backward(g)
    for a, b in zip(xs, xr):
        assert_close_gemm(a.grad, b.grad, k)
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert_close_gemm(got[name].grad, p.grad, k)


def _fused(model: nn.Module):
    return {n: m.activation for n, m in model.named_modules()
            if isinstance(m, fl.FusedLinear) and m.activation != "none"}


ACT_MODULES = [
    (nn.ReLU(), "relu"), (nn.ReLU(inplace=True), "relu"), (nn.LeakyReLU(0.2), "leaky_relu"),
    (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu"),
    (nn.Sigmoid(), "sigmoid"), (nn.Tanh(), "tanh"),
]


@pytest.mark.parametrize("act,name", ACT_MODULES, ids=[f"{type(a).__name__}-{n}" for a, n in ACT_MODULES])
def test_sequential_every_activation_module(backend, act, name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, H), act, nn.Linear(H, 4, bias=False), copy.deepcopy(act),
                          nn.Linear(4, 3))
    ref = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert fl.swap(model) is model
    assert _fused(model) == {"0": name, "2": name}
    assert isinstance(model[1], nn.Identity) and isinstance(model[3], nn.Identity)
    if name == "leaky_relu":
        assert model[0].negative_slope == 0.2
    assert list(model.state_dict()) == keys
    # The very same Parameter objects: an optimizer built before swap keeps training them.
    assert all(p is params[n] for n, p in model.named_parameters())
    _check_same(model, ref, torch.randn(5, 8))


class Functional(nn.Module):
    """Sibling Linear layers with functional activations, as hand-written models do."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, H), nn.Linear(H, H), nn.Linear(H, H)
        self.fc4, self.fc5, self.fc6 = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
        self.fc7 = nn.Linear(H, H)
        self.blocks = nn.ModuleList([nn.Linear(H, H) for _ in range(2)])
        self.head = nn.Linear(H, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = F.gelu(self.fc2(h), approximate="tanh")
        h = F.gelu(self.fc3(h))
        h = torch.tanh(self.fc4(h))
        h = F.leaky_relu(self.fc5(h), 0.3)
        h = torch.sigmoid(self.fc6(h))
        h = self.fc7(h).relu()
        for blk in self.blocks:
            h = F.silu(blk(h))
        return self.head(h)


def test_functional_forms_are_fused(backend):
    torch.manual_seed(0)
    model = Functional()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    fl.swap(model)
    assert _fused(model) == {"fc1": "relu", "fc2": "gelu_tanh", "fc3": "gelu", "fc4": "tanh",
                             "fc5": "leaky_relu", "fc6": "sigmoid", "fc7": "relu",
                             "blocks.0": "silu", "blocks.1": "silu"}
    assert model.fc5.negative_slope == 0.3
    # a generated subclass of its own class (name, attributes, isinstance kept), same state_dict
    assert isinstance(model, Functional) and type(model).__name__ == "Functional"
    assert list(model.state_dict()) == keys
    assert model.fastlayers_swap_report.rewritten == ["<model>"]
    assert list(model.fastlayers_swap_report.why_not_fused()) == ["head"]
    assert [p for p, _ in model.fastlayers_swap_report.linear] == ["head"]  # a FusedLinear("none")
    _check_same(model, ref, torch.randn(2, 5, 8))


def test_rewritten_forward_follows_the_live_module(backend):
    """The generated forward reads the module's attributes at call time: state loaded later, a
    deepcopy, and a pickled copy all compute what the original model would."""
    torch.manual_seed(0)
    model, other = Functional(), Functional()
    fl.swap(model)
    model.load_state_dict(other.state_dict())  # also: an nn.Linear checkpoint loads as is
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_close_gemm(model(x), other(x), H)
        assert_close_gemm(copy.deepcopy(model)(x), other(x), H)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert_close_gemm(loaded(x), other(x), H)
        assert isinstance(loaded, Functional) and type(loaded).fastlayers_original_class is Functional
        assert_close_gemm(torch.jit.script(model)(x), other(x), H)  # the rewritten forward scripts


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(H, H), nn.GELU(), nn.Linear(H, H)

    def forward(self, x):
        h = self.fc(x)
        return self.out(self.act(h) + h)  # h is also the residual: fc must not be fused


def test_shared_output_linear_is_not_fused(backend):
    torch.manual_seed(0)
    model = SharedOutput()
    ref, ref_w = copy.deepcopy(model), model.fc.weight
    fl.swap(model)
    assert model.fc.weight is ref_w and getattr(model.fc, "activation", "none") == "none"
    assert type(model.act) is nn.GELU
    left = model.fastlayers_swap_report.why_not_fused()
    assert "fc" in left and "used by" in left["fc"], left
    _check_same(model, ref, torch.randn(4, H))


class Awkward(nn.Module):
    """Each pair here must be left alone, for the reason in the comment."""

    def __init__(self):
        super().__init__()
        self.twice = nn.Linear(H, H)     # called twice
        self.hooked = nn.Linear(H, H)    # has a forward hook
        self.shared_act = nn.ReLU()      # one activation module applied after two Linears
        self.a, self.b = nn.Linear(H, H), nn.Linear(H, H)
        self.returned = nn.Linear(H, H)  # output returned: the activation is someone else's
        self.formula = nn.Linear(H, H)   # followed by a hand-written GELU formula

    def forward(self, x):
        h = torch.relu(self.twice(x)) + torch.relu(self.twice(x))
        h = torch.tanh(self.hooked(h))
        h = self.shared_act(self.a(h)) + self.shared_act(self.b(h))
        f = self.formula(h)
        h = f * 0.5 * (1.0 + torch.erf(f / math.sqrt(2.0)))
        return self.returned(h)


def test_doubtful_pairs_are_left_alone(backend):
    torch.manual_seed(0)
    model = Awkward()
    model.hooked.register_forward_hook(lambda m, i, o: o * 2)
    ref = copy.deepcopy(model)
    fl.swap(model)
    assert _fused(model) == {}
    left = model.fastlayers_swap_report.why_not_fused()
    assert "called 2 times" in left["twice"]
    assert "hooks" in left["hooked"]
    assert "called more than once" in left["a"] and "called more than once" in left["b"]
    assert "return value" in left["returned"]
    assert "used by _operator.mul" in left["formula"]
    _check_same(model, ref, torch.randn(4, H))


class PyGELU(nn.Module):
    """Another library's activation module that just calls F.gelu (like transformers')."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.fn, self.approximate = F.gelu, approximate

    def forward(self, x):
        return self.fn(x, approximate=self.approximate)


class FormulaGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))


def test_foreign_activation_modules(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, H), PyGELU("tanh"), nn.Linear(H, H), FormulaGELU(),
                          nn.Linear(H, H), PyGELU())
    ref = copy.deepcopy(model)
    fl.swap(model)
    assert _fused(model) == {"0": "gelu_tanh", "4": "gelu"}
    assert isinstance(model[3], FormulaGELU)  # not one recognised call: left alone
    assert "FormulaGELU" in model.fastlayers_swap_report.why_not_fused()["2"]
    _check_same(model, ref, torch.randn(4, 8))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(H, H)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace it
            return torch.relu(self.fc(x))
        return torch.relu(self.fc(-x))


class TrainOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(H, H)

    def forward(self, x):
        h = self.fc(x)
        return torch.relu(h) if self.training else h  # a traced graph would bake one branch in


class Optional_(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(H, H)

    def forward(self, x, mask=None):
        h = torch.relu(self.fc(x))
        return h if mask is None else h * mask


@pytest.mark.parametrize("cls,why", [(Branchy, "cannot trace"), (TrainOnly, "self.training"),
                                     (Optional_, "optional argument 'mask'")])
def test_untraceable_or_path_dependent_modules_are_left(backend, cls, why):
    torch.manual_seed(0)
    model = nn.Sequential(cls())
    ref = copy.deepcopy(model)
    fl.swap(model)
    assert _fused(model) == {}
    assert why in model.fastlayers_swap_report.why_not_fused()["0.fc"]
    assert type(model[0]) is cls  # no rewritten forward
    _check_same(model, ref, torch.randn(4, H))


def test_softmax_modules_replaced(backend):
    shared = nn.LogSoftmax(dim=1)
    model = nn.Sequential(nn.Linear(8, 6), nn.Softmax(dim=0), nn.Sequential(shared, shared),
                          nn.Softmax(dim=None))
    fl.swap(model)
    assert type(model[1]) is fl.Softmax and model[1].dim == 0
    assert type(model[2][0]) is fl.LogSoftmax and model[2][0].dim == 1
    assert model[2][0] is model[2][1]  # sharing preserved
    assert type(model[3]) is nn.Softmax  # dim=None: legacy implicit dim, left
    assert "dim=None" in dict(model.fastlayers_swap_report.left)["3"]
    root = fl.swap(nn.Softmax(dim=-1))
    assert type(root) is fl.Softmax and root.dim == -1


def test_verbose_prints_what_was_fused_and_left(backend, capsys):
    model = SharedOutput()
    model = nn.Sequential(nn.Linear(H, H), nn.ReLU(), model)
    fl.swap(model, verbose=True)
    out = capsys.readouterr().out
    assert "fused     0 + 1 (ReLU) -> FusedLinear(activation=relu)" in out
    assert "linear    2.fc -> FusedLinear(activation=none) (its output is used by" in out
    assert isinstance(model.fastlayers_swap_report, SwapReport)
    assert str(model.fastlayers_swap_report) in out


def test_swap_is_idempotent(backend):
    torch.manual_seed(0)
    model = nn.Sequential(Functional(), nn.Linear(3, 3), nn.Tanh())
    ref = copy.deepcopy(model)
    fl.swap(model)
    first = _fused(model)
    fl.swap(model)
    assert _fused(model) == first and len(first) == 10
    _check_same(model, ref, torch.randn(4, 8))


# ----------------------------------------------------------------------------- a real model
def test_transformers_bert_encoder(backend):
    transformers = pytest.importorskip(
        "transformers", reason="transformers not installed (pip install transformers) — the "
        "real-model test builds a small BERT from a config, no download")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    model = transformers.BertForMaskedLM(config)  # train mode: the graph autograd sees in training
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    fl.swap(model)
    assert _fused(model) == {"bert.encoder.layer.0.intermediate.dense": "gelu",
                             "bert.encoder.layer.1.intermediate.dense": "gelu",
                             "cls.predictions.transform.dense": "gelu"}
    assert list(model.state_dict()) == keys
    ids = torch.randint(0, 50, (2, 9))
    out = model(input_ids=ids, labels=ids)
    exp = ref(input_ids=ids, labels=ids)
    assert_close_gemm(out.logits, exp.logits, 64)
    out.loss.backward()
    exp.loss.backward()
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is not None:
            assert_close_gemm(got[name].grad, p.grad, 64)


class _SubLinear(nn.Linear):
    pass


class _PlainLinears(nn.Module):
    """Linears with no activation after them: one shared by two attributes, one hooked, one subclass."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, H)
        self.b = nn.Linear(H, H, bias=False)
        self.b_again = self.b
        self.hooked = nn.Linear(H, H)
        self.sub = _SubLinear(H, 4)
        self.hooked.register_forward_hook(lambda m, i, o: o * 2)

    def forward(self, x):
        return self.sub(self.hooked(self.b_again(self.b(self.a(x)))))


@pytest.mark.parametrize("linears", [True, False])
def test_plain_linears_become_fused_linear_none(backend, linears):
    torch.manual_seed(0)
    model = _PlainLinears()
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    fl.swap(model, linears=linears)
    rep = model.fastlayers_swap_report
    if linears:
        for name in ("a", "b"):
            m = getattr(model, name)
            assert type(m) is fl.FusedLinear and m.activation == "none", name
        assert model.b_again is model.b  # a shared Linear stays shared
        assert sorted(p for p, _ in rep.linear) == ["a", "b"]
    else:
        assert type(model.a) is nn.Linear and type(model.b) is nn.Linear and not rep.linear
    assert type(model.hooked) is nn.Linear and "hooks" in dict(rep.left)["hooked"]
    assert type(model.sub) is _SubLinear and "subclass" in dict(rep.left)["sub"]
    assert dict(model.named_parameters()) == params and list(model.state_dict()) == keys
    _check_same(model, ref, torch.randn(3, 8))


def test_plain_linears_prepacked_in_inference(monkeypatch):
    """Without a forced backend, a large plain Linear runs prepacked (cpp) after swap and
    fastlayers.prepack of the frozen model, and its output is nn.Linear's."""
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    from fastlayers.backends.cpu import gemm
    if not gemm.plain_linear_gain(256, 256, 256, torch.float32):
        pytest.skip("no oneDNN gain for fp32 plain Linears here (MKL's own sgemm on Intel, or no usable "
                    "oneDNN fused linear): they run F.linear")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Dropout(0.0), nn.Linear(256, 256)).eval()
    ref = copy.deepcopy(model)
    fl.swap(model)
    assert fl.prepack(model.requires_grad_(False)) == 2
    x = torch.randn(256, 256)
    with torch.no_grad():
        out, exp = model(x), ref(x)
    assert model[0]._packed is not None and model[2]._packed is not None
    assert_close_gemm(out, exp, 256)
