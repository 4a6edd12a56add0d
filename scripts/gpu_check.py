"""One prepared check of the Triton backend on a fresh GPU machine (H100 / H200, no network).

    python3 scripts/gpu_check.py                # on the GPU machine, from the repository root
    python3 scripts/gpu_check.py --cpu          # dry run here: interpreter, tiny sizes

In about 8 minutes or less (--budget, seconds):
1. correctness at real sizes against PyTorch: linear_act forward + backward for every dtype
   (fp16, bf16, fp32 exact, fp32 with TF32, fp64) and kernel path (large tiles, decode-sized M,
   split-K dW, K not a multiple of 16, non-contiguous operands, every activation), softmax /
   log_softmax forward + backward on every path (short rows, single pass, streaming, strided);
   our error must be <= 2x PyTorch's own error against a float64 reference (+ a small epsilon);
2. timing (triton.testing.do_bench, median, after an untimed warm-up that includes autotuning):
   fused linear+GELU (bf16, fp16, fp32-TF32) against eager F.gelu(F.linear(...)), cuBLAS torch.mm
   alone (the GEMM without its epilogue) and torch.compile (default mode), in TFLOP/s, and where
   the persistent TMA GEMM (sm_90+, fp16 / bf16) runs, ours with it switched off
   ("fastlayers-generic": the generic GEMM kernel); softmax in
   GB/s against a device-to-device copy of the same tensor in the same run;
3. with the time left, the CUDA tests of tests/backends/test_triton*.py (pytest, FASTLAYERS_AUTOTUNE=0).
Writes bench/results/gpu-<name>.json and gpu-<name>.txt (the log: GPU, torch, triton, CUDA,
git commit). Exit status 1 when a correctness check or the tests fail.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = "--cpu" in sys.argv
if CPU:  # must be set before fastlayers' kernels are imported
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastlayers as fl  # noqa: E402
from fastlayers import activations as acts  # noqa: E402
from fastlayers.backends import load  # noqa: E402

LOG_LINES: list = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG_LINES.append(msg)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except Exception:  # noqa: BLE001 - no git on the machine
        return "unknown (no git)"


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.time()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)


# ----------------------------------------------------------------------------- correctness
def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    finite = torch.isfinite(ref)
    return (a - ref)[finite].abs().max().item() if finite.any() else 0.0


def within(ours: torch.Tensor, theirs: torch.Tensor, ref64: torch.Tensor) -> tuple:
    """(ok, our error, torch's error): ours <= 2 x torch's error vs float64 + eps(dtype)."""
    if ours.shape != ref64.shape or ours.dtype != theirs.dtype:
        return False, math.inf, math.inf
    if not torch.equal(ours.isnan(), theirs.isnan()):
        return False, math.nan, math.nan
    e_ours, e_torch = max_err(ours, ref64), max_err(theirs, ref64)
    finite = ref64[torch.isfinite(ref64)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    rel = {torch.float64: 1e-10, torch.float32: 1e-6}.get(ours.dtype, 2 ** -10)
    return e_ours <= 2 * e_torch + rel * scale + 1e-30, e_ours, e_torch


def _grads(backend, f, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    with fl.use_backend(backend):
        y = f(*leaves)
        need = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(y, need, dy)
    return [y.detach()] + list(grads)


class Checks:
    def __init__(self, dev: str):
        self.dev = dev
        self.results = []
        self.failed = 0

    def compare(self, what: str, f, inputs, dy, names):
        """f through the triton backend, the reference backend (PyTorch) in the same dtype, and
        the reference backend on float64 copies."""
        t0 = time.time()
        try:
            ours = _grads("triton", f, inputs, dy)
            theirs = _grads("reference", f, inputs, dy)
            ref = _grads("reference", f, [t.double() if t is not None else None for t in inputs],
                         dy.double())
            rows = [(n, *within(o, t, r)) for n, o, t, r in zip(names, ours, theirs, ref)]
            ok = all(r[1] for r in rows)
            detail = ", ".join(f"{n} {eo:.2g} (torch {et:.2g})" for n, _, eo, et in rows)
        except Exception as e:  # noqa: BLE001 - report and go on
            ok, detail = False, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        if self.dev == "cuda":
            torch.cuda.synchronize()
        secs = time.time() - t0
        self.failed += not ok
        self.results.append({"check": what, "ok": ok, "detail": detail, "secs": round(secs, 2)})
        log(f"  {'ok  ' if ok else 'FAIL'} {what}: {detail} [{secs:.1f}s]")

    def linear(self, M, K, N, act, dtype, bias=True, x_layout="contiguous", what=""):
        g = torch.Generator(device="cpu").manual_seed(M * 7 + K * 3 + N)

        def rnd(*shape, scale=1.0):
            return (torch.randn(shape, generator=g) * scale).to(dtype).to(self.dev)

        x = rnd(K, M).t() if x_layout == "transposed" else rnd(M, K)
        w = rnd(N, K, scale=K ** -0.5)
        b = rnd(N) if bias else None
        dy = rnd(M, N)
        slope = -0.2 if act == "leaky_relu" else 0.01

        def f(x, w, b):
            return fl.linear_act(x, w, b, act, slope)

        names = ["y", "dx", "dw"] + (["db"] if bias else [])
        self.compare(f"linear_act {act} {str(dtype)[6:]} {M}x{K}->{N} {x_layout} {what}".strip(),
                     f, (x, w, b), dy, names)

    def softmax(self, shape, dim, dtype, log_, what=""):
        g = torch.Generator(device="cpu").manual_seed(sum(shape))
        x = (torch.randn(shape, generator=g) * 3).to(dtype).to(self.dev)
        dy = torch.randn(shape, generator=g).to(dtype).to(self.dev)
        op = fl.log_softmax if log_ else fl.softmax
        self.compare(f"{op.__name__} {str(dtype)[6:]} {tuple(shape)} dim={dim} {what}".strip(),
                     lambda t: op(t, dim), (x,), dy, ["y", "dx"])


def set_tf32(on: bool) -> None:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = on


def correctness(c: Checks, small: bool, budget: Budget) -> None:
    from fastlayers.backends.triton import device as tdev, gemm as tgemm
    log("== correctness (ours <= 2x torch's error vs float64 + eps)")
    s = (lambda *d: tuple(max(1, v // 16) for v in d)) if small else (lambda *d: d)
    low = [torch.bfloat16, torch.float16] if not small else []  # interpreter: no bf16 tl.dot
    big = s(1000, 1024, 1536)
    for dtype in low + [torch.float32, torch.float64]:
        for act in (acts.NAMES if dtype in (torch.bfloat16, torch.float32) else ["gelu", "none"]):
            c.linear(*big, act, dtype)
        if budget.left() < 0:
            return
    # The large bf16 / fp16 GEMMs above ran on the persistent TMA kernel where the GPU has TMA:
    # the generic kernel at the same size.
    switch, tgemm.TMA_GEMM = tgemm.TMA_GEMM, False
    try:
        for dtype in low:
            c.linear(*big, "gelu", dtype, what="(generic GEMM, TMA off)")
    finally:
        tgemm.TMA_GEMM = switch
    for dtype in low + [torch.float32, torch.float64]:
        c.linear(*s(512, 1000, 777), "gelu_tanh", dtype, what="(K, N not multiples of 16)")
        c.linear(*s(768, 512, 640), "silu", dtype, x_layout="transposed")
        c.linear(1, *s(4096, 4096), "gelu", dtype, what="(M = 1)")
        c.linear(17, *s(4096, 1024), "relu", dtype, bias=False, what="(small M)")
        c.linear(32, *s(2048, 2048), "gelu", dtype, what="(small M)")
    # split-K: dW of a small layer over a long batch
    M, K, N = (65536, 128, 64) if not small else (300, 20, 24)
    if small:
        tdev.INTERPRETER_SMS, tgemm.SPLIT_K_MIN_CHUNK = 8, 64
    sms = tdev.num_sms(torch.empty(1, device=c.dev))
    split = tgemm.split_k_count("lp", N, K, M, sms)
    for dtype in low + [torch.float32, torch.float64]:
        c.linear(M, K, N, "none", dtype, bias=False, what=f"(split-K dW, {split} splits)")
    if small:
        tdev.INTERPRETER_SMS, tgemm.SPLIT_K_MIN_CHUNK = 1, 1024
    if not small:
        set_tf32(True)
        try:
            for act in ("gelu", "none"):
                c.linear(*big, act, torch.float32, what="TF32")
            c.linear(17, 4096, 1024, "gelu", torch.float32, what="TF32 (small M)")
        finally:
            set_tf32(False)
    sm_shapes = [((4096, 1000), -1), ((64, 32768), -1), ((8, 262145), -1), ((32, 1000, 64), 1),
                 ((16, 512, 3), 1), ((4, 20000, 17), 1)]
    if small:
        sm_shapes = [((37, 5), -1), ((3, 1000), -1), ((2, 16387), -1), ((2, 30, 17), 1),
                     ((3, 11, 3), 1)]
    for dtype in [torch.float16, torch.bfloat16, torch.float32, torch.float64]:
        if small and dtype in (torch.float16, torch.bfloat16):
            continue  # the interpreter truncates fp32 -> fp16/bf16 casts
        for shape, dim in sm_shapes:
            for log_ in (False, True):
                c.softmax(shape, dim, dtype, log_)
        if budget.left() < 0:
            return


# ----------------------------------------------------------------------------- timing
def bench(fn, dev: str, small: bool) -> float:
    """Median milliseconds of fn()."""
    if dev == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def timing(dev: str, small: bool, budget: Budget, results: dict) -> None:
    from fastlayers.backends.triton import device as tdev, gemm as tgemm
    log("== timing: fused linear+GELU (TFLOP/s, median) and softmax (GB/s)")
    shapes = {"mlp_up 8192x4096->16384": (8192, 4096, 16384),
              "square 8192x4096->4096": (8192, 4096, 4096),
              "decode 16x4096->16384": (16, 4096, 16384)}
    if small:
        shapes = {"tiny 64x48->80": (64, 48, 80), "decode 8x48->80": (8, 48, 80)}
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32-tf32": torch.float32}
    if small:
        dtypes = {"fp32": torch.float32}
    rows = []
    for dname, dtype in dtypes.items():
        set_tf32(dname == "fp32-tf32")
        try:
            for sname, (M, K, N) in shapes.items():
                if budget.left() < 60:
                    log(f"  skipped {dname} {sname}: time budget")
                    continue
                x = torch.randn(M, K, device=dev, dtype=dtype)
                w = torch.randn(N, K, device=dev, dtype=dtype) * K ** -0.5
                b = torch.randn(N, device=dev, dtype=dtype)

                def eager():
                    return F.gelu(F.linear(x, w, b))

                def ours():
                    with fl.use_backend("triton"), torch.no_grad():
                        return fl.linear_act(x, w, b, "gelu")

                def ours_generic():  # the generic GEMM kernel: the persistent TMA one switched off
                    switch, tgemm.TMA_GEMM = tgemm.TMA_GEMM, False
                    try:
                        return ours()
                    finally:
                        tgemm.TMA_GEMM = switch

                wt = w.t()
                row = {"dtype": dname, "shape": sname, "M": M, "K": K, "N": N}
                contenders = {"fastlayers": ours, "eager": eager, "mm": lambda: torch.mm(x, wt)}
                if tgemm._use_tma_gemm(x, wt, x.new_empty(M, N), tdev.device_facts(x)[1]):
                    contenders["fastlayers-generic"] = ours_generic
                if not small:
                    compiled = torch.compile(eager, dynamic=False)
                    contenders["compile"] = compiled
                flops = 2.0 * M * N * K
                for name, fn in contenders.items():
                    try:
                        with torch.no_grad():
                            fn()  # warm-up: compilation / autotuning, untimed
                            if dev == "cuda":
                                torch.cuda.synchronize()
                            ms = bench(fn, dev, small)
                        row[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 2)}
                    except Exception as e:  # noqa: BLE001
                        row[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"}
                t_ours = row["fastlayers"].get("ms")
                for name in contenders:
                    if name != "fastlayers" and t_ours and row[name].get("ms"):
                        row[f"speedup_vs_{name}"] = round(row[name]["ms"] / t_ours, 3)
                rows.append(row)
                log("  linear+gelu {:<9} {:<26} ".format(dname, sname) + "  ".join(
                    f"{n} {row[n]['tflops']:.1f} TF/s" if "tflops" in row[n] else f"{n} ERR"
                    for n in contenders))
        finally:
            set_tf32(False)
    results["linear_gelu"] = rows

    sm_rows = []
    sm_shapes = {"4096x4096": (4096, 4096), "16384x1024": (16384, 1024), "1024x32768": (1024, 32768),
                 "64x262144": (64, 262144)}
    if small:
        sm_shapes = {"64x300": (64, 300)}
    for dname, dtype in {"bf16": torch.bfloat16, "fp32": torch.float32}.items():
        if small and dtype == torch.bfloat16:
            continue
        for sname, shape in sm_shapes.items():
            if budget.left() < 45:
                log(f"  skipped softmax {dname} {sname}: time budget")
                continue
            x = torch.randn(shape, device=dev, dtype=dtype)
            y = torch.empty_like(x)

            def ours():
                with fl.use_backend("triton"), torch.no_grad():
                    return fl.softmax(x, -1)

            contenders = {"fastlayers": ours, "torch": lambda: torch.softmax(x, -1),
                          "copy": lambda: y.copy_(x)}
            nbytes = 2 * x.numel() * x.element_size()
            row = {"dtype": dname, "shape": sname}
            for name, fn in contenders.items():
                with torch.no_grad():
                    fn()
                    ms = bench(fn, dev, small)
                row[name] = {"ms": round(ms, 4), "gbps": round(nbytes / ms / 1e6, 1)}
            row["fraction_of_copy"] = round(row["copy"]["ms"] / row["fastlayers"]["ms"], 3)
            row["speedup_vs_torch"] = round(row["torch"]["ms"] / row["fastlayers"]["ms"], 3)
            sm_rows.append(row)
            log(f"  softmax {dname:<5} {sname:<12} " + "  ".join(
                f"{n} {row[n]['gbps']:.0f} GB/s" for n in contenders)
                + f"  ({row['fraction_of_copy']:.0%} of copy)")
    results["softmax"] = sm_rows


# ----------------------------------------------------------------------------- tests
def run_tests(budget: Budget, small: bool) -> dict:
    left = int(budget.left()) - 15
    if small or left < 60:
        why = "dry run" if small else "time budget"
        log(f"== pytest tests/backends/test_triton*.py: skipped ({why})")
        return {"skipped": why}
    log(f"== pytest tests/backends/test_triton.py tests/backends/test_triton_kernels.py (FASTLAYERS_AUTOTUNE=0, {left} s cap)")
    env = dict(os.environ, FASTLAYERS_AUTOTUNE="0")
    cmd = [sys.executable, "-m", "pytest", "tests/backends/test_triton.py", "tests/backends/test_triton_kernels.py",
           "-q", "-x", "-p", "no:cacheprovider"]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
        tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
        for line in tail:
            log("  " + line)
        return {"returncode": r.returncode, "tail": tail}
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log(f"  timed out after {left} s; progress: {out.strip().splitlines()[-1:] }")
        return {"timed_out": left}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run under the interpreter, tiny sizes")
    ap.add_argument("--name", default=None, help="results name (default: the GPU's name)")
    ap.add_argument("--out-dir", default=None,
                    help="default bench/results (a temporary directory with --cpu)")
    ap.add_argument("--budget", type=float, default=460, help="seconds for all sections")
    ap.add_argument("--skip", default="", help="comma-separated: correctness,timing,tests")
    opts = ap.parse_args()
    budget = Budget(opts.budget)
    dev = "cpu" if opts.cpu else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for the interpreter dry run)")
        return 2
    load("triton")
    import triton
    from fastlayers.backends.triton import gemm as tgemm
    tgemm.TMA_GEMM = os.environ.get("FASTLAYERS_TMA_GEMM", "1") != "0"  # checked and timed here (off by default)
    gpu = torch.cuda.get_device_name() if dev == "cuda" else f"CPU interpreter ({platform.processor() or platform.machine()})"
    name = opts.name or re.sub(r"[^A-Za-z0-9]+", "-", gpu if dev == "cuda" else "cpu-dryrun").strip("-")
    out_dir = opts.out_dir or (os.path.join(ROOT, "bench", "results") if dev == "cuda"
                               else os.path.join("/tmp", "fastlayers-gpu-check"))
    os.makedirs(out_dir, exist_ok=True)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": gpu, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "commit": git_commit(),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else None,
        "dry_run": dev == "cpu", "autotune": os.environ.get("FASTLAYERS_AUTOTUNE", "1"), "tma_gemm": tgemm.TMA_GEMM,
    }
    log(f"gpu_check: {info['device']} | torch {info['torch']} | triton {info['triton']} | "
        f"CUDA {info['cuda']} | Python {info['python']} | commit {info['commit']} | {info['date']}")
    skip = set(filter(None, opts.skip.split(",")))
    results = {"info": info}
    checks = Checks(dev)
    torch.manual_seed(0)
    if "correctness" not in skip:
        correctness(checks, small=dev == "cpu", budget=budget)
    results["correctness"] = checks.results
    if "timing" not in skip:
        timing(dev, small=dev == "cpu", budget=budget, results=results)
    tests = run_tests(budget, small=dev == "cpu") if "tests" not in skip else {"skipped": "--skip"}
    results["tests"] = tests
    tests_failed = tests.get("returncode", 0) != 0
    results["seconds"] = round(time.time() - budget.t0, 1)
    log(f"== {len(checks.results) - checks.failed}/{len(checks.results)} correctness checks ok; "
        f"tests {'FAILED' if tests_failed else 'ok or skipped'}; {results['seconds']} s")
    base = os.path.join(out_dir, f"gpu-{name}")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(base + ".txt", "w") as f:
        f.write("\n".join(LOG_LINES) + "\n")
    print(f"wrote {base}.json and {base}.txt")
    return 1 if checks.failed or tests_failed else 0


if __name__ == "__main__":
    sys.exit(main())
