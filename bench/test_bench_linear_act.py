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


# oneDNN's fused GEMM + post-op as PyTorch exposes it (private op), for the peers column.
ONEDNN_ATTR = {"gelu": ("gelu", "none"), "relu": ("relu", "")}


def inference_peers(act, x, w, b):
    """No-grad forward contenders besides eager / compile, all on the same x, W, b:
    fastlayers     FusedLinear in no-grad use: what a swapped model runs (no packed copy)
    fl_prepacked   the same, frozen and opted in to prepacked weights (fl.prepack)
    fl_functional  fl.linear_act(x, w, b)
    onednn         torch.ops.mkldnn._linear_pointwise(x, w, b, act)
    compile_max    torch.compile(mode="max-autotune") of Linear + activation with inductor
                   freezing (weights prepacked, CPP GEMM template); gelu only (compile time)
    linear         F.linear(x, w, b) alone: the epilogue-is-free ceiling"""
    n, k = w.shape
    mod = fl.FusedLinear(k, n, activation=act, dtype=w.dtype)
    packed = fl.FusedLinear(k, n, activation=act, dtype=w.dtype, prepack=True).requires_grad_(False)
    ref = torch.nn.Sequential(torch.nn.Linear(k, n, dtype=w.dtype), EAGER_MODULE[act]())
    with torch.no_grad():
        for m in (mod, packed, ref[0]):
            m.weight.copy_(w)
            m.bias.copy_(b)
    mod.eval(), ref.eval()
    attr, alg = ONEDNN_ATTR[act]
    out = {"fastlayers": lambda: mod(x), "fl_prepacked": lambda: packed(x),
           "fl_functional": lambda: fl.linear_act(x, w, b, activation=act),
           "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], alg)}
    if act == "gelu" and not QUICK:
        out["compile_max"] = torch.compile(ref, mode="max-autotune", dynamic=False)
    out["linear"] = lambda: F.linear(x, w, b)
    return out


EAGER_MODULE = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU}


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
        c = {name: run(f) for name, f in contenders(act).items()}
        peers = inference_peers(act, x, w, b)
        c["fastlayers"] = peers.pop("fastlayers")
        c.update(peers)
        compile_max = "compile_max" in c
        if compile_max:
            c["compile_max"] = (lambda f: lambda: f(x))(c["compile_max"])
        with torch.no_grad(), torch._inductor.config.patch(freezing=compile_max):
            compare(c, info=info, bytes_moved=fwd_bytes, flops=2 * m * k * n,
                    baselines=("eager", "compile", "compile_max", "onednn"))
    else:
        dy = randn(m, n, dtype=dtype, seed=4)

        def run(f):
            return lambda: torch.autograd.grad(f(x, w, b), (x, w, b), dy)
        # + read dy; write dx, dW, db. FLOPs: the forward GEMM and the two backward ones.
        compare({name: run(f) for name, f in contenders(act).items()}, info=info,
                bytes_moved=fwd_bytes + es * (m * n + m * k + n * k + n), flops=6 * m * k * n)


CALLS = 200  # calls per timed sample: one tiny call is too short to time on its own


def module_pair(act: str, w, b):
    """FusedLinear(act) and nn.Sequential(nn.Linear, activation module), both holding w and b."""
    n, k = w.shape
    mod = fl.FusedLinear(k, n, activation=act)
    ref = torch.nn.Sequential(torch.nn.Linear(k, n), EAGER_MODULE[act]())
    with torch.no_grad():
        for lin in (mod, ref[0]):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    return mod, ref


def compare_looped(compare, fns, calls, info, **kw):
    """compare() of contenders that each run `calls` times per sample (per-call times), no grad."""
    def loop(f):
        def run():
            for _ in range(calls):
                f()
        return run
    with torch.no_grad():
        compare({name: loop(f) for name, f in fns.items()}, calls_per_sample=calls, info=info,
                baselines=("eager", "eager_module"), **kw)


@pytest.mark.parametrize("shape", [(1, 64, 64), (8, 256, 256), (32, 512, 512)], ids=lambda s: "x".join(map(str, s)))
def test_small_batch_linear_relu(compare, cpu_backend, shape):
    """Small batches without grad: FusedLinear (fastlayers) and fl.linear_act vs eager."""
    m, k, n = shape
    x, w, b = randn(m, k, seed=1), randn(n, k, seed=2, scale=k ** -0.5), randn(n, seed=3)
    mod, ref = module_pair("relu", w, b)
    fns = {"fastlayers": lambda: mod(x), "fl_functional": lambda: fl.linear_act(x, w, b, "relu"),
           "eager": lambda: F.relu(F.linear(x, w, b)), "eager_module": lambda: ref(x)}
    compare_looped(compare, fns, CALLS, {"suite": "cpu", "op": "small_batch_linear_relu",
                                         "shape": "x".join(map(str, shape)), "dtype": "float32",
                                         "pass": "fwd", "backend": cpu_backend})


FEW_ROWS = [(1, 256, 1024), (2, 512, 1024)] if QUICK else \
           [(1, 768, 3072), (1, 4096, 1024), (4, 1024, 4096), (8, 1024, 1024)]


@pytest.mark.parametrize("shape", FEW_ROWS, ids=lambda s: "x".join(map(str, s)))
def test_few_rows_linear_gelu(compare, cpu_backend, shape):
    """Batch-1 to batch-8 inference (decode-like GEMVs), linear+GELU fp32 without grad:
    FusedLinear (as swap leaves it, and opted in to prepacked weights) and fl.linear_act vs eager
    modules / functions."""
    m, k, n = shape
    x, w, b = randn(m, k, seed=1), randn(n, k, seed=2, scale=k ** -0.5), randn(n, seed=3)
    mod, ref = module_pair("gelu", w, b)
    packed, _ = module_pair("gelu", w, b)
    fl.prepack(packed.requires_grad_(False))
    # Each contender reads its own copy of W: these GEMVs are bound by reading W, and one shared
    # copy would sit in L3 for whichever contender runs after another (a model's many layers
    # don't stay there either).
    w1, w2 = w.clone(), w.clone()
    fns = {"fastlayers": lambda: mod(x), "fl_prepacked": lambda: packed(x),
           "fl_functional": lambda: fl.linear_act(x, w1, b, "gelu"),
           "eager": lambda: F.gelu(F.linear(x, w2, b)), "eager_module": lambda: ref(x)}
    calls = max(1, (1 << 24) // (m * k * n))  # ~16M multiply-adds per sample
    compare_looped(compare, fns, calls, {"suite": "cpu", "op": "few_rows_linear_gelu",
                                         "shape": "x".join(map(str, shape)), "dtype": "float32",
                                         "pass": "fwd", "backend": cpu_backend},
                   bytes_moved=4 * (m * k + n * k + n + m * n), flops=2 * m * k * n)


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
