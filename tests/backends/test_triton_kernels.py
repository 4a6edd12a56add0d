"""Kernel-specific tests of the Triton backend: launcher decisions (TF32, autotuning, kernel paths)
and the kernel designs that tests/backends/test_triton.py does not reach at its shapes.

Like tests/backends/test_triton.py, these run on CUDA tensors when a GPU is present, else on CPU tensors
through Triton's interpreter (~2 ms per program): shapes stay small (dims <= ~300). Every test is
marked `triton_interp`, so `pytest -m triton_interp` selects the Triton suite (the triton-3.6 run
of the Makefile does).
"""
import os

import pytest
import torch

import fastlayers as fl
from conftest import TRITON_DEVICE as DEVICE, TRITON_MARKS, assert_close_to_ref, triton_backend_or_skip

_tb = triton_backend_or_skip()
pytestmark = TRITON_MARKS

# The launchers' tunables and choosers live in one module each and are patched there (the package
# forwards these names to them, holding no copy).
from fastlayers.backends.triton import device as _tdev  # noqa: E402
from fastlayers.backends.triton import gemm as _tgemm  # noqa: E402


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _close(out, ref, red=1, what=""):
    """conftest's fp32/fp64 rule against a float64 (or same-dtype) reference."""
    assert out.shape == ref.shape, what
    assert_close_to_ref(out, ref.double(), red=red, what=what)


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
    assert _tdev.fp32_matmul_precision() == "ieee"


