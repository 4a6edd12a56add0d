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


@pytest.mark.parametrize("kind", ["layer", "rms_hf", "rms_torch"])
@pytest.mark.parametrize("residual", [False, True])
def test_small_norm_modules(monkeypatch, kind, residual):
    """The modules' fast path gives the general path's bits (the same PyTorch ops), and the
    general path still raises fastlayers' own errors for what the fast path does not admit."""
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
    r = torch.randn(2, 16, 64) if residual else None
    fast = []
    real = norms.norm_composite
    monkeypatch.setattr(norms, "norm_composite", lambda *a: fast.append(1) or real(*a))
    out = mod(x, r) if residual else mod(x)
    assert fast, "the fast path was not taken"
    monkeypatch.setattr(norms, "_small_cpu_norm", lambda *a: None)  # the general path
    ref = mod(x, r) if residual else mod(x)
    for a, b in zip(out if residual else (out,), ref if residual else (ref,)):
        assert torch.equal(a, b)
    monkeypatch.undo()
    with pytest.raises(Exception, match="fastlayers"):
        mod(torch.randn(2, 16, 65))
