"""Small CPU calls run PyTorch's own ops where the fused path's fixed costs exceed what it saves
(bench/results/cpu-routes.md), without a backend forced: linear + activation below
gemm.FUSED_MIN_MACS (with and without grad: the same ops, the same bits), cross_entropy below
_TORCH_MAX_NUMEL logits, linear_cross_entropy below TORCH_MAX_LOGITS, and the norm modules'
fast path. Each route is observed (the autograd node, a spy on the kernels), so each test fails
if the gate is removed or wrong; values are PyTorch's own."""
import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
import fastlayers.ops.cross_entropy as fl_ce
import fastlayers.ops.linear_cross_entropy as fl_lce
from fastlayers.backends.cpu import _ext, gemm

from conftest import assert_matches


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the C++ kernels called (spied on the extension)."""
    calls = []
    for name in ("bias_act_forward", "act_grad", "cross_entropy_forward", "cross_entropy_backward"):
        real = getattr(_ext._C, name)
        monkeypatch.setattr(_ext._C, name, (lambda n, r: lambda *a, **k: calls.append(n) or r(*a, **k))(name, real))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_small_linear_act_with_grad_is_pytorch(kernel_calls, dtype):
    torch.manual_seed(0)
    layer = fl.FusedLinear(64, 256, activation="gelu", dtype=dtype)
    x = torch.randn(12, 64, 64, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "GeluBackward0" and not kernel_calls
    ref = F.gelu(F.linear(x, layer.weight, layer.bias))
    assert torch.equal(y, ref)
    y.sum().backward()
    with torch.no_grad():  # the same ops without grad: the same bits
        assert torch.equal(layer(x), y)


def test_linear_act_with_grad_fused_from_fused_min_macs(monkeypatch, kernel_calls):
    monkeypatch.setattr(gemm, "FUSED_MIN_MACS", 12 * 64 * 64 * 256)
    layer = fl.FusedLinear(64, 256, activation="gelu")
    x = torch.randn(12, 64, 64, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "FunctionBackward" and kernel_calls == ["bias_act_forward"]
    y.sum().backward()
    assert kernel_calls == ["bias_act_forward", "act_grad"]
    monkeypatch.setattr(gemm, "FUSED_MIN_MACS", 12 * 64 * 64 * 256 + 1)
    assert type(layer(x).grad_fn).__name__ == "GeluBackward0"


@pytest.mark.parametrize("n,c,small", [(256, 65, True), (1024, 1024, False)])
def test_cross_entropy_small_is_pytorch(kernel_calls, n, c, small):
    assert (n * c < fl_ce._TORCH_MAX_NUMEL) == small
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, c, generator=g, requires_grad=True)
    t = torch.randint(0, c, (n,), generator=g)
    t[::5] = -100
    loss = fl.cross_entropy(z, t)
    loss.backward()
    assert (not kernel_calls) == small, kernel_calls
    ref = F.cross_entropy(z, t)
    if small:
        assert torch.equal(loss, ref)
    else:
        torch.testing.assert_close(loss, ref)
    with pytest.raises(IndexError, match=f"fastlayers.cross_entropy: target {c + 5} is out of bounds"):
        fl.cross_entropy(z, torch.full((n,), c + 5))  # our error, small or not


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy_small_is_pytorch(kernel_calls, dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(768, 64, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(65, 64, generator=g) / 8).to(dtype).requires_grad_()
    t = torch.randint(0, 65, (768,), generator=g)
    t[::7] = -1
    loss = fl.linear_cross_entropy(h, w, t, ignore_index=-1)
    loss.backward()
    assert not kernel_calls and loss.dtype == dtype
    # the composite computes in the kernels' compute dtype (fp32 for 16-bit logits), like them
    ref = F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-1).to(dtype)
    assert torch.equal(loss, ref)
    with pytest.raises(IndexError, match="fastlayers.linear_cross_entropy: target 65"):
        fl.linear_cross_entropy(h, w, torch.full((768,), 65))


def test_linear_cross_entropy_large_is_fused(monkeypatch, kernel_calls):
    monkeypatch.setattr(fl_lce, "TORCH_MAX_LOGITS", 768 * 65)
    h = torch.randn(768, 64, requires_grad=True)
    w = (torch.randn(65, 64) / 8).requires_grad_()
    t = torch.randint(0, 65, (768,))
    fl.linear_cross_entropy(h, w, t).backward()
    assert "cross_entropy_forward" in kernel_calls


def _spy(monkeypatch, module, name, taken):
    """Wrap module.<name> (a C++ gate of fastlayers._fastpath) to record each call it answered."""
    real = getattr(module, name)
    if real is None:
        pytest.skip("fastlayers._fastpath is not built here (no torch at build time): only its Python twin runs")
    monkeypatch.setattr(module, name, lambda *a: (lambda y: y if y is None else taken.append(name) or y)(real(*a)))


@pytest.mark.parametrize("fastpath", ["cpp", "python"])
@pytest.mark.parametrize("kind", ["layer", "rms_hf", "rms_torch"])
@pytest.mark.parametrize("residual", [False, True])
def test_small_norm_modules(monkeypatch, kind, residual, fastpath):
    """The modules' fast path (one C++ call for "layer" / "rms", the Python checks + norm_composite
    otherwise) gives the general path's bits (the same PyTorch ops), and the general path still
    raises fastlayers' own errors for what the fast path does not admit."""
    from fastlayers.ops import norms
    torch.manual_seed(0)
    if kind == "layer":
        mod = fl.LayerNorm(64)
    elif kind == "rms_hf":
        mod = fl.RMSNorm(64)
    else:
        mod = norms.TorchRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        mod.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 64, requires_grad=True)  # (below every kind's _TORCH_MAX_NUMEL)
    r = torch.randn(2, 16, 64, requires_grad=True) if residual else None
    fast = []
    real = norms.norm_composite
    monkeypatch.setattr(norms, "norm_composite", lambda *a: fast.append(1) or real(*a))
    if fastpath == "python":
        monkeypatch.setattr(norms, "_FAST_SMALL_NORM", None)
    elif kind != "rms_hf":  # (the HF formula's few ops stay in Python)
        _spy(monkeypatch, norms, "_FAST_SMALL_NORM", fast)
    out = mod(x, r) if residual else mod(x)
    assert fast, "the fast path was not taken"
    g = [torch.randn_like(t) for t in (out if residual else (out,))]
    grads = torch.autograd.grad(out if residual else (out,), (x, mod.weight), g)
    monkeypatch.setattr(norms, "_small_cpu_norm", lambda *a: None)  # the general path
    ref = mod(x, r) if residual else mod(x)
    for a, b in zip(out if residual else (out,), ref if residual else (ref,)):
        assert torch.equal(a, b)
        assert type(a.grad_fn) is type(b.grad_fn)
    for a, b in zip(grads, torch.autograd.grad(ref if residual else (ref,), (x, mod.weight), g)):
        assert torch.equal(a, b)
    monkeypatch.undo()
    if fastpath == "python":
        monkeypatch.setattr(norms, "_FAST_SMALL_NORM", None)
    with pytest.raises(Exception, match="fastlayers"):
        mod(torch.randn(2, 16, 65))
    with pytest.raises(Exception, match="fastlayers"):
        mod(x, torch.randn(2, 16, 63))