@pytest.mark.parametrize("on", [True, False])
def test_tf32_legacy_flag(on, restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = on
    assert _tdev.fp32_matmul_precision() == ("tf32" if on else "ieee")


@pytest.mark.parametrize("mode,expect", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_tf32_float32_matmul_precision(mode, expect, restore_tf32):
    """torch.set_float32_matmul_precision: "high" and "medium" let cuBLAS use TF32."""
    torch.set_float32_matmul_precision(mode)
    assert _tdev.fp32_matmul_precision() == expect


@pytest.mark.skipif(not _NEW_API, reason=f"torch {torch.__version__} has no fp32_precision API")
@pytest.mark.parametrize("value", ["tf32", "ieee"])
def test_tf32_new_matmul_api(value, restore_tf32):
    torch.backends.cuda.matmul.fp32_precision = value
    if value == "tf32":  # the state in which reading the legacy flag raises: the helper must not
        with pytest.raises(RuntimeError):
            torch.backends.cuda.matmul.allow_tf32  # noqa: B018
    assert _tdev.fp32_matmul_precision() == value


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"),
                    reason=f"torch {torch.__version__} has no global fp32_precision")
def test_tf32_new_global_api(restore_tf32):
    """The global setting (which recent transformers versions set) is inherited by CUDA matmuls,
    unless the matmul-specific one overrides it."""
    torch.backends.fp32_precision = "tf32"
    assert _tdev.fp32_matmul_precision() == "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert _tdev.fp32_matmul_precision() == "ieee"
    torch.backends.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "none"
    assert _tdev.fp32_matmul_precision() == "ieee"


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


# ----------------------------------------------------------------------------- GEMM paths
from fastlayers import kernels as K  # noqa: E402
from fastlayers.kernels import gated as K_GL  # noqa: E402
from fastlayers.kernels import gemm as K_LA  # noqa: E402
from fastlayers.kernels import gemm_tma as K_TMA  # noqa: E402
from fastlayers.kernels import linear_grad as K_LG  # noqa: E402
from fastlayers.kernels import softmax as K_SM  # noqa: E402


def _linear_grads(x, w, b, act, dy, backend):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    with fl.use_backend(backend):
        y = fl.linear_act(leaves[0], leaves[1], leaves[2], act)
        need = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(y, need, dy)
    return [y.detach(), *grads]


def _check_linear(M, K, N, act="gelu", dtype=torch.float32, bias=True, what=""):
    x = _rand(M, K, dtype=dtype, seed=1)
    w = _rand(N, K, dtype=dtype, scale=K ** -0.5, seed=2)
    b = _rand(N, dtype=dtype, seed=3) if bias else None
    dy = _rand(M, N, dtype=dtype, seed=4)
    got = _linear_grads(x, w, b, act, dy, "triton")
    ref = _linear_grads(x.double(), w.double(), b.double() if bias else None, act, dy.double(),
                        "reference")
    for name, g, r, red in zip(("y", "dx", "dw", "db"), got, ref, (K, N, M, M)):
        _close(g, r, red=red, what=f"{name} {M}x{K}->{N} {dtype} {what}")
    return got


def test_gemm_config_tables():
    """Every GPU config: tile dims powers of two >= 16 (tl.dot's minimum on a GPU); each class
    has a config for fused epilogues; small-M configs have BLOCK_M 16 / 32."""
    for dclass, entries in K_LA.GEMM_CONFIGS.items():
        assert K_LA.large_m_configs(dclass, plain=False, hopper=False), dclass
        for entry in entries:
            for v in entry[:3]:
                assert v >= 16 and v & (v - 1) == 0, (dclass, entry)
    for dclass, entries in K_LA.SMALL_M_CONFIGS.items():
        for bn, bk, _, _, _ in entries:
            assert bn >= 16 and bk >= 16, dclass
    assert set(K_LA.GEMM_AUTOTUNE_KEY) <= set(K_LA.gemm_kernel.arg_names)
    for name in ("ACT", "HAS_BIAS", "STORE_Z", "PRECISION", "LAYOUT", "M_BUCKET", "N_BUCKET",
                 "K_BUCKET"):
        assert name in K_LA.GEMM_AUTOTUNE_KEY


def test_gated_config_tables():
    """One autotuned gated kernel per GEMM dtype class (the launcher looks it up by class), every
    tile dim a power of two >= 16."""
    assert set(K_GL.GATED_CONFIGS) == set(K_GL.gated_gemm_kernels) == set(K_LA.GEMM_CONFIGS)
    for dclass, configs in K_GL.GATED_CONFIGS.items():
        assert configs, dclass
        for cfg in configs:
            for d in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                v = cfg.kwargs[d]
                assert v >= 16 and v & (v - 1) == 0, (dclass, cfg)


def test_heuristic_config_fills_the_gpu():
    configs = K_LA.large_m_configs("lp", plain=True)
    big = K_LA.heuristic_config(configs, 8192, 8192, 132)
    assert (big.kwargs["BLOCK_M"], big.kwargs["BLOCK_N"]) == (128, 256)
    small = K_LA.heuristic_config(configs, 256, 256, 132)
    assert small.kwargs["BLOCK_M"] * small.kwargs["BLOCK_N"] == min(
        c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in configs)


@pytest.mark.parametrize("M", [1, 5, 16, 17, 32, 33])
def test_small_m_path(M):
    """Decode-sized M (<= 32) takes the small-M configs (BLOCK_M 16 under the interpreter)."""
    assert (K_LA.gemm_configs("ieee", K.next_pow2(M), False)[0].kwargs["BLOCK_M"] <= 32) == (M <= 32)
    _check_linear(M, 70, 90, dtype=torch.float32, what=f"M={M}")
    if M in (1, 17):
        _check_linear(M, 20, 33, act="leaky_relu", dtype=torch.float64, what=f"M={M}")


def test_small_m_gpu_configs_by_bucket():
    if _tdev.INTERPRETED:
        assert K_LA.gemm_configs("lp", 16, True) == [K_LA.INTERPRETER_SMALL_M_CONFIG]
        return
    assert all(c.kwargs["BLOCK_M"] == 16 for c in K_LA.gemm_configs("lp", 16, True))
    assert all(c.kwargs["BLOCK_M"] == 32 for c in K_LA.gemm_configs("lp", 32, True))
    sm80 = K_LA.gemm_configs("lp", 4096, True, capability=80)
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128 for c in sm80)


