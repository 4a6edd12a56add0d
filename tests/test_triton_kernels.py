"""Kernel-specific tests of the Triton backend: launcher decisions (TF32, autotuning, kernel paths)
and the kernel designs that tests/test_triton.py does not reach at its shapes.

Like tests/test_triton.py, these run on CUDA tensors when a GPU is present, else on CPU tensors
through Triton's interpreter (~2 ms per program): shapes stay small (dims <= ~300). Every test is
marked `triton_interp`, so `pytest -m triton_interp` selects the Triton suite (the triton-3.6 run
of the Makefile does).
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # normally done by conftest.py; harmless when it already ran
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastlayers as fl  # noqa: E402
from fastlayers.backends import load  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

try:
    _tb = load("triton")
    _why = _tb.unavailable_reason(torch.device(DEVICE))
except Exception as e:  # noqa: BLE001 - triton not installed or failed to import
    _tb, _why = None, str(e)
if _why is not None:
    pytest.skip(f"triton backend cannot run on {DEVICE}: {_why}", allow_module_level=True)

pytestmark = [pytest.mark.triton_interp,
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _close(out, ref, red=1, what=""):
    """fp64: 1e-7; fp32: assert_close defaults with atol scaled by sqrt(reduction length / 16)."""
    assert out.shape == ref.shape, what
    if out.dtype == torch.float64:
        rtol, atol = 1e-7, 1e-7
    else:
        rtol, atol = 1.3e-6, 1e-5 * math.sqrt(max(1.0, red / 16))
    torch.testing.assert_close(out.to(ref.dtype), ref, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- TF32 switch
def _set_tf32_state(fmp, glob, matmul):
    """Legacy float32_matmul_precision first (its setter also writes the new matmul setting),
    then the new global and matmul settings."""
    if fmp is not None:
        torch.set_float32_matmul_precision(fmp)
    if glob is not None and hasattr(torch.backends, "fp32_precision"):
        torch.backends.fp32_precision = glob
    if matmul is not None and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = matmul


@pytest.fixture
def restore_tf32():
    """Each test starts from PyTorch's defaults (no TF32, nothing set through the new API) and
    PyTorch's settings are put back afterwards."""
    glob = getattr(torch.backends, "fp32_precision", None)
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    try:
        fmp = torch.get_float32_matmul_precision()
    except RuntimeError:  # mixed legacy / new state: the new settings restore it
        fmp = None
    _set_tf32_state("highest", "none", "none")
    yield
    _set_tf32_state(fmp, glob, matmul)


_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def test_tf32_default_is_ieee(restore_tf32):
    assert not torch.backends.cuda.matmul.allow_tf32
    assert _tb.fp32_matmul_precision() == "ieee"


@pytest.mark.parametrize("on", [True, False])
def test_tf32_legacy_flag(on, restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = on
    assert _tb.fp32_matmul_precision() == ("tf32" if on else "ieee")


@pytest.mark.parametrize("mode,expect", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_tf32_float32_matmul_precision(mode, expect, restore_tf32):
    """torch.set_float32_matmul_precision: "high" and "medium" let cuBLAS use TF32."""
    torch.set_float32_matmul_precision(mode)
    assert _tb.fp32_matmul_precision() == expect


@pytest.mark.skipif(not _NEW_API, reason=f"torch {torch.__version__} has no fp32_precision API")
@pytest.mark.parametrize("value", ["tf32", "ieee"])
def test_tf32_new_matmul_api(value, restore_tf32):
    torch.backends.cuda.matmul.fp32_precision = value
    if value == "tf32":  # the state in which reading the legacy flag raises: the helper must not
        with pytest.raises(RuntimeError):
            torch.backends.cuda.matmul.allow_tf32  # noqa: B018
    assert _tb.fp32_matmul_precision() == value


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"),
                    reason=f"torch {torch.__version__} has no global fp32_precision")
def test_tf32_new_global_api(restore_tf32):
    """The global setting (which recent transformers versions set) is inherited by CUDA matmuls,
    unless the matmul-specific one overrides it."""
    torch.backends.fp32_precision = "tf32"
    assert _tb.fp32_matmul_precision() == "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert _tb.fp32_matmul_precision() == "ieee"
    torch.backends.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "none"
    assert _tb.fp32_matmul_precision() == "ieee"


@pytest.mark.skipif(not _NEW_API, reason=f"torch {torch.__version__} has no fp32_precision API")
def test_tf32_new_api_linear_runs(restore_tf32):
    """A linear_act in fp32 with the new API set runs (it used to raise reading allow_tf32).
    On CPU tensors (interpreter) the GEMM is exact fp32 whatever the setting, as torch.mm's."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    x, w, b = _rand(9, 20), _rand(7, 20, seed=2), _rand(7, seed=3)
    with fl.use_backend("triton"):
        y = fl.linear_act(x, w, b, "gelu")
    ref = torch.nn.functional.gelu(x.double() @ w.double().t() + b.double())
    if DEVICE == "cpu":
        _close(y, ref, red=20)
    else:
        torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3)
