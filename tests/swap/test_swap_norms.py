"""fastlayers.swap replaces norm modules (nn.LayerNorm, nn.RMSNorm, Hugging Face RMSNorm classes) with
fastlayers' fused ones on the same Parameters; whole models keep their outputs, loss and gradients."""
import copy

import pytest
import torch
from torch import nn

import fastlayers as fl
from fastlayers.ops.norms import TorchRMSNorm
from integration_helpers import assert_same_grads, small_model

transformers = pytest.importorskip("transformers")


def _norms(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm))
            or getattr(type(m), "kernel_layer_name", None) == "RMSNorm"]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_models_norms_replaced_same_results(name):
    torch.manual_seed(0)
    model = small_model(name).float()
    with torch.no_grad():  # random norm weights (their init is all ones: a wrong weight would hide)
        for _, m in _norms(model):
            if getattr(m, "weight", None) is not None:
                m.weight.normal_(1.0, 0.2)
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0.0, 0.2)
    model.eval()  # no dropout
    ref = copy.deepcopy(model)
    before = _norms(model)
    params = {n: id(p) for n, p in model.named_parameters()}
    fl.swap(model)
    report = model.fastlayers_swap_report
    replaced = dict(report.replaced)
    assert before, "no norms found"
    for path, _ in before:
        assert path in replaced, (path, report.left)
        new = model.get_submodule(path)
        assert type(new) in (fl.RMSNorm, fl.LayerNorm, TorchRMSNorm), type(new)
    assert {n: id(p) for n, p in model.named_parameters()} == params  # same Parameter objects
    assert set(model.state_dict()) == set(ref.state_dict())

    ids = torch.randint(0, 128, (2, 24))
    labels = ids.clone()
    out = model(input_ids=ids, labels=labels)
    out_r = ref(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, out_r.loss, rtol=1e-5, atol=1e-5)
    if out.logits is not None and out_r.logits is not None:
        torch.testing.assert_close(out.logits, out_r.logits, rtol=1e-4, atol=1e-4)
    out.loss.backward()
    out_r.loss.backward()
    assert_same_grads(model, ref)


def test_non_standard_rmsnorm_left_alone():
    class OnePlusRMSNorm(nn.Module):  # Gemma-style (1 + weight): same attributes, another forward
        kernel_layer_name = "RMSNorm"

        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(n))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (1 + self.weight) * h.to(x.dtype)

    class CastAfterWeight(OnePlusRMSNorm):
        def forward(self, x):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (self.weight * h).to(x.dtype)

    class ExtraParam(OnePlusRMSNorm):
        def __init__(self, n):
            super().__init__(n)
            self.shift = nn.Parameter(torch.zeros(n))

    model = nn.Sequential(OnePlusRMSNorm(8), CastAfterWeight(8), ExtraParam(8), nn.LayerNorm(8),
                          nn.RMSNorm(8), nn.RMSNorm((2, 4)))
    with torch.no_grad():
        model[1].weight.normal_()
    fl.swap(model)
    left = dict(model.fastlayers_swap_report.left)
    assert "differs" in left["0"] and "dtype" in left["1"] and "besides weight" in left["2"], left
    assert type(model[3]) is fl.LayerNorm and type(model[4]) is TorchRMSNorm
    assert type(model[5]) is nn.RMSNorm and "several dims" in left["5"]


def test_hooked_norm_left_alone():
    ln = nn.LayerNorm(8)
    ln.register_forward_hook(lambda *a: None)
    model = nn.Sequential(ln)
    fl.swap(model)
    assert type(model[0]) is nn.LayerNorm and "hooks" in dict(model.fastlayers_swap_report.left)["0"]


def test_shared_norm_stays_shared():
    ln = nn.LayerNorm(8)
    model = nn.Sequential(ln, nn.Sequential(ln))
    fl.swap(model)
    assert type(model[0]) is fl.LayerNorm and model[1][0] is model[0] and model[0].weight is ln.weight
