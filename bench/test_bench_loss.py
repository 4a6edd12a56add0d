"""CPU benchmarks: fused cross-entropy and linear + cross-entropy vs eager PyTorch and torch.compile.

cross_entropy fwd+bwd: F.cross_entropy(x, t) then its gradient, (tokens, vocab) logits.
linear_cross_entropy fwd+bwd: F.cross_entropy(F.linear(h, W), t) then dh and dW (an LM head with
hidden 768). Besides time, each contender's **peak extra memory** is recorded: the peak resident
set size during one forward + backward above the resident size just before it (Linux: the peak
VmHWM is reset through /proc/self/clear_refs). Tensors this large are mmapped by glibc and returned
on free, so the resident size follows the live tensors. Token counts are scaled down from an LM
step's N = 4096 so a run fits this 2-core machine (a 4096 x 128256 fp32 step is ~2.4 TFLOP, ~10 s
per contender per round here): N = 2048 at vocab 32000 and N = 1024 at vocab 128256.
FASTLAYERS_BENCH_QUICK=1 shrinks shapes and rounds to check the suite end to end.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from harness import QUICK, dtype_name, randn

CE_SHAPES = [(256, 4096), (64, 32000)] if QUICK else [(1024, 32000), (256, 128256), (8192, 1024)]
LCE_SHAPES = [(256, 128, 8000)] if QUICK else [(2048, 768, 32000), (1024, 768, 128256)]
LCE_ROUNDS = 3 if QUICK else 5  # a 1024 x 768 x 128256 round is ~10 s for the three contenders
HAVE_CLEAR_REFS = os.path.exists("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_extra_bytes(fn) -> int:
    """Peak RSS during fn() above the RSS before it (the kernel's high-water mark, reset first)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base


def record_memory(benchmark, fns, repeats=2):
    """Smallest of `repeats` peak-extra measurements per contender, in MiB, into extra_info."""
    if not HAVE_CLEAR_REFS:
        return
    peak = {n: min(peak_extra_bytes(f) for _ in range(repeats)) / 2 ** 20 for n, f in fns.items()}
    benchmark.extra_info["peak_extra_mib"] = peak
    if "eager" in peak and peak["eager"] > 0:
        benchmark.extra_info["peak_vs_eager"] = {n: peak[n] / peak["eager"] for n in peak}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cross_entropy(compare, cpu_backend, benchmark, shape, dtype):
    n, v = shape
    x = randn(n, v, dtype=dtype, seed=1, scale=2.0, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(2))

    def eager(x):
        return F.cross_entropy(x, t)

    impls = {"fastlayers": lambda x: fl.cross_entropy(x, t), "eager": eager,
             "compile": torch.compile(eager, dynamic=False)}
    fns = {name: (lambda f=f: torch.autograd.grad(f(x), x)) for name, f in impls.items()}
    nbytes = x.numel() * x.element_size()
    info = {"suite": "cpu", "op": "cross_entropy", "shape": f"{n}x{v}", "dtype": dtype_name(dtype),
            "pass": "fwd+bwd", "backend": cpu_backend}
    # fastlayers' floor: read x (forward), read x + write dx (backward)
    compare(fns, info=info, bytes_moved=3 * nbytes)
    record_memory(benchmark, fns)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("shape", LCE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_cross_entropy(compare, cpu_backend, benchmark, shape, dtype):
    n, hidden, vocab = shape
    h = randn(n, hidden, dtype=dtype, seed=1, requires_grad=True)
    w = randn(vocab, hidden, dtype=dtype, seed=2, scale=hidden ** -0.5, requires_grad=True)
    t = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(3))

    def eager(h, w):
        return F.cross_entropy(F.linear(h, w), t)

    impls = {"fastlayers": lambda h, w: fl.linear_cross_entropy(h, w, t), "eager": eager,
             "compile": torch.compile(eager, dynamic=False)}
    fns = {name: (lambda f=f: torch.autograd.grad(f(h, w), (h, w))) for name, f in impls.items()}
    info = {"suite": "cpu", "op": "linear_cross_entropy", "shape": f"{n}x{hidden}x{vocab}",
            "dtype": dtype_name(dtype), "pass": "fwd+bwd", "backend": cpu_backend}
    compare(fns, info=info, flops=6 * n * hidden * vocab, rounds=LCE_ROUNDS, warmup=1)
    record_memory(benchmark, fns, repeats=1)
