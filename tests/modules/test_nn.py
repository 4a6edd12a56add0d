"""FusedLinear / Softmax / LogSoftmax as nn.Module drop-ins."""
import pytest
import torch
from torch import nn

import fastlayers as fl
from fastlayers.activations import ACTIVATIONS, NAMES


def test_fused_linear_is_an_nn_linear_with_the_same_init_and_state():
    torch.manual_seed(0)
    ref = nn.Linear(13, 7)
    torch.manual_seed(0)
    ours = fl.FusedLinear(13, 7, activation="gelu")
    assert isinstance(ours, nn.Linear)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    for k in ("weight", "bias"):
        assert torch.equal(ours.state_dict()[k], ref.state_dict()[k])
    # a checkpoint of either loads into the other
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]


def test_fused_linear_no_bias_dtype_device():
    m = fl.FusedLinear(4, 3, bias=False, activation="tanh", dtype=torch.float64, device="cpu")
    assert m.bias is None and m.weight.dtype == torch.float64 and list(m.state_dict()) == ["weight"]
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x), torch.tanh(x @ m.weight.T))


@pytest.mark.parametrize("act", NAMES)
def test_fused_linear_matches_linear_plus_activation(backend, act):
    torch.manual_seed(1)
    ours = fl.FusedLinear(10, 6, activation=act, negative_slope=0.1)
    ref = nn.Sequential(nn.Linear(10, 6), ACTIVATIONS[act].module(0.1))
    ref[0].load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 10)
    y, yr = ours(x), ref(x)
    torch.testing.assert_close(y, yr)
    y.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref[0].weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref[0].bias.grad)


def test_extra_repr_shows_the_activation():
    assert "activation=gelu" in repr(fl.FusedLinear(3, 4, activation="gelu"))
    r = repr(fl.FusedLinear(3, 4, activation="leaky_relu", negative_slope=0.2))
    assert "activation=leaky_relu" in r and "negative_slope=0.2" in r
    assert repr(fl.FusedLinear(3, 4, activation="relu")).startswith("FusedLinear(in_features=3, out_features=4, bias=True")


def test_unknown_activation_fails_at_construction():
    with pytest.raises(ValueError, match="fastlayers.FusedLinear: unknown activation 'swish'.*relu"):
        fl.FusedLinear(3, 4, activation="swish")


def test_modules_pickle_and_copy():
    import copy
    import io
    m = nn.Sequential(fl.FusedLinear(4, 5, activation="silu"), fl.LogSoftmax(dim=1))
    m2 = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m3 = torch.load(buf, weights_only=False)
    x = torch.randn(2, 4)
    torch.testing.assert_close(m(x), m2(x))
    torch.testing.assert_close(m(x), m3(x))


def test_available_backends_and_use_backend():
    names = fl.available_backends()
    assert "reference" in names and "cpp" in names
    with fl.use_backend("reference"):
        with fl.use_backend("cpp"):
            pass
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with fl.use_backend("nope"):
            pass


def test_env_var_forces_backend(monkeypatch):
    import fastlayers.backends as B
    monkeypatch.setenv("FASTLAYERS_BACKEND", "reference")
    assert B.select(torch.device("cpu"), "op").NAME == "reference"
    monkeypatch.setenv("FASTLAYERS_BACKEND", "cpp")
    assert B.select(torch.device("cpu"), "op").NAME == "cpp"
    monkeypatch.delenv("FASTLAYERS_BACKEND")
    assert B.select(torch.device("cpu"), "op").NAME == "cpp"  # the CPU default


def test_jit_trace_records_the_ops():
    """torch.jit.trace sees the registered ops (the raw-pointer kernels would be invisible to it
    and the traced module would read uninitialised memory)."""
    torch.manual_seed(2)
    m = nn.Sequential(fl.FusedLinear(4, 3, activation="gelu"), fl.Softmax(-1))
    with torch.no_grad():
        traced = torch.jit.trace(m, torch.randn(2, 4))
    x = torch.randn(5, 4, requires_grad=True)
    y = traced(x)
    torch.testing.assert_close(y, m(x))
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    m(x).sum().backward()
    torch.testing.assert_close(g, x.grad)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_fused_linear_climbs_the_route_once(monkeypatch, grad):
    """FusedLinear.forward runs linear_act's two gates (tiny_cpu_linear, plain_cpu_inference) once
    per call, and hands their answers on, instead of calling linear_act, which ran them again."""
    import fastlayers.ops.linear_act as ff
    import fastlayers.nn as fnn
    calls = {"tiny": 0, "plain": 0}

    def counted(name, f):
        def g(*a, **k):
            calls[name] += 1
            return f(*a, **k)
        return g
    for mod in (fnn, ff):
        monkeypatch.setattr(mod, "tiny_cpu_linear", counted("tiny", mod.tiny_cpu_linear))
        monkeypatch.setattr(mod, "plain_cpu_inference", counted("plain", mod.plain_cpu_inference))
    from fastlayers.backends.cpu import gemm
    monkeypatch.setattr(gemm, "FUSED_MIN_MACS", 1)  # (below it one C++ call takes the layer: small_cpu_linear)
    m = fl.FusedLinear(64, 96, activation="gelu")
    x = torch.randn(128, 64, requires_grad=grad)  # above the tiny gate's size: the general route
    with torch.set_grad_enabled(grad):
        y = m(x)
    torch.testing.assert_close(y, torch.nn.functional.gelu(torch.nn.functional.linear(x, m.weight, m.bias)),
                               rtol=1e-5, atol=1e-5)
    assert calls == {"tiny": 1, "plain": 1}, calls
