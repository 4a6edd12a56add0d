"""Shared test helpers. Runs before any test module imports fastlayers."""
import hashlib
import os
import tempfile

import torch


def _inductor_cache_dir() -> str:
    """torch.compile's on-disk caches key a compiled graph by its forward, not by the registered ops'
    backward definitions: a cache written by another version of fastlayers (an op's backward schema
    changed) would replay its old backward graph. Tests compile into a cache keyed by the package's
    sources (reused while they are unchanged: warm compiles)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastlayers")
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    h.update(f.encode() + fh.read())
    return os.path.join(tempfile.gettempdir(), f"fastlayers-tests-inductor-{h.hexdigest()[:16]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. The flag is read when the
# @triton.jit decorators run, so it must be set before fastlayers.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastlayers as fl  # noqa: E402

# Every op test runs on every backend: the C++ kernels, the Triton kernels (Triton's interpreter on
# CPU tensors here, real kernels on CUDA) and the PyTorch reference (the oracle itself is tested
# too, so a wrong oracle cannot hide a wrong kernel). A backend that cannot run here is skipped
# with its reason.
BACKENDS = ["cpp", "reference", "triton"]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _skip_reason(name: str):
    from fastlayers._errors import BackendUnavailableError
    from fastlayers.backends import load
    try:
        mod = load(name)
    except BackendUnavailableError as e:
        return str(e)
    return mod.unavailable_reason(torch.device("cpu"))


def _interpreted() -> bool:
    try:
        from fastlayers.backends import load
        return bool(load("triton").INTERPRETED)
    except Exception:  # noqa: BLE001 - not installed: nothing runs interpreted
        return False


INTERPRETED = _interpreted()

# For the Triton-kernel test modules: the device their tensors live on, why they cannot run here
# (None when they can), and their marks (the interpreter evaluates kernels with numpy, which warns
# where a kernel relies on IEEE overflow: exp(large) = inf, a fully -inf softmax row's NaN).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_skip_reason():
    why = _skip_reason("triton") if TRITON_DEVICE == "cpu" else None
    if why is None and TRITON_DEVICE == "cuda":
        from fastlayers.backends import load
        why = load("triton").unavailable_reason(torch.device("cuda"))
    return None if why is None else f"triton backend cannot run on {TRITON_DEVICE}: {why}"


def triton_backend_or_skip():
    """The triton backend module for a Triton-kernel test module, or a module-level skip saying why."""
    why = triton_skip_reason()
    if why is not None:
        pytest.skip(why, allow_module_level=True)
    from fastlayers.backends import load
    return load("triton")


TRITON_MARKS = [pytest.mark.triton_interp,
                pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
                pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
                pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]


@pytest.fixture(params=BACKENDS)
def backend(request):
    why = _skip_reason(request.param)
    if why is not None:
        pytest.skip(f"backend {request.param!r} cannot run here: {why}")
    with fl.use_backend(request.param):
        yield request.param


LOW_PRECISION_SKIP = ("the Triton interpreter's bf16/fp16 numerics are not a GPU's (its bf16 tl.dot "
                      "returns garbage, its fp32 -> bf16/fp16 casts truncate): GPU only")


def skip_low_precision(backend: str) -> None:
    """For tests whose low-precision dtype is not a `dtype` parameter (see pytest_runtest_setup)."""
    if INTERPRETED and backend == "triton":
        pytest.skip(LOW_PRECISION_SKIP)


def pytest_runtest_setup(item):
    """bf16/fp16 tests of the Triton backend need a GPU (LOW_PRECISION_SKIP says why)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if INTERPRETED and params.get("backend") == "triton" and params.get("dtype") in LOW_PRECISION:
        pytest.skip(LOW_PRECISION_SKIP)


