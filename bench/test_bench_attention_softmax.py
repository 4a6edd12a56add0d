"""CPU benchmarks: the fused attention-score softmax (fastlayers/ops/attention_softmax.py) against
the score softmax of Hugging Face eager attention, as its ``eager_attention_forward`` writes it:

    w = scores * scaling + causal_mask        # causal_mask: (1, 1, L, S), 0 / finfo(dtype).min
    p = softmax(w, dim=-1, dtype=torch.float32).to(dtype)

eager and its torch.compile, vs ``fl.attention_softmax(scores, scaling, causal=True)`` (the causal
mask from the indices); forward and forward + backward (dscores from the same dp), fp32 and bf16.
Bytes are fastlayers' minimum traffic over all B*H*L*S scores: fwd reads the scores and writes p
(2 x numel x itemsize; causal skips reading about half the scores: not counted); fwd+bwd also
reads dp and p and writes dscores (5 x). FASTLAYERS_BENCH_QUICK=1 shrinks shapes and rounds.
"""
import pytest
import torch

import fastlayers as fl
from harness import QUICK, dtype_name, randn

SHAPES = [(1, 12, 512, 512), (1, 16, 1024, 1024)] if QUICK else \
    [(4, 12, 512, 512), (2, 16, 1024, 1024), (1, 32, 2048, 2048)]
DTYPES = [torch.float32, torch.bfloat16]


def causal_mask(L, S, dtype):
    """Hugging Face's additive causal mask for eager attention: 0 where allowed, the dtype's minimum."""
    m = torch.full((L, S), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


def hf_softmax(scores, mask, scaling):
    w = scores * scaling + mask
    return torch.softmax(w, dim=-1, dtype=torch.float32).to(scores.dtype)


def _info(shape, dtype, pass_, backend):
    return {"suite": "cpu", "op": "attention_softmax", "shape": "x".join(map(str, shape)),
            "dtype": dtype_name(dtype), "pass": pass_, "backend": backend}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_softmax(compare, cpu_backend, shape, dtype):
    B, H, L, S = shape
    scaling = 64 ** -0.5
    s = randn(*shape, dtype=dtype, seed=1, scale=8.0, requires_grad=True)
    dp = randn(*shape, dtype=dtype, seed=2)
    mask = causal_mask(L, S, dtype)
    compiled = torch.compile(hf_softmax, dynamic=False)
    nbytes = s.numel() * s.element_size()

    def grad(f):
        return lambda: torch.autograd.grad(f(), s, dp)
    fns = {"fastlayers": grad(lambda: fl.attention_softmax(s, scaling, causal=True)),
           "eager": grad(lambda: hf_softmax(s, mask, scaling)),
           "compile": grad(lambda: compiled(s, mask, scaling))}
    compare(fns, info=_info(shape, dtype, "fwd+bwd", cpu_backend), bytes_moved=5 * nbytes)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_softmax_forward(compare, cpu_backend, shape, dtype):
    B, H, L, S = shape
    scaling = 64 ** -0.5
    s = randn(*shape, dtype=dtype, seed=1, scale=8.0)
    mask = causal_mask(L, S, dtype)
    compiled = torch.compile(hf_softmax, dynamic=False)
    nbytes = s.numel() * s.element_size()
    fns = {"fastlayers": lambda: fl.attention_softmax(s, scaling, causal=True),
           "eager": lambda: hf_softmax(s, mask, scaling), "compile": lambda: compiled(s, mask, scaling)}
    with torch.no_grad():
        compare(fns, info=_info(shape, dtype, "fwd", cpu_backend), bytes_moved=2 * nbytes)
