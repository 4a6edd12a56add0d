"""CPU benchmarks: fused RMSNorm / LayerNorm with the residual add (fastlayers/ops/norms.py), forward +
backward, against what a model runs today:

* rms_norm (Hugging Face semantics): the LlamaRMSNorm forward eager, its torch.compile, and
  F.rms_norm eager (`torch_rms`: not one kernel on the CPU);
* add_rms_norm: ``s = x + r; F.rms_norm(s)`` eager and compiled vs fl.rms_norm(x, w, residual=r);
* add_layer_norm: ``F.layer_norm(x + r)`` eager and compiled vs fl.layer_norm(..., residual=r);
* add_rms_norm forward only, with `copy` (``out.copy_(x)``, 2 bytes per element of x) as the
  machine's copy-bandwidth ceiling for the GB/s column.

Every fwd+bwd contender returns the same gradients (x, residual, weight [, bias]) from the same
dy (and ds, the sum's gradient). Bytes are fastlayers' minimum traffic: fwd reads x [, r] and
writes y [, s]; bwd reads dy [, ds] and the saved x-or-s, writes dx (dx is also dr).
FASTLAYERS_BENCH_QUICK=1 shrinks shapes and rounds.
"""
import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from harness import QUICK, dtype_name, randn

SHAPES = [(512, 256), (256, 1024)] if QUICK else [(8192, 1024), (2048, 4096)]
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6


def hf_rms(x, w):
    """transformers' LlamaRMSNorm.forward."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(dt)


def add_rms(x, r, w):
    s = x + r
    return F.rms_norm(s, s.shape[-1:], w, EPS), s


def add_ln(x, r, w, b):
    s = x + r
    return F.layer_norm(s, s.shape[-1:], w, b, 1e-5), s


def _grads(f, inputs, outs_grads):
    def run():
        outs = f(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, inputs, outs_grads[:len(outs)])
    return run


def _info(op, shape, dtype, pass_, backend):
    return {"suite": "cpu", "op": op, "shape": "x".join(map(str, shape)), "dtype": dtype_name(dtype),
            "pass": pass_, "backend": backend}


def _nbytes(shape, dtype):
    return shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()


def _add_norm_fns(ours, eager, shape, dtype, bias):
    """fastlayers' fused add + norm `ours`, its eager composition and that compiled, each a fwd+bwd
    run on the same x, residual, weight [, bias] (all requiring grad), with the gradients dy of the
    output and ds of the sum."""
    x = randn(*shape, dtype=dtype, seed=1, requires_grad=True)
    r = randn(*shape, dtype=dtype, seed=4, requires_grad=True)
    w = randn(shape[1], dtype=dtype, seed=3, scale=0.2).add_(1.0).requires_grad_()
    ins = (x, r, w) + ((randn(shape[1], dtype=dtype, seed=6, scale=0.2).requires_grad_(),) if bias else ())
    grads = (randn(*shape, dtype=dtype, seed=2), randn(*shape, dtype=dtype, seed=5))
    return {"fastlayers": _grads(ours, ins, grads), "eager": _grads(eager, ins, grads),
            "compile": _grads(torch.compile(eager, dynamic=False), ins, grads)}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm(compare, cpu_backend, shape, dtype):
    x = randn(*shape, dtype=dtype, seed=1, requires_grad=True)
    w = randn(shape[1], dtype=dtype, seed=3, scale=0.2).add_(1.0).requires_grad_()
    dy = randn(*shape, dtype=dtype, seed=2)
    nbytes = x.numel() * x.element_size()
    fns = {"fastlayers": _grads(lambda x, w: fl.rms_norm(x, w, EPS), (x, w), (dy,)),
           "eager": _grads(hf_rms, (x, w), (dy,)),
           "compile": _grads(torch.compile(hf_rms, dynamic=False), (x, w), (dy,)),
           "torch_rms": _grads(lambda x, w: F.rms_norm(x, x.shape[-1:], w, EPS), (x, w), (dy,))}
    compare(fns, info=_info("rms_norm", shape, dtype, "fwd+bwd", cpu_backend), bytes_moved=5 * nbytes)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_rms_norm(compare, cpu_backend, shape, dtype):
    fl_add_rms = lambda x, r, w: fl.rms_norm(x, w, EPS, residual=r, mode="torch")  # noqa: E731
    compare(_add_norm_fns(fl_add_rms, add_rms, shape, dtype, bias=False),
            info=_info("add_rms_norm", shape, dtype, "fwd+bwd", cpu_backend), bytes_moved=8 * _nbytes(shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_layer_norm(compare, cpu_backend, shape, dtype):
    fl_add_ln = lambda x, r, w, b: fl.layer_norm(x, x.shape[-1], w, b, 1e-5, residual=r)  # noqa: E731
    compare(_add_norm_fns(fl_add_ln, add_ln, shape, dtype, bias=True),
            info=_info("add_layer_norm", shape, dtype, "fwd+bwd", cpu_backend), bytes_moved=8 * _nbytes(shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_rms_norm_forward(compare, cpu_backend, shape, dtype):
    x, r = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=4)
    w = randn(shape[1], dtype=dtype, seed=3, scale=0.2).add_(1.0)
    out = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    compiled = torch.compile(add_rms, dynamic=False)
    fns = {"fastlayers": lambda: fl.rms_norm(x, w, EPS, residual=r, mode="torch"),
           "eager": lambda: add_rms(x, r, w), "compile": lambda: compiled(x, r, w),
           "copy": lambda: out.copy_(x)}
    with torch.no_grad():
        compare(fns, info=_info("add_rms_norm", shape, dtype, "fwd", cpu_backend),
                bytes_moved={"fastlayers": 4 * nbytes, "eager": 4 * nbytes, "compile": 4 * nbytes,
                             "copy": 2 * nbytes})
