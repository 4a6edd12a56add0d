"""Calls every Triton kernel once, forward and backward, on CUDA: the script to run under
compute-sanitizer, e.g.

    compute-sanitizer --tool memcheck  python3 scripts/gpu_kernel_smoke.py
    compute-sanitizer --tool racecheck python3 scripts/gpu_kernel_smoke.py

Covers: the GEMM with every activation epilogue (with and without bias, y and z stores), the
persistent TMA GEMM (sm_90+: bf16 with and without bias, gelu and none), the
backward's act-grad + bias-grad partials and their reduction, dx / dW GEMMs, and softmax /
log_softmax forward and backward on both paths (single pass and streaming), rows and strided
(dim != -1). Shapes are small and deliberately not multiples of the tile sizes. Exits non-zero
if a result differs from the reference backend. `--cpu` runs the same calls on CPU tensors under
TRITON_INTERPRET=1 (a check of this script, not of the GPU).
"""
import sys

import torch

import fastlayers as fl
from fastlayers.activations import NAMES
from fastlayers.kernels.softmax import single_pass_max_length


TOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def check(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """A smoke test, not the accuracy tests (tests/backends/test_triton.py has those): loose, by dtype."""
    tol = TOL[a.dtype]
    if not torch.allclose(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True):
        print(f"MISMATCH {what}: max |diff| {(a.float() - b.float()).abs().max().item():.3g}")
        sys.exit(1)


def run(backend: str, fn, *tensors):
    with fl.use_backend(backend):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        y = fn(*leaves)
        y.backward(torch.ones_like(y))
        if y.is_cuda:
            torch.cuda.synchronize()
        return [y.detach()] + [t.grad for t in leaves]


def check_linear(x: torch.Tensor, w: torch.Tensor, b, act: str) -> None:
    args = (x, w) if b is None else (x, w, b)
    fn = (lambda x, w, b=None: fl.linear_act(x, w, b, act))
    ours, ref = run("triton", fn, *args), run("reference", fn, *args)
    for i, (o, r) in enumerate(zip(ours, ref)):
        check(o, r, f"linear_act {act} {x.dtype} {tuple(x.shape)} bias={b is not None} output {i}")


def main() -> None:
    dev = "cpu" if "--cpu" in sys.argv else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --cpu with TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    # the interpreter truncates fp32 -> bf16 (GPU: round to nearest), so --cpu leaves bf16 out
    for dtype in (torch.float32, torch.float64) + (() if dev == "cpu" else (torch.bfloat16,)):
        x = torch.randn(67, 45, device=dev, dtype=dtype)
        w = torch.randn(37, 45, device=dev, dtype=dtype) / 7
        b = torch.randn(37, device=dev, dtype=dtype)
        for act in NAMES:
            for bias in (b, None):
                check_linear(x, w, bias, act)
    if dev == "cuda" and torch.cuda.get_device_capability() >= (9, 0):
        # the persistent TMA GEMM: bf16, M >= its minimum, 16-byte aligned rows (forward and dx)
        x = torch.randn(300, 72, device=dev, dtype=torch.bfloat16)
        w = torch.randn(40, 72, device=dev, dtype=torch.bfloat16) / 7
        b = torch.randn(40, device=dev, dtype=torch.bfloat16)
        for act in ("gelu", "none"):
            for bias in (b, None):
                check_linear(x, w, bias, act)
    for dtype in (torch.float32, torch.float64) + (() if dev == "cpu" else (torch.float16,)):
        for length in (5, 1000, single_pass_max_length(1) + 3):  # both softmax paths
            for shape, dim in (((3, length), -1), ((length, 6), 0)):
                x = torch.randn(shape, device=dev, dtype=dtype)
                for op in (fl.softmax, fl.log_softmax):
                    fn = lambda t, op=op, dim=dim: op(t, dim)
                    ours, ref = run("triton", fn, x), run("reference", fn, x)
                    for i, (o, r) in enumerate(zip(ours, ref)):
                        check(o, r, f"{op.__name__} {dtype} {shape} dim={dim} output {i}")
    print("every kernel ran once; all results match the reference backend")


if __name__ == "__main__":
    main()
