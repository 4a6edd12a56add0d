"""GPU benchmarks (CUDA; the fastlayers default there is the Triton backend). Skipped without a GPU.

linear + GELU/ReLU at (M, K, N) = (8192, 4096, 16384), (8192, 1024, 4096), (4096, 4096, 4096):
    fastlayers vs eager vs torch.compile (default, and mode="max-autotune" unless
    FASTLAYERS_BENCH_MAX_AUTOTUNE=0) vs torch._addmm_activation (cuBLASLt epilogue; forward only;
    its GELU is the tanh one on CUDA), with the same-run torch.mm as the TFLOP/s ceiling.
softmax / log_softmax over rows of 1K .. 1M elements, ~256 MB per tensor: fastlayers vs eager vs
    torch.compile, with a same-run device-to-device copy of the same tensor as the GB/s ceiling.

Each contender is timed with triton.testing.do_bench(return_mode="median") (CUDA events; it
flushes L2 before every rep) inside one pytest-benchmark round; rounds interleave the contenders
as on the CPU (bench/harness.py). Compilation and autotuning happen in the untimed warm-up.
Inputs smaller than twice the L2 are rotated through several copies so no call reads the
previous call's data from L2.

FASTLAYERS_BENCH_QUICK=1 shrinks tensors and rounds. With FASTLAYERS_BENCH_GPU_DRYRUN=1 and no GPU,
the same code runs on the CPU at tiny sizes with perf_counter timing: a check of the code paths
only, its numbers mean nothing.
"""
import math
import os
import statistics
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from harness import QUICK, dtype_name, randn

DRYRUN = not torch.cuda.is_available() and os.environ.get("FASTLAYERS_BENCH_GPU_DRYRUN", "") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_AUTOTUNE = os.environ.get("FASTLAYERS_BENCH_MAX_AUTOTUNE", "1") not in ("", "0")
ROUNDS = 1 if (QUICK or DRYRUN) else 3

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not DRYRUN,
    reason="GPU benchmarks need a CUDA GPU (torch.cuda.is_available() is False here)")

if DRYRUN:
    LINEAR_SHAPES = [(64, 32, 128), (64, 16, 32)]
    ROW_LENGTHS = [1024, 16384]
    TENSOR_BYTES = 1 << 20
elif QUICK:
    LINEAR_SHAPES = [(4096, 1024, 4096), (2048, 2048, 2048)]
    ROW_LENGTHS = [1024, 16384, 1 << 20]
    TENSOR_BYTES = 64 << 20
else:
    LINEAR_SHAPES = [(8192, 4096, 16384), (8192, 1024, 4096), (4096, 4096, 4096)]
    ROW_LENGTHS = [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20]
    TENSOR_BYTES = 256 << 20  # large enough that L2 (50 MB on an H100) cannot hold it
DTYPES = [torch.bfloat16, torch.float32]


# ----------------------------------------------------------------------------- timing
def gpu_time(fn) -> float:
    """Seconds per call: median of do_bench's CUDA-event timings (L2 flushed before each)."""
    if DRYRUN:
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def n_copies(set_bytes: int) -> int:
    """How many input sets to rotate through so together they are at least twice the L2."""
    if DEVICE != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(8, math.ceil(2 * l2 / set_bytes)))


def rotating(sets, body):
    """A zero-argument callable that runs body(*sets[i]) on the next set each call."""
    state = {"i": 0}

    def call():
        s = sets[state["i"]]
        state["i"] = (state["i"] + 1) % len(sets)
        return body(*s)
    return call


