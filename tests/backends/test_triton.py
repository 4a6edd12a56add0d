"""Triton-kernel-specific tests: the tilings and dispatch boundaries of the kernels (the op
semantics -- every activation, layout, special value, gradcheck -- are the shared op suites', which
run `triton` as a value of the `backend` fixture), the launcher, and the GPU-only checks.

Runs on CUDA tensors when a GPU is present, else on CPU tensors through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before fastlayers' kernels are imported). Interpreter
programs cost ~2 ms each, so shapes here stay small; the larger ones and the fp16/bf16 GEMMs
are marked `gpu`. Shapes straddle the block sizes the kernels use on this device: the
interpreter's GEMM tile (kernels.gemm.INTERPRETER_GEMM_CONFIG), the act-grad tile and the
softmax single-pass boundary (kernels.softmax.single_pass_max_length). Tolerances: conftest's.
The new kernel paths (small-M, split-K, autotune switches) are in tests/backends/test_triton_kernels.py.
"""
import math

import pytest
import torch

import fastlayers as fl
from conftest import TRITON_DEVICE as DEVICE, TRITON_MARKS, assert_close_to_ref, assert_matches, triton_backend_or_skip
from fastlayers import activations as acts

_tb = triton_backend_or_skip()
pytestmark = TRITON_MARKS

from fastlayers.kernels import gemm as K_LA  # noqa: E402
from fastlayers.kernels import linear_grad as K_LG  # noqa: E402
from fastlayers.kernels import softmax as K_SM  # noqa: E402

# (activation, negative_slope): leaky_relu with slope < 0 saves z instead of y.
ACTS = [(name, 0.01) for name in acts.NAMES] + [("leaky_relu", -0.2), ("leaky_relu", 0.0)]
ACT_IDS = [f"{a}-{s}" if a == "leaky_relu" else a for a, s in ACTS]

# The GEMM tile of the single interpreter config, and the act-grad tile.
_BM = K_LA.INTERPRETER_GEMM_CONFIG.kwargs["BLOCK_M"]
_BN = K_LA.INTERPRETER_GEMM_CONFIG.kwargs["BLOCK_N"]
_BK = K_LA.INTERPRETER_GEMM_CONFIG.kwargs["BLOCK_K"]
_GM, _GN = K_LG.GRAD_BLOCK_M, K_LG.GRAD_BLOCK_N


# ----------------------------------------------------------------------------- helpers
def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _close(out, ref, red=1, what=""):
    """conftest's fp32/fp64 rule against a float64 (or same-dtype) reference."""
    assert out.shape == ref.shape and ref.dtype in (out.dtype, torch.float64), what
    assert_close_to_ref(out, ref.double(), red=red, what=what)


def _linear_both(x, w, b, act, slope, dy, ref64=True):
    """(y, dx, dw, db) from the triton backend, and from the reference backend run on float64
    copies of the same inputs (ref64) or in their own dtype (None where not required)."""
    res = {}
    for backend in ("triton", "reference"):
        conv = (lambda t: t.detach().double()) if backend == "reference" and ref64 else \
            (lambda t: t.detach().clone())
        leaves = [conv(t).requires_grad_(t.requires_grad) if t is not None else None
                  for t in (x, w, b)]
        dy_b = conv(dy)
        with fl.use_backend(backend):
            y = fl.linear_act(leaves[0], leaves[1], leaves[2], act, slope)
            need = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(y, need, dy_b) if need else ())
        res[backend] = [y] + [next(grads) if t is not None and t.requires_grad else None
                              for t in leaves]
    return res["triton"], res["reference"]


def _check_linear(M, K, N, act, slope, dtype, bias=True, x_shape=None):
    x = _rand(*(x_shape or (M, K)), dtype=dtype, scale=1.0, seed=1).requires_grad_()
    w = _rand(N, K, dtype=dtype, scale=1.0 / math.sqrt(max(K, 1)), seed=2).requires_grad_()
    b = _rand(N, dtype=dtype, seed=3).requires_grad_() if bias else None
    dy = _rand(*x.shape[:-1], N, dtype=dtype, seed=4)
    got, ref = _linear_both(x, w, b, act, slope, dy)
    m = x.numel() // max(K, 1)
    for name, g, r, red in zip(("y", "dx", "dw", "db"), got, ref, (K, N, m, m)):
        if r is None:
            assert g is None, name
            continue
        _close(g, r, red=red, what=f"{name} {act}({slope}) {tuple(x.shape)}x{K}->{N} {dtype}")


# ----------------------------------------------------------------------------- linear + act

