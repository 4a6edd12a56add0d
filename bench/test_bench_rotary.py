"""CPU benchmarks: fused rotary position embeddings (fastlayers/ops/rotary.py), q and k together,
against Hugging Face's ``apply_rotary_pos_emb`` (Llama's, written out below as transformers has it)
eager and under torch.compile:

* fwd+bwd: (q_embed, k_embed) and the gradients of q and k from the same (dq_embed, dk_embed);
* fwd only, with `copy` (``out.copy_(q)`` on q and k: 2 bytes per element) as the machine's copy
  ceiling for the GB/s column.

Inputs are what a Llama attention layer hands over: q (B, H, S, D) and k (B, KV, S, D) as
``.view(B, S, H, D).transpose(1, 2)`` views, cos / sin (B, S, D) in the same dtype. Bytes are
fastlayers' minimum traffic: fwd reads q, k and writes q_embed, k_embed (+ cos and sin once);
bwd reads the two output gradients and writes dq, dk (+ cos and sin once).
FASTLAYERS_BENCH_QUICK=1 shrinks shapes and rounds.
"""
import pytest
import torch

import fastlayers as fl
from harness import QUICK, dtype_name, randn

# (B, H, KV, S, D): Llama-style GQA at head dims 128 (Llama 3 / Mistral) and 64 (small models)
SHAPES = [(1, 8, 2, 256, 128), (1, 8, 2, 256, 64)] if QUICK else [(1, 32, 8, 2048, 128), (2, 32, 8, 1024, 64)]
DTYPES = [torch.float32, torch.bfloat16]


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' Llama apply_rotary_pos_emb (without its kernels-hub wrapper)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def _inputs(shape, dtype, requires_grad):
    b, h, kv, s, d = shape
    q = randn(b, s, h, d, dtype=dtype, seed=1).transpose(1, 2).requires_grad_(requires_grad)
    k = randn(b, s, kv, d, dtype=dtype, seed=2).transpose(1, 2).requires_grad_(requires_grad)
    pos = torch.arange(s, dtype=torch.float32)[:, None] * (1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    emb = torch.cat((pos, pos), -1).expand(b, s, d)
    return q, k, emb.cos().to(dtype).contiguous(), emb.sin().to(dtype).contiguous()


def _info(shape, dtype, pass_, backend):
    return {"suite": "cpu", "op": "rotary", "shape": "x".join(map(str, shape)), "dtype": dtype_name(dtype),
            "pass": pass_, "backend": backend}


def _bytes(shape, dtype):
    b, h, kv, s, d = shape
    es = torch.finfo(dtype).bits // 8
    return (2 * b * (h + kv) * s * d + 2 * b * s * d) * es  # q, k in and out; cos, sin once


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rotary(compare, cpu_backend, shape, dtype):
    q, k, cos, sin = _inputs(shape, dtype, True)
    dq, dk = randn(*q.shape, dtype=dtype, seed=3), randn(*k.shape, dtype=dtype, seed=4)

    def grads(f):
        def run():
            a, b = f(q, k, cos, sin)
            return torch.autograd.grad((a, b), (q, k), (dq, dk))
        return run
    fns = {"fastlayers": grads(fl.rotary), "eager": grads(hf_apply),
           "compile": grads(torch.compile(hf_apply, dynamic=False))}
    compare(fns, info=_info(shape, dtype, "fwd+bwd", cpu_backend), bytes_moved=2 * _bytes(shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rotary_forward(compare, cpu_backend, shape, dtype):
    q, k, cos, sin = _inputs(shape, dtype, False)
    oq, ok = torch.empty_like(q), torch.empty_like(k)
    compiled = torch.compile(hf_apply, dynamic=False)
    nbytes = _bytes(shape, dtype)
    fns = {"fastlayers": lambda: fl.rotary(q, k, cos, sin), "eager": lambda: hf_apply(q, k, cos, sin),
           "compile": lambda: compiled(q, k, cos, sin), "copy": lambda: (oq.copy_(q), ok.copy_(k))}
    with torch.no_grad():
        b, h, kv, s, d = shape
        copy = 2 * b * (h + kv) * s * d * (torch.finfo(dtype).bits // 8)
        compare(fns, info=_info(shape, dtype, "fwd", cpu_backend),
                bytes_moved={"fastlayers": nbytes, "eager": nbytes, "compile": nbytes, "copy": copy})
