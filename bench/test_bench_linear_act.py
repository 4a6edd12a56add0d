"""CPU benchmarks: fused linear + activation vs eager PyTorch vs torch.compile.

One test per (activation, shape, dtype, pass); each pytest-benchmark round runs every contender
once (bench/harness.py). Shapes are (M, K, N): x (M, K) @ W.T (K -> N) + b.
FASTLAYERS_BENCH_QUICK=1 shrinks shapes and rounds to check the suite end to end.
"""
import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from harness import QUICK, dtype_name, randn

SHAPES = [(256, 128, 512), (512, 64, 256), (64, 512, 512)] if QUICK else \
         [(2048, 1024, 4096), (8192, 256, 1024), (256, 4096, 4096)]
DTYPES = [torch.float32, torch.bfloat16]
EAGER_ACT = {"gelu": F.gelu, "relu": F.relu}


def eager_fn(act):
    f = EAGER_ACT[act]

    def linear_act(x, w, b):  # what a model written with nn.Linear + activation runs
        return f(F.linear(x, w, b))
    return linear_act


def fastlayers_fn(act):
    def linear_act(x, w, b):
        return fl.linear_act(x, w, b, activation=act)
    return linear_act


def contenders(act):
    eager = eager_fn(act)
    # dynamic=False: one static specialisation per test, as a fixed-shape model would get.
    return {"fastlayers": fastlayers_fn(act), "eager": eager,
            "compile": torch.compile(eager, dynamic=False)}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_linear_act(compare, cpu_backend, pass_, act, shape, dtype):
    m, k, n = shape
    grad = pass_ == "fwd+bwd"
    # W scaled like nn.Linear's init so pre-activations are O(1): both sides of the GELU/ReLU kink.
    x = randn(m, k, dtype=dtype, seed=1, requires_grad=grad)
    w = randn(n, k, dtype=dtype, seed=2, scale=k ** -0.5, requires_grad=grad)
    b = randn(n, dtype=dtype, seed=3, scale=0.1, requires_grad=grad)
    es = x.element_size()
    fwd_bytes = es * (m * k + n * k + n + m * n)  # read x, W, b; write y
    info = {"suite": "cpu", "op": f"linear_{act}", "shape": f"{m}x{k}x{n}", "dtype": dtype_name(dtype),
            "pass": pass_, "backend": cpu_backend}

    if not grad:
        def run(f):
            return lambda: f(x, w, b)
        with torch.no_grad():
            compare({name: run(f) for name, f in contenders(act).items()}, info=info,
                    bytes_moved=fwd_bytes, flops=2 * m * k * n)
    else:
        dy = randn(m, n, dtype=dtype, seed=4)

        def run(f):
            return lambda: torch.autograd.grad(f(x, w, b), (x, w, b), dy)
        # + read dy; write dx, dW, db. FLOPs: the forward GEMM and the two backward ones.
        compare({name: run(f) for name, f in contenders(act).items()}, info=info,
                bytes_moved=fwd_bytes + es * (m * n + m * k + n * k + n), flops=6 * m * k * n)


CALLS = 200  # calls per timed sample: one tiny call is too short to time on its own


def test_overhead_linear_relu(compare, cpu_backend):
    """Per-call overhead (dispatch, validation, autograd/custom-op plumbing) at a tiny shape."""
    x, w, b = randn(4, 8, seed=1), randn(8, 8, seed=2), randn(8, seed=3)

    def loop(f):
        def run():
            for _ in range(CALLS):
                f(x, w, b)
        return run
    with torch.no_grad():
        compare({name: loop(f) for name, f in contenders("relu").items()}, calls_per_sample=CALLS,
                info={"suite": "cpu", "op": "overhead_linear_relu", "shape": "4x8x8",
                      "dtype": "float32", "pass": "fwd", "backend": cpu_backend})