_SHAPES = [(1, 1, 1), (2, 3, 5)]
_SHAPES += [(_BM + d, _BK + d, _BN - d) for d in (-1, 0, 1)]
_SHAPES += [(_GM + d, 7, _GN + d) for d in (-1, 0, 1)]
_SHAPES += [(2 * _BM + 1, 2 * _BK + 1, 2 * _BN + 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", _SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in _SHAPES])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_linear_act_shapes(shape, act, dtype):
    M, K, N = shape
    _check_linear(M, K, N, act, 0.01, dtype)


def test_linear_act_bias_grad_is_deterministic():
    x, w, b = _rand(150, 8), _rand(200, 8, seed=2), _rand(200, seed=3).requires_grad_()
    dy = _rand(150, 200, seed=4)
    with fl.use_backend("triton"):
        runs = [torch.autograd.grad(fl.linear_act(x, w, b, "gelu"), b, dy)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_leaky_relu_fp64_slope_is_exact():
    """The slope reaches fp64 kernels at fp64 precision (split into two fp32 kernel arguments)."""
    x = _rand(5, 3, dtype=torch.float64) - 4.0
    w = torch.eye(3, dtype=torch.float64, device=DEVICE)
    with fl.use_backend("triton"):
        y = fl.linear_act(x, w, None, "leaky_relu", 0.1)
    torch.testing.assert_close(y, torch.where(x > 0, x, x * 0.1), rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------- softmax
_BOUNDARY = K_SM.single_pass_max_length(1)
_STREAM_LEN = 2 * _BOUNDARY + 3  # several streaming chunks
_ROW_LENGTHS = [1, 2, 1023, 1024, 1025, _BOUNDARY - 1, _BOUNDARY, _BOUNDARY + 1, _STREAM_LEN]


def _softmax_both(x, dim, log, dy):
    """(y, dx) from the triton backend and from the reference backend on float64 copies."""
    res = {}
    for backend in ("triton", "reference"):
        conv = (lambda t: t.detach().double()) if backend == "reference" else \
            (lambda t: t.detach().clone())
        xl = conv(x).requires_grad_()
        with fl.use_backend(backend):
            y = (fl.log_softmax if log else fl.softmax)(xl, dim)
            (dx,) = torch.autograd.grad(y, xl, conv(dy))
        res[backend] = (y, dx)
    return res["triton"], res["reference"]


def _check_softmax(x, dim, log, dy=None, what=""):
    dy = _rand(*x.shape, dtype=x.dtype, seed=9) if dy is None else dy
    got, ref = _softmax_both(x, dim, log, dy)
    _close(got[0], ref[0], what=f"y {what}")
    _close(got[1], ref[1], what=f"dx {what}")


def test_single_pass_boundary():
    assert K_SM.uses_single_pass(_BOUNDARY, 1) and not K_SM.uses_single_pass(_BOUNDARY + 1, 1)
    assert K_SM.uses_single_pass(1025, 1)
    assert not K_SM.uses_single_pass(_STREAM_LEN, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("length", _ROW_LENGTHS)
def test_softmax_rows(length, log, dtype):
    rows = 37 if length <= 2 else 2
    _check_softmax(_rand(rows, length, dtype=dtype, scale=3.0), -1, log, what=f"L={length}")


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_softmax_strided_boundary(delta, log):
    """inner > 1 (dim != -1) on both sides of its own single-pass boundary."""
    inner = 3
    length = K_SM.single_pass_max_length(inner) + delta
    assert K_SM.uses_single_pass(length, inner) == (delta <= 0)
    _check_softmax(_rand(1, length, inner, scale=2.0), 1, log, what=f"L={length} inner={inner}")


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("length", [5, 1025, _STREAM_LEN])
def test_softmax_inf_rows(length, log):
    x = _rand(4, length, scale=2.0)
    x[0] = -math.inf                                  # fully -inf: NaN, like torch
    x[1, ::3] = -math.inf                             # partly -inf
    x[2, : max(1, length - 2)] = -math.inf            # -inf through the first chunk(s)
    x[3, length // 2] = math.inf                      # +inf
    _check_softmax(x, -1, log, what=f"L={length}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (the interpreter's fp32 -> fp16/bf16 casts truncate)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_low_precision(dtype, log):
    """fp32 accumulation: error <= 2x PyTorch's own vs a float64 reference (+ small eps)."""
    for length in (300, _STREAM_LEN):
        x = _rand(3, length, dtype=dtype, scale=3.0)
        f = fl.log_softmax if log else fl.softmax
        tf = torch.log_softmax if log else torch.softmax
        with fl.use_backend("triton"):
            ours = f(x, -1)
        _assert_low_precision(ours, tf(x, -1), tf(x.double(), -1), f"L={length}")


def _assert_low_precision(ours, theirs, ref64, what=""):
    assert_matches(ours, ref64, theirs, what=what)


def test_softmax_gradcheck_streaming(monkeypatch):
    """The streaming kernels under gradcheck, with a tiny single-pass limit so rows stay short."""
    monkeypatch.setattr(K_SM, "SINGLE_PASS_MAX_ELEMS", 8)
    monkeypatch.setattr(K_SM, "STREAM_CHUNK_ELEMS", 4)
    assert not K_SM.uses_single_pass(11, 1)
    x = _rand(2, 11, dtype=torch.float64).requires_grad_()
    for f in (fl.softmax, fl.log_softmax):
        with fl.use_backend("triton"):
            assert torch.autograd.gradcheck(lambda t: f(t, -1), (x,))


# ----------------------------------------------------------------------------- launcher
def test_unavailable_reason():
    assert _tb.unavailable_reason(torch.device(DEVICE)) is None
    if not _tb.INTERPRETED:
        assert "TRITON_INTERPRET=1" in _tb.unavailable_reason(torch.device("cpu"))
    assert _tb.unavailable_reason(torch.device("meta")) is not None


def test_kernel_failure_is_a_clear_error(monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise ValueError("simulated compile failure\nsecond line")
            return launch

    monkeypatch.setattr(K_SM, "softmax_fwd_kernel", Broken())
    with fl.use_backend("triton"), pytest.raises(RuntimeError, match=r"fastlayers\.softmax.*triton.*second line"):
        fl.softmax(_rand(2, 3), -1)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["none", "relu"])
def test_linear_act_low_precision_exact(act, dtype):
    """fp16/bf16 GEMMs (forward and both backward GEMMs) on small integers, where every result is
    exact in the low precision: checks the low-precision tl.dot path (bf16 tiles are upcast to fp32
    under the interpreter, whose bf16 tl.dot is broken) independently of output rounding (the
    interpreter's fp32 -> fp16/bf16 casts truncate; accuracy tests are GPU-only below)."""
    M, K, N = 70, 96, 65
    g = torch.Generator().manual_seed(0)
    x, w, b, dy = (torch.randint(-1, 2, shape, generator=g).to(dtype).to(DEVICE)
                   for shape in ((M, K), (N, K), (N,), (M, N)))
    got, ref = _linear_both(x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), act, 0.01,
                            dy, ref64=False)
    for name, o, r in zip(("y", "dx", "dw", "db"), got, ref):
        assert o.dtype == dtype and torch.equal(o, r), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", acts.NAMES)
@pytest.mark.parametrize("shape", [(257, 1024, 384), (1000, 512, 1536)])
def test_gpu_linear_act_low_precision(shape, act, dtype):
    M, K, N = shape
    x = _rand(M, K, dtype=dtype).requires_grad_()
    w = _rand(N, K, dtype=dtype, scale=K ** -0.5, seed=2).requires_grad_()
    b = _rand(N, dtype=dtype, seed=3).requires_grad_()
    dy = _rand(M, N, dtype=dtype, seed=4)
    got, theirs = _linear_both(x, w, b, act, 0.01, dy, ref64=False)
    ref = _linear_both(x, w, b, act, 0.01, dy)[1]
    for name, g, t, r in zip(("y", "dx", "dw", "db"), got, theirs, ref):
        _assert_low_precision(g, t, r, f"{name} {act} {shape} {dtype}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(255, 257, 256), (257, 64, 255), (129, 16, 17)],
                         ids=["255x257x256", "257x64x255", "129x16x17"])
def test_gpu_linear_act_tile_edges(shape, dtype):
    """B-1, B, B+1 around the largest GPU tiles (256 / 128) and the smallest K step (16)."""
    M, K, N = shape
    for act, slope in (("gelu", 0.01), ("leaky_relu", -0.2)):
        _check_linear(M, K, N, act, slope, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_gpu_linear_act_fp32_follows_tf32_switch(act):
    """allow_tf32 off (PyTorch's default): exact fp32 GEMMs, inside fp32 tolerances at K = 1024."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _check_linear(513, 1024, 769, act, 0.01, torch.float32)
        _check_linear(300, 200, 100, act, 0.01, torch.float64)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length", [4096, 16384, 65536, 262145])
def test_gpu_softmax_long_rows(length, dtype):
    x = _rand(8, length, dtype=dtype, scale=4.0)
    for log in (False, True):
        f = fl.log_softmax if log else fl.softmax
        tf = torch.log_softmax if log else torch.softmax
        with fl.use_backend("triton"):
            ours = f(x, -1)
        if dtype == torch.float32:
            _close(ours, tf(x, -1), what=f"L={length}")
        else:
            _assert_low_precision(ours, tf(x, -1), tf(x.double(), -1), f"L={length}")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_launches_on_the_tensors_device():
    x = _rand(64, 32).to("cuda:1")
    w = _rand(16, 32, seed=2).to("cuda:1")
    with torch.cuda.device(0), fl.use_backend("triton"):
        y = fl.linear_act(x, w, None, "gelu")
        p = fl.softmax(x, -1)
    assert y.device == x.device
    _close(y, torch.nn.functional.gelu(x @ w.t()), red=32)
    _close(p, torch.softmax(x, -1))