_ATEN_ACTS = ["none", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "hardswish",
              "hardsigmoid", "relu6", "mish"]


@pytest.fixture(scope="module", autouse=True)
def _first_tanh_of_the_process():
    """PyTorch's own first fp32 torch.tanh after an F.linear in a process is sometimes off by
    ~5e-5 in part of its output (torch 2.13.0+cpu, this Xeon; reproduced without fastlayers in
    ~1 of 8 fresh pytest processes: F.linear(x, w, b) then torch.tanh, 120 x 96; never on later
    calls). A test comparing two routes' bits would see that, not a route's difference: run one
    first."""
    torch.tanh(F.linear(torch.randn(120, 64), torch.randn(96, 64)))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("activation", _ATEN_ACTS)
def test_small_linear_one_cpp_call(monkeypatch, activation, dtype, grad):
    """FusedLinear below FUSED_MIN_MACS: one C++ call (fastlayers._fastpath.small_linear) gives
    the bits, autograd node and gradients of the Python route it short-cuts (PyTorch's F.linear +
    activation), with and without grad."""
    from fastlayers import _dispatch
    torch.manual_seed(0)
    layer = fl.FusedLinear(64, 96, activation=activation, negative_slope=0.05 if activation == "leaky_relu" else 0.01,
                           dtype=dtype)
    x = torch.randn(3, 40, 64, dtype=dtype, requires_grad=grad)
    taken = []
    _spy(monkeypatch, _dispatch, "_FAST_SMALL_LINEAR", taken)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    assert taken == ["_FAST_SMALL_LINEAR"]
    monkeypatch.setattr(_dispatch, "_FAST_SMALL_LINEAR", None)
    with torch.set_grad_enabled(grad):
        ref = layer(x)
    assert torch.equal(y, ref) and type(y.grad_fn) is type(ref.grad_fn) and y.dtype == dtype
    if grad:
        g = torch.randn_like(y)
        params = (x, layer.weight, layer.bias)
        for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
            assert torch.equal(a, b)


