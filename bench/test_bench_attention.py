"""CPU benchmarks: fused scaled-dot-product attention (fastlayers/ops/attention.py) against
PyTorch's ``F.scaled_dot_product_attention`` (its CPU flash attention) and its torch.compile, causal,
at the small head dims the fused kernels take (nanoGPT at a character vocabulary: 4 heads of 16;
q, k, v as nanoGPT makes them: transposed views of one (B, T, 3 H D) buffer), forward and
forward + backward, fp32 and bf16. Bytes are the minimum traffic: q, k, v read and the output
written (4 x B H T D x itemsize); fwd+bwd also reads dout and writes dq, dk, dv (8 x).
FASTLAYERS_BENCH_QUICK=1 shrinks shapes and rounds.
"""
import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from harness import QUICK, dtype_name, randn

SHAPES = [(4, 4, 256, 16)] if QUICK else [(4, 4, 256, 16), (8, 6, 256, 32), (2, 8, 1024, 16)]  # (B, H, T, D)
DTYPES = [torch.float32, torch.bfloat16]


def _qkv(B, H, T, D, dtype, grad):
    x = randn(B, T, 3 * H * D, dtype=dtype, seed=1, requires_grad=grad)
    return x, [t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=2)]


def _info(shape, dtype, pass_, backend):
    return {"suite": "cpu", "op": "attention", "shape": "x".join(map(str, shape)),
            "dtype": dtype_name(dtype), "pass": pass_, "backend": backend}


def _fns(sdpa_compiled, q, k, v):
    return {"fastlayers": lambda: fl.scaled_dot_product_attention(q, k, v, is_causal=True),
            "eager": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "compile": lambda: sdpa_compiled(q, k, v)}


def _compiled():
    return torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), dynamic=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention(compare, cpu_backend, shape, dtype):
    x, (q, k, v) = _qkv(*shape, dtype, True)
    dout = randn(*shape, dtype=dtype, seed=2)
    nbytes = q.numel() * q.element_size()

    def grad(f):
        return lambda: torch.autograd.grad(f(), x, dout)
    fns = {name: grad(f) for name, f in _fns(_compiled(), q, k, v).items()}
    compare(fns, info=_info(shape, dtype, "fwd+bwd", cpu_backend), bytes_moved=8 * nbytes)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_forward(compare, cpu_backend, shape, dtype):
    _, (q, k, v) = _qkv(*shape, dtype, False)
    nbytes = q.numel() * q.element_size()
    with torch.no_grad():
        compare(_fns(_compiled(), q, k, v), info=_info(shape, dtype, "fwd", cpu_backend), bytes_moved=4 * nbytes)
