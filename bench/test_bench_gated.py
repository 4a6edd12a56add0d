"""CPU benchmarks: the gated MLP (SwiGLU) vs eager PyTorch vs torch.compile.

Two ops, each fwd and fwd+bwd, fp32 and bf16 (one pytest-benchmark round runs every contender
once: bench/harness.py):
* gated:  h = silu(x @ Wg^T) * (x @ Wu^T)          fl.gated_linear vs the eager expression
* mlp:    down(silu(gate(x)) * up(x))               fl.FusedGatedMLP vs a Llama-style nn.Module
Shapes are (M, hidden, intermediate): Llama-7B's MLP is 4096 -> 11008 at M = 512 tokens; this
2-core CPU runs it scaled by 1/4 in both widths (1024 -> 2752, same 2.69 ratio), plus the full
width for the gated forward. FASTLAYERS_BENCH_QUICK=1 shrinks everything to check the suite.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlayers as fl
from harness import QUICK, dtype_name, randn

SHAPES = [(64, 128, 344)] if QUICK else [(512, 1024, 2752)]
FULL = [] if QUICK else [(512, 4096, 11008)]
DTYPES = [torch.float32, torch.bfloat16]


def eager_gated(x, wg, wu):  # what Llama's MLP computes before down_proj
    return F.silu(F.linear(x, wg)) * F.linear(x, wu)


def fl_gated(x, wg, wu):
    return fl.gated_linear(x, wg, wu, activation="silu")


class LlamaMLP(nn.Module):
    def __init__(self, hidden, inter, dtype):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _info(op, shape, dtype, pass_, backend):
    return {"suite": "cpu", "op": op, "shape": "x".join(map(str, shape)), "dtype": dtype_name(dtype),
            "pass": pass_, "backend": backend}


# The full Llama-7B width: fp32 forward only (a fwd+bwd round would take seconds on 2 cores).
CASES = ([(p, s, d) for p in ("fwd", "fwd+bwd") for s in SHAPES for d in DTYPES]
         + [("fwd", s, torch.float32) for s in FULL])


@pytest.mark.parametrize("pass_,shape,dtype", CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else
                         dtype_name(v) if isinstance(v, torch.dtype) else v)
def test_gated_linear(compare, cpu_backend, pass_, shape, dtype):
    m, k, n = shape
    grad = pass_ == "fwd+bwd"
    x = randn(m, k, dtype=dtype, seed=1, requires_grad=grad)
    wg = randn(n, k, dtype=dtype, seed=2, scale=k ** -0.5, requires_grad=grad)
    wu = randn(n, k, dtype=dtype, seed=3, scale=k ** -0.5, requires_grad=grad)
    es = x.element_size()
    fwd_bytes = es * (m * k + 2 * n * k + m * n)  # read x, Wg, Wu; write h
    contenders = {"fastlayers": fl_gated, "eager": eager_gated,
                  "compile": torch.compile(eager_gated, dynamic=False)}
    info = _info("gated_silu", shape, dtype, pass_, cpu_backend)
    if not grad:
        with torch.no_grad():
            compare({name: (lambda f=f: f(x, wg, wu)) for name, f in contenders.items()}, info=info,
                    bytes_moved=fwd_bytes, flops=4 * m * k * n)
    else:
        dh = randn(m, n, dtype=dtype, seed=4)
        compare({name: (lambda f=f: torch.autograd.grad(f(x, wg, wu), (x, wg, wu), dh))
                 for name, f in contenders.items()}, info=info,
                bytes_moved=fwd_bytes + es * (m * n + m * k + 2 * n * k), flops=12 * m * k * n)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_gated_mlp(compare, cpu_backend, pass_, shape, dtype):
    m, k, n = shape
    grad = pass_ == "fwd+bwd"
    torch.manual_seed(0)
    plain = LlamaMLP(k, n, dtype)
    fused = fl.FusedGatedMLP(k, n, dtype=dtype)
    fused.load_state_dict(plain.state_dict())
    compiled = torch.compile(plain, dynamic=False)
    x = randn(m, k, dtype=dtype, seed=1, requires_grad=grad)
    contenders = {"fastlayers": fused, "eager": plain, "compile": compiled}
    es = x.element_size()
    fwd_bytes = es * (2 * m * k + 3 * n * k)  # read x and the three weights, write y
    info = _info("llama_mlp_silu", shape, dtype, pass_, cpu_backend)
    if not grad:
        with torch.no_grad():
            compare({name: (lambda f=f: f(x)) for name, f in contenders.items()}, info=info,
                    bytes_moved=fwd_bytes, flops=6 * m * k * n)
    else:
        dy = randn(m, k, dtype=dtype, seed=4)

        def step(mod):
            params = [p for p in mod.parameters()]
            return lambda: torch.autograd.grad(mod(x), [x] + params, dy)
        compare({name: step(f if name != "compile" else compiled) for name, f in contenders.items()},
                info=info, bytes_moved=2 * fwd_bytes + es * (m * k + 3 * n * k), flops=18 * m * k * n)