@pytest.fixture
def split_k_on(monkeypatch):
    """Make the interpreter look like a GPU with 8 SMs and split K in chunks of >= 64, so small
    dW GEMMs take the split-K path."""
    monkeypatch.setattr(_tdev, "INTERPRETER_SMS", 8)
    monkeypatch.setattr(_tgemm, "SPLIT_K_MIN_CHUNK", 64)
    calls = []
    orig = _tgemm.sum_rows

    def spy(op, partial, out):
        calls.append(tuple(partial.shape))
        return orig(op, partial, out)

    monkeypatch.setattr(_tgemm, "sum_rows", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_k_dw(split_k_on, dtype):
    """dW = dz^T @ x with M = 300 >> N x K: split over M (the reduction), partial tiles summed in
    a fixed order; same result as the reference, bit-identical across runs."""
    M, K, N = 300, 20, 24
    assert _tgemm.split_k_count("ieee", N, K, M, 8) > 1
    got = _check_linear(M, K, N, act="relu", dtype=dtype, bias=False)
    assert any(len(s) == 2 and s[1] == N * K for s in split_k_on), split_k_on  # dW was split
    again = _check_linear(M, K, N, act="relu", dtype=dtype, bias=False)
    assert torch.equal(got[2], again[2])


@pytest.mark.skipif(DEVICE != "cpu", reason="INTERPRETER_SMS is the interpreter's SM count; a GPU reports its own")
def test_tunables_set_on_the_package_take_effect(monkeypatch):
    """INTERPRETER_SMS and SPLIT_K_MIN_CHUNK assigned on the package (as scripts and users did when
    the backend was one module) reach the launcher: a small dW-shaped GEMM is split."""
    calls = []
    orig = _tgemm.sum_rows
    monkeypatch.setattr(_tgemm, "sum_rows", lambda op, p, out: calls.append(tuple(p.shape)) or orig(op, p, out))
    M, N, K = 24, 20, 300
    a, b = _rand(M, K, seed=1), _rand(K, N, seed=2)
    c = torch.empty(M, N, device=DEVICE)
    _tgemm.launch_gemm("test", a, b, c)
    assert not calls  # one "SM": no split
    monkeypatch.setattr(_tb, "INTERPRETER_SMS", 8)
    monkeypatch.setattr(_tb, "SPLIT_K_MIN_CHUNK", 64)
    _tgemm.launch_gemm("test", a, b, c)
    assert calls == [(_tgemm.split_k_count("ieee", M, N, K, 8), M * N)], calls
    _close(c, a.double() @ b.double(), red=K)


def test_split_k_count_rules():
    assert _tgemm.split_k_count("lp", 8192, 8192, 8192, 132) == 1          # enough tiles
    assert _tgemm.split_k_count("lp", 256, 256, 512, 132) == 1             # short reduction
    s = _tgemm.split_k_count("lp", 256, 256, 65536, 132)                   # dW of a small layer
    assert 1 < s <= _tgemm.SPLIT_K_MAX


@pytest.mark.parametrize("P,N", [(1, 5), (31, 7), (32, 64), (70, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_rows(P, N, dtype):
    partial = _rand(P, N, dtype=dtype, seed=P)
    out = torch.empty(N, dtype=dtype, device=DEVICE)
    _tgemm.sum_rows("test", partial, out)
    _close(out, partial.double().sum(0), red=P)


def test_bias_grad_many_partials():
    """Enough rows that act_grad_bias_kernel writes more partial rows than one sum_rows step."""
    M = K_LG.GRAD_BLOCK_M * (K_LG.SUM_BLOCK_P + 3)
    _check_linear(M, 3, 5, act="silu")


def test_autotune_off_uses_one_heuristic_config(monkeypatch):
    monkeypatch.setattr(_tgemm, "AUTOTUNE", False)
    monkeypatch.setattr(K_LA, "autotuned_gemm", lambda configs: pytest.fail("autotuner used"))
    _check_linear(70, 40, 50, act="gelu_tanh")


def test_no_autotuning_while_capturing(monkeypatch):
    """During CUDA-graph capture: a config tuned before for the same key, else the heuristic one;
    never the autotuner (it would benchmark inside the capture)."""
    _check_linear(40, 30, 20, act="tanh")          # tunes (records) these keys
    tuned = dict(_tgemm._tuned)
    assert tuned
    monkeypatch.setattr(_tgemm, "_capturing", lambda t: True)
    monkeypatch.setattr(K_LA, "autotuned_gemm", lambda configs: pytest.fail("autotuner used"))
    _check_linear(40, 30, 20, act="tanh")          # re-uses the recorded configs
    _check_linear(90, 30, 20, act="sigmoid")       # new keys: heuristic


def test_not_capturing_outside_a_graph():
    assert _tgemm._capturing(_rand(1)) is False


# ----------------------------------------------------------------------------- softmax paths
def _check_softmax(shape, dim, dtype=torch.float32, x=None):
    """y and dx of softmax and log_softmax against the reference backend in float64 (x: random
    unless given)."""
    x = _rand(*shape, dtype=dtype, scale=2.0, seed=5) if x is None else x
    dy = _rand(*shape, dtype=dtype, seed=6)
    for f in (fl.softmax, fl.log_softmax):
        out = {}
        for backend, conv in (("triton", lambda t: t.clone()), ("reference", lambda t: t.double())):
            xl = conv(x).requires_grad_()
            with fl.use_backend(backend):
                y = f(xl, dim)
                (dx,) = torch.autograd.grad(y, xl, conv(dy))
            out[backend] = (y, dx)
        _close(out["triton"][0], out["reference"][0], what=f"y {f.__name__} {shape} dim={dim}")
        _close(out["triton"][1], out["reference"][1], what=f"dx {f.__name__} {shape} dim={dim}")


@pytest.mark.parametrize("shape,dim", [((2, 5, 16), 1), ((3, 4, 17), 1), ((2, 3, 40), 1),
                                       ((2, 9, 8), 1), ((3, 70, 2), 1), ((2, 3, 33), 0)])
def test_softmax_strided_tiles(shape, dim):
    """inner > 1: each program holds BLOCK_R neighbouring inner indices of one outer index;
    inner on both sides of BLOCK_R (16) and several outer indices."""
    _check_softmax(shape, dim)


def test_softmax_strided_plan_stays_in_one_outer():
    for inner in (2, 3, 16, 17, 100):
        single, block_r, block_l, _ = K_SM.plan(1000 * inner, 5, inner)
        assert block_r <= K.next_pow2(inner) and block_r >= K_SM.rows_per_tile_min(inner)
        assert K_SM.grid_size(1000 * inner, inner, block_r) == 1000 * -(-inner // block_r)


def test_softmax_strided_streaming(monkeypatch):
    """The streaming kernels with inner > 1 (tiny single-pass limit so rows stay short)."""
    monkeypatch.setattr(K_SM, "SINGLE_PASS_MAX_ELEMS", 64)
    monkeypatch.setattr(K_SM, "STREAM_CHUNK_ELEMS", 64)
    assert not K_SM.uses_single_pass(11, 17)
    _check_softmax((2, 11, 17), 1)
    _check_softmax((2, 11, 17), 1, dtype=torch.float64)


def test_softmax_single_pass_limits_by_dtype_and_layout():
    """fp64 and strided rows get half the single-pass tile each (they spill at 16 warps)."""
    full = K_SM.single_pass_max_length(1)
    assert K_SM.single_pass_max_length(1, fp64=True) == full // 2
    assert K_SM.single_pass_max_length(16) * 16 == full // 2
    assert K_SM.single_pass_max_length(16, fp64=True) * 16 == full // 4
    for inner, fp64 in ((1, False), (1, True), (16, False), (3, True)):
        n = K_SM.single_pass_max_length(inner, fp64)
        assert K_SM.uses_single_pass(n, inner, fp64) and not K_SM.uses_single_pass(n + 1, inner, fp64)


@pytest.mark.parametrize("delta", [0, 1])
def test_softmax_fp64_boundary(delta):
    """fp64 rows on both sides of their own (halved) single-pass limit."""
    length = K_SM.single_pass_max_length(1, fp64=True) + delta
    _check_softmax((2, length), -1, dtype=torch.float64)


# Split rows: tiny single-pass and segment limits and 8 "SMs" for the interpreter, so rows of
# ~100 elements take the split path (chunks of 16 positions, segments of >= 16).
@pytest.fixture
def split_rows(monkeypatch):
    monkeypatch.setattr(K_SM, "SINGLE_PASS_MAX_ELEMS", 64)
    monkeypatch.setattr(K_SM, "STREAM_CHUNK_ELEMS", 16)
    monkeypatch.setattr(K_SM, "SPLIT_MIN_SEGMENT", 16)
    monkeypatch.setattr(_tdev, "INTERPRETER_SMS", 8)


def _segments(shape, dim):
    """The split launch's segment count for softmax over `dim` of `shape` (1: no split)."""
    dim = dim % len(shape)
    length, inner = shape[dim], 1
    for n in shape[dim + 1:]:
        inner *= n
    rows = torch.Size(shape).numel() // length
    single, block_r, block_l, _ = K_SM.plan(rows, length, inner)
    assert not single
    return K_SM.split_plan(rows, length, inner, block_r, block_l, _tdev.num_sms(_rand(1)))[0]


# (shape, dim): L not a multiple of the chunk (100, 70), a last segment of one element (65), a
# multiple of the chunk (80), strided rows (inner 3 and 17).
_SPLIT_SHAPES = [((3, 100), -1), ((1, 65), -1), ((2, 80), -1), ((2, 70, 3), 1), ((1, 40, 17), 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dim", _SPLIT_SHAPES)
def test_softmax_split_rows(split_rows, shape, dim, dtype):
    assert _segments(shape, dim) > 1
    _check_softmax(shape, dim, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_split_rows_special_values(split_rows, dtype):
    """inf / -inf / NaN inside one segment; a fully -inf row (NaN everywhere, like torch); a row
    whose first segments are all -inf; a row with a single finite value in its last segment."""
    inf = float("inf")
    x = _rand(7, 100, dtype=dtype, scale=3.0, seed=11)
    x[0] = -inf
    x[1, :70] = -inf
    x[2, 50] = inf
    x[3, 37] = float("nan")
    x[4, ::3] = -inf
    x[5, :99] = -inf
    x[6] = x[6] * 1000.0  # segment maxima far apart: the combine's rescaling matters
    assert _segments(x.shape, -1) > 1
    _check_softmax(x.shape, -1, x=x)


def test_softmax_split_plan():
    """Split only when a streaming launch has fewer than SPLIT_PROGRAMS_PER_SM * SMs programs and
    rows hold two segments; segments are whole chunks, all non-empty, at most SPLIT_MAX_SEGMENTS."""
    sms = 132
    block_l = K_SM.STREAM_CHUNK_ELEMS
    # 8 rows of 128K on an H100 / H200: 16 segments of 8192 (128 programs instead of 8)
    assert K_SM.split_plan(8, 131072, 1, 1, block_l, sms) == (16, 8192)
    # enough rows to fill the GPU: streaming as before
    assert K_SM.split_plan(2 * sms, 131072, 1, 1, block_l, sms)[0] == 1
    # rows shorter than two segments: no split
    assert K_SM.split_plan(1, 2 * K_SM.SPLIT_MIN_SEGMENT - 1, 1, 1, block_l, sms)[0] == 1
    # rows past int32 positions stay on the streaming path (int64 lengths)
    assert K_SM.split_plan(1, 2 ** 31 - 1, 1, 1, block_l, sms)[0] == 1
    assert K_SM.split_plan(1, 2 ** 31 - 2 ** 20, 1, 1, block_l, sms)[0] > 1
    for rows, length, inner in ((1, 10 ** 7, 1), (3, 50001, 1), (5, 100003, 1), (64, 50257, 8)):
        r_min = K_SM.rows_per_tile_min(inner)
        bl = block_l // r_min
        segments, seg = K_SM.split_plan(rows * inner, length, inner, r_min, bl, sms)
        assert 1 < segments <= K_SM.SPLIT_MAX_SEGMENTS and seg % bl == 0
        assert (segments - 1) * seg < length <= segments * seg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (the interpreter's fp32 -> fp16/bf16 casts truncate)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softmax_split_rows_low_precision(dtype):
    """A real split launch (8 rows of 128K on the GPU's SMs): error <= 2x PyTorch's own vs a
    float64 reference, forward and backward."""
    from conftest import assert_matches
    x = _rand(8, 131072, dtype=dtype, scale=3.0, seed=3)
    dy = _rand(8, 131072, dtype=dtype, seed=4)
    assert _segments(x.shape, -1) > 1
    for f, tf in ((fl.softmax, torch.softmax), (fl.log_softmax, torch.log_softmax)):
        res = {}
        for name, conv in (("ours", lambda t: t.clone()), ("torch", lambda t: t.clone()),
                           ("ref", lambda t: t.double())):
            xl = conv(x).requires_grad_()
            if name == "ours":
                with fl.use_backend("triton"):
                    y = f(xl, -1)
            else:
                y = tf(xl, -1)
            (dx,) = torch.autograd.grad(y, xl, conv(dy))
            res[name] = (y, dx)
        for i, what in ((0, "y"), (1, "dx")):
            assert_matches(res["ours"][i], res["ref"][i], res["torch"][i],
                           what=f"{what} {f.__name__} {dtype}")


def test_act_grad_fp64_tile():
    """fp64 backward uses an act-grad tile of GRAD_BLOCK_M_FP64 rows: M straddles it."""
    bm = K_LG.GRAD_BLOCK_M_FP64
    for M in (bm - 1, bm + 1, 4 * bm + 3):
        _check_linear(M, 5, K_LG.GRAD_BLOCK_N + 1, act="gelu", dtype=torch.float64)


# ----------------------------------------------------------------------------- persistent TMA GEMM
@pytest.fixture
def tma_forced(monkeypatch):
    """Route every GEMM whose layout TMA accepts to the persistent TMA kernel, whatever the
    device, dtype and M (the interpreter's bf16 / fp16 numerics are not a GPU's, so the
    interpreter tests run fp32 data through it); returns the (M, K, N) of each TMA launch."""
    calls = []
    orig = _tgemm._tma_gemm

    def spy(op, a, b, c, *rest):
        calls.append((a.shape[0], a.shape[1], b.shape[1]))
        return orig(op, a, b, c, *rest)

    monkeypatch.setattr(_tgemm, "_use_tma_gemm", lambda a, b, c, cap: _tgemm.tma_layout_ok(a, b, c.element_size()))
    monkeypatch.setattr(_tgemm, "_tma_gemm", spy)
    return calls


# fp32 data through the TMA kernel: a test device of the interpreter only (on a GPU its tl.dot on
# fp32 operands would run TF32; the chooser never sends fp32 there).
_INTERPRETER_ONLY = pytest.mark.skipif(
    not _tdev.INTERPRETED, reason="forces fp32 data through the TMA kernel, which a GPU would run "
                               "in TF32; test_tma_gemm_low_precision_gpu covers the GPU")


@_INTERPRETER_ONLY
@pytest.mark.parametrize("M,K,N,act,bias,sms", [
    (130, 72, 100, "gelu", True, 1),         # gelu saves z; no dim a multiple of the tile
    (70, 40, 132, "sigmoid", False, 3),      # saves its output; three programs share the tiles
    (64, 64, 64, "leaky_relu", True, 2),     # exactly one tile; more programs than tiles
    (200, 136, 36, "none", False, 2),
])
def test_tma_gemm_matches_reference(tma_forced, monkeypatch, M, K, N, act, bias, sms):
    """The persistent TMA GEMM: forward (B = W^T, K-major descriptor) and dx (B = W, row-major
    descriptor) go through it, dW (A = dz^T, column-major) does not; all match the reference."""
    monkeypatch.setattr(_tdev, "INTERPRETER_SMS", sms)
    _check_linear(M, K, N, act=act, dtype=torch.float32, bias=bias, what="TMA")
    assert sorted(tma_forced) == sorted([(M, K, N), (M, N, K)]), tma_forced


@_INTERPRETER_ONLY
def test_tma_gemm_unaligned_falls_back(tma_forced):
    """N = 70 fp32: dx = dz @ W reads dz's 280-byte rows (not a multiple of 16), so it takes the
    generic kernel; the forward (144-byte rows) takes the TMA kernel; same results."""
    _check_linear(40, 36, 70, act="gelu", what="TMA fallback")
    assert tma_forced == [(40, 36, 70)]


def test_tma_gemm_chooser(monkeypatch):
    """The TMA GEMM only on compute capability >= 9.0, fp16 / bf16, M >= TMA_MIN_M, TMA-legal
    layouts (16-byte aligned row strides and base, a row-major, b row-major or W^T), and with
    the switch on (off by default); never on CPU tensors (the interpreter) without a test forcing it."""
    assert _tgemm.TMA_GEMM == (os.environ.get("FASTLAYERS_TMA_GEMM") == "1")
    monkeypatch.setattr(_tgemm, "TMA_GEMM", True)
    M = _tgemm.TMA_MIN_M
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.zeros(M, 64, dtype=dtype)
        w = torch.zeros(96, 64, dtype=dtype)
        c = torch.zeros(M, 96, dtype=dtype)
        assert _tgemm.tma_gemm_ok(x, w.t(), c, 90)          # forward: W^T
        assert _tgemm.tma_gemm_ok(x, w.t().contiguous(), c, 90)  # row-major B (dx's layout)
        assert _tgemm.tma_gemm_ok(x, w.t(), c, 100)
        assert not _tgemm.tma_gemm_ok(x, w.t(), c, 89)
        assert not _tgemm.tma_gemm_ok(x, w.t(), c, 80)
        assert not _tgemm.tma_gemm_ok(x[: M - 1], w.t(), c[: M - 1], 90)      # M too small
        assert not _tgemm.tma_gemm_ok(x.t().contiguous().t(), w.t(), c, 90)   # a column-major (dW)
        assert _tgemm.tma_gemm_ok(x[:, :60], w.t()[:60], c, 90)               # K 60, strides 64
        x2 = torch.zeros(M, 68, dtype=dtype)[:, :64]                        # row stride 136 B
        assert not _tgemm.tma_gemm_ok(x2, w.t(), c, 90)
        assert not _tgemm.tma_gemm_ok(x[:, 1:], w.t()[1:], c, 90)             # base off by 2 bytes
        assert not _tgemm.tma_gemm_ok(x, w.t().contiguous()[:, ::2], c[:, :48], 90)  # no unit stride
        assert not _tgemm._use_tma_gemm(x, w.t(), c, 90)                      # CPU tensors
        monkeypatch.setattr(_tgemm, "TMA_GEMM", False)
        assert not _tgemm.tma_gemm_ok(x, w.t(), c, 90)
        monkeypatch.setattr(_tgemm, "TMA_GEMM", True)
    for dtype in (torch.float32, torch.float64):
        x, w, c = torch.zeros(M, 64, dtype=dtype), torch.zeros(96, 64, dtype=dtype), torch.zeros(M, 96, dtype=dtype)
        assert not _tgemm.tma_gemm_ok(x, w.t(), c, 90)


def test_tma_gemm_config_tables():
    """TMA configs: powers of two >= 16, a fused-epilogue config, an autotuning key of kernel
    arguments."""
    assert K_TMA.tma_gemm_configs(plain=False)
    for entry in K_TMA.TMA_GEMM_CONFIGS:
        for v in entry[:3]:
            assert v >= 16 and v & (v - 1) == 0, entry
    assert set(K_TMA.TMA_AUTOTUNE_KEY) <= set(K_TMA.tma_gemm_kernel.arg_names)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a CUDA GPU of compute capability >= 9.0 (TMA), and the "
                           "interpreter's fp16 / bf16 numerics are not a GPU's")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tma_gemm_low_precision_gpu(dtype, monkeypatch):
    """The TMA GEMM as the chooser picks it on the GPU: error <= 2x PyTorch's own vs float64,
    forward and backward, with a fused gelu (z saved) and bias, dims not multiples of the tile."""
    from conftest import assert_matches
    monkeypatch.setattr(_tgemm, "TMA_GEMM", True)
    M, K, N = 1000, 1032, 776
    x = _rand(M, K, dtype=dtype, seed=1)
    w = _rand(N, K, dtype=dtype, scale=K ** -0.5, seed=2)
    b = _rand(N, dtype=dtype, seed=3)
    assert _tgemm._use_tma_gemm(x, w.t(), torch.empty(M, N, dtype=dtype, device=DEVICE),
                             _tdev.device_facts(x)[1])
    dy = _rand(M, N, dtype=dtype, seed=4)
    ours = _linear_grads(x, w, b, "gelu", dy, "triton")
    ref = _linear_grads(x.double(), w.double(), b.double(), "gelu", dy.double(), "reference")
    eager = _linear_grads(x, w, b, "gelu", dy, "reference")
    for name, o, r, e in zip(("y", "dx", "dw", "db"), ours, ref, eager):
        assert_matches(o, r, e, red=K, what=f"{name} {dtype}")


# ----------------------------------------------------------------------------- int64 positions
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _positions_probe(out_ptr, l0, hi, INNER, BLOCK_L: tl.constexpr):
    """The offsets and mask _chunk gives the streaming / split softmax kernels for positions
    [l0, l0 + BLOCK_L) of row 0 (base 0), and the segment start _segment gives program (0, j)."""
    base = tl.zeros((1,), tl.int64)
    offs, mask = K_SM._chunk(base, base == 0, l0, hi, INNER, BLOCK_L)
    tl.store(out_ptr + tl.arange(0, BLOCK_L), tl.reshape(offs, (BLOCK_L,)))
    tl.store(out_ptr + BLOCK_L + tl.arange(0, BLOCK_L), tl.reshape(mask, (BLOCK_L,)).to(tl.int64))
    lo, _ = K_SM._segment(hi, l0)
    tl.store(out_ptr + 2 * BLOCK_L + tl.program_id(1), lo)


def test_softmax_positions_are_int64_near_2_31():
    """A row within BLOCK_L of 2^31 elements: the positions l0 + [0, BLOCK_L) and a segment's start
    j * SEG are computed in int64 (in int32 they wrap negative and pass the `< hi` mask: loads
    and stores 8 GB before the row). The interpreter reproduces int32 wrap-around (NOTES.md); the
    arguments are int32 (< 2^31), as a launch with such a row passes them. 3 programs."""
    l0 = 2 ** 31 - 3
    hi = 2 ** 31 - 1
    out = torch.zeros(2 * 8 + 3, dtype=torch.int64, device=DEVICE)
    _positions_probe[(1, 3)](out, l0, hi, 5, BLOCK_L=8)
    pos = [l0 + i for i in range(8)]
    assert out[:8].tolist() == [p * 5 for p in pos]
    assert out[8:16].tolist() == [int(p < hi) for p in pos]
    assert out[16:].tolist() == [0, l0, 2 * l0]