def unforced_applies(monkeypatch, function) -> list:
    """No backend forced (FASTLAYERS_BACKEND unset) for the test, and the list of the calls of the
    autograd.Function `function`'s apply (the kernels' route) from now on; each call still runs."""
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    calls = []
    real = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(a) or real(*a))
    return calls


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |a - ref| over finite reference entries, in float64."""
    a, ref = a.double(), ref.double()
    finite = torch.isfinite(ref)
    return (a - ref)[finite].abs().max().item() if finite.any() else 0.0


def fp32_gemm_tol(red: int):
    """(rtol, atol) for an fp32 result behind a reduction of length `red` (GEMM K) against a
    float64 reference: assert_close's defaults, atol scaled by sqrt(red / 16)."""
    return 1.3e-6, 1e-5 * max(1.0, red / 16) ** 0.5


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, red: int, what: str = "") -> None:
    """Two fp32 results of the same computation that both carry fp32 rounding (a swapped model
    against the original, a compiled graph against eager): each may be off the exact value by
    the fp32 GEMM tolerance, so they may differ by twice it."""
    rtol, atol = fp32_gemm_tol(red)
    torch.testing.assert_close(actual, expected, rtol=2 * rtol, atol=2 * atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _close_to_ref(out: torch.Tensor, ref64: torch.Tensor, red: int) -> bool:
    rtol, atol = fp32_gemm_tol(red)
    return torch.allclose(out.double(), ref64, rtol=rtol, atol=atol, equal_nan=True)


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, *, red: int = 1, what: str = "") -> None:
    """fp64 / fp32 `out` against the float64 reference: fp64 within 1e-7; fp32 fp32_gemm_tol(red)."""
    if out.dtype == torch.float64:
        torch.testing.assert_close(out, ref64, rtol=1e-7, atol=1e-7, equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        rtol, atol = fp32_gemm_tol(red)
        torch.testing.assert_close(out.double(), ref64, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")


def assert_matches(out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, *, red: int = 1,
                   what: str = "") -> None:
    """The project's tolerance rule (README, "Tolerances"), by dtype of `out`: fp64 1e-7; fp32
    assert_close's defaults with atol scaled by sqrt(red / 16), or, where PyTorch's own fp32 result
    misses that too (long reductions with cancellation), at most twice PyTorch's fp32 error;
    fp16/bf16 at most twice PyTorch's own error against the float64 reference, plus a small epsilon.

    ref64: the float64 PyTorch result from the same (rounded) inputs; eager: PyTorch's own result
    in out's dtype. red: the length of the longest reduction behind a value (GEMM K), which scales
    the fp32 atol. Low precision: error <= 2x PyTorch's own error vs ref64, plus a small epsilon.
    """
    assert out.dtype == eager.dtype and out.shape == eager.shape, what
    if out.dtype == torch.float32 and not _close_to_ref(out, ref64, red):
        # The fixed fp32 rule assumes outputs of magnitude ~1; a long reduction with cancellation
        # (|sum| << sum of |terms|) is off by more in PyTorch too. Then the low-precision rule
        # applies: at most twice PyTorch's own fp32 error (still fails on any real bug).
        assert torch.equal(out.isnan(), ref64.isnan()), f"{what}: NaN pattern differs"
        ours, theirs = max_err(out, ref64), max_err(eager, ref64)
        assert ours <= 2 * theirs, (f"{what}: fp32 error {ours:.3g} exceeds the fp32 tolerance and "
                                    f"2 x torch's own fp32 error {theirs:.3g}")
    elif out.dtype in (torch.float64, torch.float32):
        assert_close_to_ref(out, ref64, red=red, what=what)
    else:
        assert torch.equal(out.isnan(), ref64.to(out.dtype).isnan()), f"{what}: NaN pattern differs"
        ours, theirs = max_err(out, ref64), max_err(eager, ref64)
        finite = ref64[torch.isfinite(ref64)]
        scale = finite.abs().max().item() if finite.numel() else 0.0
        eps = 2 ** -8 * scale * 0.25 + 1e-6
        assert ours <= 2 * theirs + eps, f"{what}: error {ours:.3g} > 2 x torch's {theirs:.3g} + {eps:.3g}"


# ----------------------------------------------------------------------------- special values
# Inputs of the activation special-value tests (every backend, every route).
SPECIAL = [0.0, -0.0, 1e20, -1e20, 88.0, -88.0, float("nan"), 1.0, -1.0, 13.0, -13.0, 20.0, -20.0,
           1e-30, -1e-30]
# Not +-3e38: there PyTorch's gelu overflows an intermediate (gelu(3e38) = inf) where ours returns
# the true value; deep-tail results below 1e-30 (gelu(-13) = -7.9e-38 vs torch's -0.) count as equal.
INF = [float("inf"), float("-inf")]
# PyTorch 2.13's values at +-inf are IEEE artefacts of its formulas (gelu(+-inf) = nan, silu(-inf) = nan);
# the mathematical limits are equally acceptable there, garbage is not.
LIMITS = {"none": (float("inf"), float("-inf")), "relu": (float("inf"), 0.0),
          "leaky_relu": (float("inf"), float("-inf")), "gelu": (float("inf"), 0.0),
          "gelu_tanh": (float("inf"), 0.0), "silu": (float("inf"), 0.0), "sigmoid": (1.0, 0.0),
          "tanh": (1.0, -1.0), "hardswish": (float("inf"), 0.0), "hardsigmoid": (1.0, 0.0),
          "relu6": (6.0, 0.0), "quick_gelu": (float("inf"), 0.0), "mish": (float("inf"), 0.0)}