def gpu_info(**kw):
    try:
        backend = fl.backends.select(torch.device(DEVICE), "bench").NAME
    except Exception as e:  # noqa: BLE001 - recorded; drop_if_broken then skips fastlayers
        backend = f"unavailable ({type(e).__name__})"
    info = {"suite": "gpu", "backend": backend,
            "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"}
    if DEVICE == "cuda":
        info["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    info.update(kw)
    return info


def drop_if_broken(fns, info, name="fastlayers"):
    """Keep the baselines when fastlayers itself can't run a case: record why, warn, go on."""
    try:
        fns[name]()
    except Exception as e:  # noqa: BLE001 - any failure of our own kernel is reported, not fatal
        info[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
        warnings.warn(f"{info['op']} {info['shape']} {info['dtype']} {info['pass']}: "
                      f"{name} failed, timing the others: {info[f'{name}_error']}")
        del fns[name]


def compiled(f):
    """name -> compiled f: torch.compile default, and max-autotune (GEMM autotuning + CUDA graphs)."""
    out = {"compile": torch.compile(f, dynamic=False)}
    if MAX_AUTOTUNE and DEVICE == "cuda":
        out["compile_max"] = torch.compile(f, mode="max-autotune", dynamic=False)
    return out


# ----------------------------------------------------------------------------- linear + act
EAGER_ACT = {"gelu": F.gelu, "relu": F.relu}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_gpu_linear_act(compare, pass_, act, shape, dtype):
    m, k, n = shape
    grad = pass_ == "fwd+bwd"
    es = torch.empty((), dtype=dtype).element_size()
    fwd_bytes = es * (m * k + n * k + n + m * n)  # read x, W, b; write y
    set_bytes = fwd_bytes + (es * m * n if grad else 0)
    sets = []
    for i in range(n_copies(set_bytes)):
        x = randn(m, k, dtype=dtype, device=DEVICE, seed=10 * i + 1, requires_grad=grad)
        w = randn(n, k, dtype=dtype, device=DEVICE, seed=10 * i + 2, scale=k ** -0.5, requires_grad=grad)
        b = randn(n, dtype=dtype, device=DEVICE, seed=10 * i + 3, scale=0.1, requires_grad=grad)
        dy = randn(m, n, dtype=dtype, device=DEVICE, seed=10 * i + 4) if grad else None
        sets.append((x, w, b, dy))

    eager_act = EAGER_ACT[act]

    def eager(x, w, b):
        return eager_act(F.linear(x, w, b))

    def fastlayers(x, w, b):
        return fl.linear_act(x, w, b, activation=act)

    fns = {"fastlayers": fastlayers, "eager": eager, **compiled(eager)}
    info = gpu_info(op=f"linear_{act}", shape=f"{m}x{k}x{n}", dtype=dtype_name(dtype),
                    rotated_sets=len(sets))
    info["pass"] = pass_
    flops = 2 * m * k * n
    if not grad:
        calls = {name: rotating(sets, lambda x, w, b, dy, f=f: f(x, w, b)) for name, f in fns.items()}
        # cuBLASLt's fused epilogue; its GELU is the tanh approximation on CUDA (erf on the CPU).
        use_gelu = act == "gelu"
        calls["addmm_act"] = rotating(
            sets, lambda x, w, b, dy: torch._addmm_activation(b, x, w.t(), use_gelu=use_gelu))
        calls["mm"] = rotating(sets, lambda x, w, b, dy: torch.mm(x, w.t()))  # GEMM alone: ceiling
        if use_gelu:
            info["addmm_act_gelu"] = "tanh" if DEVICE == "cuda" else "erf"
        drop_if_broken(calls, info)
        with torch.no_grad():
            compare(calls, info=info, time_fn=gpu_time, rounds=ROUNDS, warmup=3,
                    bytes_moved=fwd_bytes, flops=flops,
                    baselines=("eager", "compile", "compile_max", "addmm_act"))
    else:
        calls = {name: rotating(sets, lambda x, w, b, dy, f=f: torch.autograd.grad(f(x, w, b), (x, w, b), dy))
                 for name, f in fns.items()}
        # the three GEMMs of forward + backward alone: y = x W^T, dx = dy W, dW = dy^T x
        calls["mm"] = rotating(sets, lambda x, w, b, dy: (torch.mm(x, w.t()), torch.mm(dy, w),
                                                          torch.mm(dy.t(), x)))
        drop_if_broken(calls, info)
        compare(calls, info=info, time_fn=gpu_time, rounds=ROUNDS, warmup=3,
                bytes_moved=fwd_bytes + es * (m * n + m * k + n * k + n), flops=3 * flops,
                baselines=("eager", "compile", "compile_max"))


# ----------------------------------------------------------------------------- softmax
OPS = {"softmax": (fl.softmax, torch.softmax), "log_softmax": (fl.log_softmax, torch.log_softmax)}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("length", ROW_LENGTHS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_gpu_softmax(compare, pass_, op, length, dtype):
    grad = pass_ == "fwd+bwd"
    es = torch.empty((), dtype=dtype).element_size()
    rows = max(1, TENSOR_BYTES // (length * es))
    x = randn(rows, length, dtype=dtype, device=DEVICE, seed=1, scale=2.0, requires_grad=grad)
    dy = randn(rows, length, dtype=dtype, device=DEVICE, seed=2) if grad else None
    nbytes = x.numel() * es
    fl_op, torch_op = OPS[op]

    def eager(x):
        return torch_op(x, -1)

    def fastlayers(x):
        return fl_op(x, -1)

    # max-autotune tunes GEMM templates; a softmax has none, so the default mode is the baseline.
    fns = {"fastlayers": fastlayers, "eager": eager, "compile": torch.compile(eager, dynamic=False)}
    if grad:
        calls = {name: (lambda f=f: torch.autograd.grad(f(x), x, dy)) for name, f in fns.items()}
    else:
        calls = {name: (lambda f=f: f(x)) for name, f in fns.items()}
    dst = torch.empty_like(x, requires_grad=False)
    src = x.detach()
    calls["copy"] = lambda: dst.copy_(src)  # same-run memory-bandwidth ceiling: read n, write n
    info = gpu_info(op=op, shape=f"{rows}x{length}", dtype=dtype_name(dtype))
    info["pass"] = pass_
    drop_if_broken(calls, info)
    # fwd: read x, write y; fwd+bwd adds read dy and y, write dx
    moved = {name: (5 if grad else 2) * nbytes for name in calls}
    moved["copy"] = 2 * nbytes
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        compare(calls, info=info, time_fn=gpu_time, rounds=ROUNDS, warmup=3, bytes_moved=moved)
