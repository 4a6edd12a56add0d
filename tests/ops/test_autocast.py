"""Autocast: FusedLinear behaves like nn.Linear + activation (autocast dtype
out, low-precision GEMM, fp32 parameter gradients); fl.softmax/log_softmax follow PyTorch's
autocast policy for softmax (compared with torch's own ops, so a policy change shows up here)."""
from __future__ import annotations


import pytest
import torch
import torch._dynamo
from torch import nn

import fastlayers as fl
from fastlayers.activations import NAMES
from conftest import skip_low_precision
from integration_helpers import backend_skip_reason

K, N = 48, 24


def _pair(act: str, device: str):
    """(FusedLinear, nn.Linear + activation module) with the same parameters."""
    torch.manual_seed(0)
    fused = fl.FusedLinear(K, N, activation=act, negative_slope=0.2, device=device)
    plain = nn.Sequential(nn.Linear(K, N, device=device), fl.activations.get(act).module(0.2))
    plain[0].load_state_dict(fused.state_dict())
    return fused, plain


def _lowp_err_ok(out: torch.Tensor, torch_out: torch.Tensor, exact: torch.Tensor) -> None:
    """Our error against an fp32 computation on the same rounded inputs is at most twice
    PyTorch's own (+ a small epsilon), as in tests elsewhere for fp16/bf16."""
    ours = (out.float() - exact).abs().max().item()
    theirs = (torch_out.float() - exact).abs().max().item()
    eps = torch.finfo(out.dtype).eps * exact.abs().max().item()
    assert ours <= 2 * theirs + eps, (ours, theirs, eps)


def _check_linear(act: str, device: str, dtype: torch.dtype) -> None:
    fused, plain = _pair(act, device)
    x = torch.randn(3, 5, K, device=device)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        out, exp = fused(xf), plain(xp)
        assert out.dtype == exp.dtype == dtype
        # fp32 math on the same low-precision-rounded operands
        r = lambda t: t.to(dtype).float()  # noqa: E731
        exact = fl.activations.get(act).ref(
            torch.nn.functional.linear(r(x), r(fused.weight), r(fused.bias)), 0.2)
    _lowp_err_ok(out, exp, exact)
    g = torch.randn_like(exp)
    out.backward(g)
    exp.backward(g)
    # gradients land on the fp32 parameters / input in fp32, as with nn.Linear
    for a, b in ((xf.grad, xp.grad), (fused.weight.grad, plain[0].weight.grad),
                 (fused.bias.grad, plain[0].bias.grad)):
        assert a.dtype == b.dtype == torch.float32
        scale = b.abs().max().item() + 1e-3
        assert (a - b).abs().max().item() <= 4 * torch.finfo(dtype).eps * scale * K ** 0.5


@pytest.mark.parametrize("act", NAMES)
def test_fused_linear_cpu_bf16(backend, act):
    skip_low_precision(backend)
    _check_linear(act, "cpu", torch.bfloat16)


def _check_softmax(device: str, dtype: torch.dtype, in_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(4, 7, device=device) * 3).to(in_dtype)
    with torch.autocast(device, dtype=dtype):
        for ours, theirs in ((fl.softmax, torch.softmax), (fl.log_softmax, torch.log_softmax)):
            out, exp = ours(x, 1), theirs(x, 1)
            assert out.dtype == exp.dtype, (ours.__name__, in_dtype, out.dtype, exp.dtype)
            torch.testing.assert_close(out, exp, **({} if out.dtype != torch.bfloat16
                                                      else dict(atol=2e-2, rtol=2e-2)))
            # an explicit dtype wins, as in torch
            assert ours(x, 1, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_softmax_follows_torch_policy_cpu(backend, in_dtype):
    _check_softmax("cpu", torch.bfloat16, in_dtype)


def test_float64_is_not_cast(backend):
    """Autocast leaves float64 alone (its eligibility rule): so does FusedLinear."""
    fused, plain = _pair("gelu", "cpu")
    fused, plain = fused.double(), plain.double()
    x = torch.randn(4, K, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, exp = fused(x), plain(x)
    assert out.dtype == exp.dtype == torch.float64
    torch.testing.assert_close(out, exp)


def test_autocast_under_compile(backend):
    skip_low_precision(backend)
    fused, plain = _pair("silu", "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(nn.Sequential(fused, fl.Softmax(-1)), fullgraph=True)
    x = torch.randn(6, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
        exp = torch.softmax(plain(x), -1)
    assert out.dtype == exp.dtype == torch.bfloat16
    torch.testing.assert_close(out, exp, atol=2e-2, rtol=2e-2)


def test_no_autocast_no_cast(backend):
    fused, _ = _pair("relu", "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert fused(torch.randn(2, K)).dtype == torch.float32


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["triton", "reference"])
def test_cuda_autocast(name, dtype):
    why = backend_skip_reason(name, "cuda")
    if why is not None:
        pytest.skip(f"backend {name!r} unavailable on cuda: {why}")
    with fl.use_backend(name):
        for act in NAMES:
            _check_linear(act, "cuda", dtype)
        for in_dtype in (torch.float32, dtype):
            _check_softmax("cuda", dtype, in_dtype)
