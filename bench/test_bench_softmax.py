"""CPU benchmarks: softmax / log_softmax over the last dim vs eager PyTorch vs torch.compile.

eager_out (forward only) is torch's kernel writing into a preallocated output: fresh allocations
over 32 MiB are mmap'd by glibc and page-faulted on every call (4096x4096 fp32 is 64 MiB), so it
shows how much of eager's time is the allocator rather than the kernel.
Inputs are not rotated: 16 MiB fits this CPU's L3, which is the in-cache case worth measuring.
FASTLAYERS_BENCH_QUICK=1 shrinks shapes and rounds to check the suite end to end.
"""
import pytest
import torch

import fastlayers as fl
from harness import QUICK, dtype_name, randn

SHAPES = [(256, 256), (1024, 64), (4, 32768), (512, 512)] if QUICK else \
         [(2048, 2048), (8192, 512), (16, 262144), (4096, 4096)]
DTYPES = [torch.float32, torch.bfloat16]
OPS = {"softmax": (fl.softmax, torch.softmax), "log_softmax": (fl.log_softmax, torch.log_softmax)}


def contenders(op):
    fl_op, torch_op = OPS[op]

    def fastlayers(x):
        return fl_op(x, -1)

    def eager(x):
        return torch_op(x, -1)
    return {"fastlayers": fastlayers, "eager": eager,
            "compile": torch.compile(eager, dynamic=False)}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_softmax(compare, cpu_backend, pass_, op, shape, dtype):
    grad = pass_ == "fwd+bwd"
    x = randn(*shape, dtype=dtype, seed=1, scale=2.0, requires_grad=grad)
    nbytes = x.numel() * x.element_size()
    info = {"suite": "cpu", "op": op, "shape": "x".join(map(str, shape)), "dtype": dtype_name(dtype),
            "pass": pass_, "backend": cpu_backend}

    if not grad:
        fns = {name: (lambda f=f: f(x)) for name, f in contenders(op).items()}
        out = torch.empty_like(x)
        torch_op = OPS[op][1]
        fns["eager_out"] = lambda: torch_op(x, -1, out=out)
        with torch.no_grad():
            compare(fns, info=info, bytes_moved=2 * nbytes)  # read x, write y
    else:
        dy = randn(*shape, dtype=dtype, seed=2)
        fns = {name: (lambda f=f: torch.autograd.grad(f(x), x, dy))
               for name, f in contenders(op).items()}
        # forward: read x, write y; backward: read dy and y, write dx
        compare(fns, info=info, bytes_moved=5 * nbytes)


CALLS = 200  # calls per timed sample: one tiny call is too short to time on its own


def test_overhead_softmax(compare, cpu_backend):
    """Per-call overhead (dispatch, validation, autograd/custom-op plumbing) at a tiny shape."""
    x = randn(4, 8, seed=1)

    def loop(f):
        def run():
            for _ in range(CALLS):
                f(x)
        return run
    with torch.no_grad():
        compare({name: loop(f) for name, f in contenders("softmax").items()}, calls_per_sample=CALLS,
                info={"suite": "cpu", "op": "overhead_softmax", "shape": "4x8", "dtype": "float32",
                      "pass": "fwd", "backend": cpu_backend})


@pytest.mark.parametrize("shape", [(1, 64), (8, 256), (32, 512)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(OPS))
def test_small_softmax(compare, cpu_backend, op, shape):
    """Small inputs without grad (below the cpp backend's TORCH_SOFTMAX_MAX_NUMEL: PyTorch's own kernel behind
    fastlayers' tiny gate): what the gate's checks cost on top of eager."""
    x = randn(*shape, seed=1, scale=2.0)

    def loop(f):
        def run():
            for _ in range(CALLS):
                f(x)
        return run
    fns = contenders(op)
    del fns["compile"]  # (Dynamo's guard checks dominate at this size; the overhead test has it)
    with torch.no_grad():
        compare({name: loop(f) for name, f in fns.items()}, calls_per_sample=CALLS,
                info={"suite": "cpu", "op": f"small_{op}", "shape": "x".join(map(str, shape)),
                      "dtype": "float32", "pass": "fwd", "backend": cpu_backend},
                baselines=("eager",))