def test_small_linear_cpp_call_refuses_what_it_must(monkeypatch):
    """What the C++ gate does not admit goes on to the general path: quick_gelu (no ATen op), a
    TorchFunctionMode, a tensor subclass, a prepacking layer, a forced backend, and bad input,
    which gets fastlayers' own errors."""
    from torch.overrides import TorchFunctionMode
    from fastlayers import _dispatch
    taken = []
    _spy(monkeypatch, _dispatch, "_FAST_SMALL_LINEAR", taken)
    x = torch.randn(8, 64, requires_grad=True)
    fl.FusedLinear(64, 32, activation="quick_gelu")(x)
    seen = []

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))
    with Mode():
        fl.FusedLinear(64, 32, activation="gelu")(x)
    assert seen  # the mode saw the ops (the C++ call would have hidden them)

    class Sub(torch.Tensor):
        pass
    fl.FusedLinear(64, 32, activation="gelu")(x.detach().as_subclass(Sub))
    fl.FusedLinear(64, 32, activation="gelu", prepack=True)(x)
    with fl.use_backend("cpp"):
        fl.FusedLinear(64, 32, activation="gelu")(x)
    assert taken == []
    layer = fl.FusedLinear(64, 32, activation="gelu")
    with pytest.raises(Exception, match="fastlayers"):
        layer(torch.randn(8, 63))
    with pytest.raises(Exception, match="fastlayers"):
        layer(torch.randn(8, 64, dtype=torch.float64))
    assert taken == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_small_linear_cross_entropy_one_cpp_call(monkeypatch, dtype, reduction, smoothing):
    """linear_cross_entropy below TORCH_MAX_LOGITS: one C++ call (small_linear_ce) gives the bits
    and gradients of the Python route (_linear_ce_torch), the loss in h's dtype or, as
    swap(skip_logits=True) asks, in float32; a bad target still gets fastlayers' error."""
    from fastlayers.swap.causal_lm import head_loss
    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 32, generator=g).to(dtype).requires_grad_()
    head = torch.nn.Linear(32, 65, dtype=dtype)
    t = torch.randint(0, 65, (200,), generator=g)
    t[::7] = -1
    taken = []
    _spy(monkeypatch, fl_lce, "_FAST_SMALL_LCE", taken)
    outs = [fl.linear_cross_entropy(h, head.weight, t, head.bias, -1, smoothing, reduction),
            head_loss(head, h, t, ignore_index=-1, label_smoothing=smoothing, reduction=reduction,
                      out_dtype=torch.float32 if dtype != torch.float64 else None)]
    assert taken == ["_FAST_SMALL_LCE"] * 2
    monkeypatch.setattr(fl_lce, "_FAST_SMALL_LCE", None)
    refs = [fl.linear_cross_entropy(h, head.weight, t, head.bias, -1, smoothing, reduction),
            head_loss(head, h, t, ignore_index=-1, label_smoothing=smoothing, reduction=reduction,
                      out_dtype=torch.float32 if dtype != torch.float64 else None)]
    assert outs[0].dtype == dtype and outs[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    params = (h, head.weight, head.bias)
    for y, ref in zip(outs, refs):
        assert torch.equal(y, ref) and y.dtype == ref.dtype
        gy = torch.rand_like(y)
        for a, b in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(ref, params, gy)):
            assert torch.equal(a, b)
    monkeypatch.undo()
    with pytest.raises(IndexError, match="fastlayers.linear_cross_entropy: target 65 is out of bounds"):
        fl.linear_cross_entropy(h, head.weight, torch.full((200,), 65), head.bias)
    with pytest.raises(Exception, match="fastlayers.linear_cross_entropy"):
        fl.linear_cross_entropy(h, head.weight, t[:199], head.bias)
    with pytest.raises(Exception, match="fastlayers.linear_cross_entropy"):
        fl.linear_cross_entropy(h, head.weight, t, head.bias, reduction="avg")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_small_cross_entropy_one_cpp_call(monkeypatch, dtype, reduction, smoothing):
    """cross_entropy below _TORCH_MAX_NUMEL, (N, C) logits and class targets: one C++ call
    (small_cross_entropy) gives the bits and gradient of the Python route (F.cross_entropy); what
    it does not take (class weights, 3-d logits, bad targets) goes on to the general path."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 65, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, 65, (300,), generator=g)
    t[::7] = -1
    taken = []
    _spy(monkeypatch, fl_ce, "_FAST_SMALL_CE", taken)
    y = fl.cross_entropy(z, t, -1, smoothing, reduction)
    assert taken == ["_FAST_SMALL_CE"]
    fl.cross_entropy(z, t, -1, smoothing, reduction, weight=torch.rand(65, dtype=dtype))
    fl.cross_entropy(z.detach().view(3, 100, 65).transpose(1, 2), t.view(3, 100), -1, smoothing, reduction)
    assert taken == ["_FAST_SMALL_CE"]
    monkeypatch.setattr(fl_ce, "_FAST_SMALL_CE", None)
    ref = fl.cross_entropy(z, t, -1, smoothing, reduction)
    assert torch.equal(y, ref) and y.dtype == ref.dtype == dtype
    gy = torch.rand_like(y)
    assert torch.equal(torch.autograd.grad(y, z, gy)[0], torch.autograd.grad(ref, z, gy)[0])
    monkeypatch.undo()
    with pytest.raises(IndexError, match="fastlayers.cross_entropy: target 65 is out of bounds"):
        fl.cross_entropy(z, torch.full((300,), 65))
    with pytest.raises(Exception, match="fastlayers.cross_entropy"):
        fl.cross_entropy(z, t[:299])
    with pytest.raises(Exception, match="fastlayers.cross_entropy"):
        fl.cross_entropy(z, t, label_smoothing=1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("probs", [False, True], ids=["indices", "probs"])
def test_small_cross_entropy_16bit_class_weights(dtype, probs):
    """16-bit logits with class weights below _TORCH_MAX_NUMEL: PyTorch's result (the composite
    got the weight in float32, and PyTorch raised 'expected scalar type BFloat16 but found Float')."""
    g = torch.Generator().manual_seed(0)
    for shape in ((30, 65), (6, 65, 5)):
        z = torch.randn(*shape, generator=g).to(dtype)
        w = torch.rand(65, generator=g).to(dtype)
        if probs:
            t = torch.softmax(torch.randn(*shape, generator=g), 1).to(dtype)
        else:
            t = torch.randint(0, 65, shape[:1] + shape[2:], generator=g)
        for reduction in ("mean", "sum", "none"):
            ours = fl.cross_entropy(z, t, reduction=reduction, weight=w)
            eager = F.cross_entropy(z, t, weight=w, reduction=reduction)
            if len(shape) == 2:  # the same op on the same tensors
                assert torch.equal(ours, eager), (shape, reduction)
            else:  # (N, C, d) runs on the (N * d, C) copy: PyTorch's 16-bit rounding differs between layouts
                ref64 = F.cross_entropy(z.double(), t.double() if probs else t, weight=w.double(), reduction=reduction)
                assert_matches(ours, ref64, eager, what=f"{shape} {reduction}")


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_small_cpp_calls_under_autocast(monkeypatch, grad):
    """Under CPU autocast the C++ small-call gates give the Python routes' dtypes, bits and nodes
    (ATen's ops called from C++ pass through the same autocast dispatch)."""
    from fastlayers import _dispatch
    from fastlayers.ops import norms
    torch.manual_seed(0)
    lin = fl.FusedLinear(64, 96, activation="gelu")
    ln = fl.LayerNorm(96)
    x = torch.randn(40, 64, requires_grad=grad)
    r = torch.randn(40, 96)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            h = lin(x)
            return (h,) + tuple(ln(h.float(), r))
    taken = []
    _spy(monkeypatch, _dispatch, "_FAST_SMALL_LINEAR", taken)
    _spy(monkeypatch, norms, "_FAST_SMALL_NORM", taken)
    ours = run()
    assert taken == ["_FAST_SMALL_LINEAR", "_FAST_SMALL_NORM"]
    monkeypatch.setattr(_dispatch, "_FAST_SMALL_LINEAR", None)
    monkeypatch.setattr(norms, "_FAST_SMALL_NORM", None)
    for a, b in zip(ours, run()):
        assert a.dtype == b.dtype and torch.equal(a, b) and type(a.grad_fn) is type(b.grad_fn)
