"""fl.rms_norm / fl.layer_norm (+ residual) and fl.RMSNorm / fl.LayerNorm against PyTorch and
Hugging Face's LlamaRMSNorm, on every backend (triton: its interpreter, tiny shapes)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlayers as fl
from fastlayers.ops import norms as _norms

from conftest import INTERPRETED, LOW_PRECISION, assert_matches, unforced_applies  # noqa: F401

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
KINDS = ["rms_hf", "rms", "layer"]


def hf_rms(x, weight, eps):
    """transformers' LlamaRMSNorm.forward, verbatim."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype) if weight is not None else h.to(input_dtype)


def eager(kind, x, w, b, eps):
    """PyTorch's own op in x's dtype (float64: fp64 math, HF's formula without its fp32 cast)."""
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:], w, b, eps)
    if kind == "rms":
        return F.rms_norm(x, x.shape[-1:], w, eps)
    if x.dtype == torch.float64:
        return _norms.norm_composite(x, w, None, None, eps, "rms_hf", 1)
    return hf_rms(x, w, eps)


def ours(kind, x, w, b, eps, r=None):
    if kind == "layer":
        return fl.layer_norm(x, x.shape[-1], w, b, eps, residual=r)
    return fl.rms_norm(x, w, eps, residual=r, mode="hf" if kind == "rms_hf" else "torch")


def check(kind, x, w, b, r, eps=1e-5, g=None, gs=None):
    """Forward + backward (dx, dw, db, dresidual) against float64 PyTorch and eager PyTorch."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    xs, ws, bs, rs = leaves
    out = ours(kind, xs, ws, bs, eps, rs)
    y, s = (out if r is not None else (out, None))
    g = torch.randn_like(y) if g is None else g
    gs = (torch.randn_like(y) if gs is None else gs) if r is not None else None
    torch.autograd.backward([y] + ([s] if s is not None else []), [g] + ([gs] if gs is not None else []))

    def ref(dtype):
        ls = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, w, b, r)]
        xr, wr, br, rr = ls
        src = xr + rr if rr is not None else xr
        if rr is not None and dtype != torch.float64:
            pass  # eager rounds the sum to x's dtype, as ours
        yr = eager(kind, src, wr, br, eps)
        outs, grads = [yr], [g.to(dtype)]
        if rr is not None:
            outs.append(src)
            grads.append(gs.to(dtype))
        torch.autograd.backward(outs, grads)
        return yr, src, [t.grad if t is not None else None for t in ls]

    y64, s64, g64 = ref(torch.float64)
    ye, se, ge = ref(x.dtype)
    n = x.shape[-1]
    assert y.dtype == ye.dtype and y.shape == x.shape
    assert_matches(y.detach(), y64, ye.detach(), red=n, what=f"{kind} y")
    if s is not None:
        assert torch.equal(s.detach(), se.detach()), "the returned sum differs from eager x + residual"
    rows = max(1, x.numel() // max(n, 1))
    for name, ours_g, r64, re in zip(("dx", "dw", "db", "dres"), [t.grad if t is not None else None for t in leaves],
                                     g64, ge):
        if r64 is None:
            assert ours_g is None, name
            continue
        red = rows if name in ("dw", "db") else n
        assert_matches(ours_g, r64, re, red=red, what=f"{kind} {name}")


SHAPES = [(1, 1), (4, 3), (3, 1000), (2, 5000), (0, 8), (2, 3, 40), (5, 1)]


def _small_for_interpreter(backend, shape):
    if backend == "triton" and INTERPRETED and shape[-1] > 1000:
        pytest.skip("interpreter: long rows are covered by test_long_rows_triton")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_torch(backend, kind, dtype, shape, residual):
    _small_for_interpreter(backend, shape)
    torch.manual_seed(0)
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    r = torch.randn(shape, dtype=dtype) if residual else None
    w = torch.randn(n, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if kind == "layer" else None
    check(kind, x, w, b, r)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", ["none", "weight"])
def test_without_weight_or_bias(backend, kind, dtype, affine):
    torch.manual_seed(1)
    x = torch.randn(6, 77, dtype=dtype)
    w = torch.randn(77, dtype=dtype) if affine == "weight" else None
    check(kind, x, w, None, torch.randn(6, 77, dtype=dtype))
    check(kind, x, w, None, None)


@pytest.mark.parametrize("kind", KINDS)
def test_long_rows_triton(kind):
    """The looped (long-row) path of the Triton kernels, made reachable at tiny sizes."""
    from conftest import _skip_reason
    why = _skip_reason("triton")
    if why:
        pytest.skip(why)
    from fastlayers.kernels import norms as K
    saved = K.ONE_BLOCK_MAX, K.CHUNK
    K.ONE_BLOCK_MAX, K.CHUNK = 64, 32
    try:
        torch.manual_seed(2)
        # (the interpreter's fp32 -> bf16 casts truncate: 16-bit only on a GPU, see conftest)
        for dtype in (torch.float32, torch.float64) + (() if INTERPRETED else (torch.bfloat16,)):
            x = torch.randn(3, 150, dtype=dtype)
            w = torch.randn(150, dtype=dtype)
            b = torch.randn(150, dtype=dtype) if kind == "layer" else None
            with fl.use_backend("triton"):
                check(kind, x, w, b, torch.randn(3, 150, dtype=dtype))
                check(kind, x, w, b, None)
    finally:
        K.ONE_BLOCK_MAX, K.CHUNK = saved


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous(backend, kind):
    torch.manual_seed(3)
    x = torch.randn(40, 6, dtype=torch.float32).t()  # (6, 40), strided
    r = torch.randn(6, 80, dtype=torch.float32)[:, ::2]
    w = torch.randn(80)[::2]
    b = torch.randn(40) if kind == "layer" else None
    check(kind, x, w, b, r)
    check(kind, x, w, b, None)


def test_layer_norm_multi_dim_shape(backend):
    torch.manual_seed(4)
    x, r = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    w, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    y, s = fl.layer_norm(x, (4, 5), w, b, 1e-5, residual=r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (4, 5), w, b, 1e-5), rtol=1e-7, atol=1e-7)
    xs = x.clone().requires_grad_()
    torch.autograd.gradcheck(lambda x, w, b: fl.layer_norm(x, (4, 5), w, b),
                             (xs, w.clone().requires_grad_(), b.clone().requires_grad_()))


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gradcheck(backend, kind, residual):
    torch.manual_seed(5)
    n = 7 if backend == "triton" else 33
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, requires_grad=True) if kind == "layer" else None
    r = torch.randn(3, n, dtype=torch.float64, requires_grad=True) if residual else None

    def fn(x, w, b, r):
        out = ours(kind, x, w, b, 1e-5, r)
        return out if r is None else (out[0], out[1] * 0.5)  # both outputs carry a gradient
    args = (x, w, b, r)
    torch.autograd.gradcheck(fn, args)
    torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("kind", KINDS)
def test_create_graph_first_order_is_the_composites(backend, kind):
    """With create_graph=True the backward is a second formula (torch ops): gradgradcheck checks
    it only against its own derivative, so check its value (x, weight, bias and the residual's,
    through both outputs) against autograd of the composite."""
    from fastlayers.ops.norms import norm_composite
    torch.manual_seed(6)
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True) if kind == "layer" else None
    wrt = [t for t in (x, w, b, r) if t is not None]
    dy, ds = torch.randn(3, 9, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)
    got = torch.autograd.grad(ours(kind, x, w, b, 1e-5, r), wrt, (dy, ds), create_graph=True)
    want = torch.autograd.grad(norm_composite(x, w, b, r, 1e-5, kind, 1), wrt, (dy, ds))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


# ----------------------------------------------------------------------------- special values
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_special_values(backend, kind, dtype):
    x = torch.randn(5, 20, dtype=dtype)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 0] = float("-inf")
    x[3, :] = 0.0  # rstd = 1/sqrt(eps)
    x[4, 5] = 1e30 if dtype == torch.float32 else 1e30  # sum of squares overflows fp32: rstd 0
    w = torch.randn(20, dtype=dtype)
    b = torch.randn(20, dtype=dtype) if kind == "layer" else None
    y = ours(kind, x, w, b, 1e-5)
    ye = eager(kind, x, w, b, 1e-5)
    assert torch.equal(y.isnan(), ye.isnan()), (y, ye)
    fin = ~ye.isnan()
    torch.testing.assert_close(y[fin], ye[fin], rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


# ----------------------------------------------------------------------------- errors
def test_errors():
    x = torch.randn(4, 8)
    with pytest.raises(fl.ShapeError, match=r"fastlayers.rms_norm: expected weight of shape \(8,\)"):
        fl.rms_norm(x, torch.ones(7))
    with pytest.raises(fl.ShapeError, match=r"fastlayers.rms_norm: expected residual of shape \(4, 8\)"):
        fl.rms_norm(x, torch.ones(8), residual=torch.randn(8))
    with pytest.raises(fl.DTypeError, match=r"fastlayers.rms_norm: expected x to be a floating-point"):
        fl.rms_norm(torch.ones(4, 8, dtype=torch.int64), None)
    with pytest.raises(TypeError, match=r"fastlayers.rms_norm: expected x to be a torch.Tensor"):
        fl.rms_norm([1.0, 2.0], None)
    with pytest.raises(ValueError, match=r"fastlayers.rms_norm: expected mode"):
        fl.rms_norm(x, None, mode="llama")
    with pytest.raises(TypeError, match=r"fastlayers.rms_norm: expected eps to be a real number"):
        fl.rms_norm(x, None, eps="1e-6")
    with pytest.raises(fl.ShapeError, match=r"fastlayers.rms_norm: expected x of shape \(\*, N\), got a 0-d"):
        fl.rms_norm(torch.tensor(1.0), None)
    with pytest.raises(fl.ShapeError, match=r"fastlayers.layer_norm: expected x of shape \(\*, 5\)"):
        fl.layer_norm(x, 5)
    with pytest.raises(fl.ShapeError, match=r"fastlayers.layer_norm: expected bias of shape \(8,\)"):
        fl.layer_norm(x, 8, torch.ones(8), torch.ones(3))
    with pytest.raises(fl.DTypeError, match=r"fastlayers.layer_norm: expected weight to be a floating-point"):
        fl.layer_norm(x, 8, torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"fastlayers.layer_norm: expected normalized_shape"):
        fl.layer_norm(x, "8")
    with pytest.raises(ValueError, match=r"fastlayers.layer_norm: expected eps >= 0"):
        fl.layer_norm(x, 8, eps=-1.0)


def test_mixed_dtypes_follow_torch():
    """fp32 weight with bf16 x (no kernel reads two dtypes): PyTorch's own type promotion."""
    torch.manual_seed(6)
    x, w = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(16)
    y = fl.rms_norm(x, w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, hf_rms(x, w, 1e-6), rtol=0, atol=0)
    assert fl.layer_norm(x, 16, w, w).dtype == F.layer_norm(x, (16,), w, w).dtype


def test_autocast_cpu_matches_torch():
    x, w = torch.randn(4, 16), torch.randn(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fl.layer_norm(x, 16, w, w).dtype == F.layer_norm(x, (16,), w, w).dtype == torch.float32
        assert fl.rms_norm(x, w, mode="torch").dtype == F.rms_norm(x, (16,), w).dtype == torch.float32
        xb = x.bfloat16()
        assert fl.rms_norm(xb, w.bfloat16()).dtype == torch.bfloat16


def test_deterministic_weight_grad():
    torch.manual_seed(7)
    x = torch.randn(513, 300, requires_grad=True)
    w = torch.randn(300, requires_grad=True)
    g = torch.randn(513, 300)
    grads = []
    for _ in range(3):
        w.grad = None
        fl.rms_norm(x, w).backward(g)
        grads.append(w.grad.clone())
    assert all(torch.equal(grads[0], t) for t in grads[1:])


def test_saves_only_src_and_stats():
    """What the Function keeps for backward: the sum (or x) and per-row fp32 statistics."""
    x = torch.randn(8, 64, requires_grad=True)
    r = torch.randn(8, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t), fl.use_backend("cpp"):
        y, s = fl.rms_norm(x, w, residual=r)  # (forced: unforced, so small a call runs PyTorch's ops)
    shapes = sorted(tuple(t.shape) for t in seen)
    assert shapes == [(8,), (8, 64), (64,)], shapes  # rstd, the sum, the weight (a parameter)


def test_returned_sum_in_place_edit_is_detected():
    x, r, w = (torch.randn(4, 8, requires_grad=True), torch.randn(4, 8), torch.randn(8))
    y, s = fl.rms_norm(x, w, residual=r)
    s.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ----------------------------------------------------------------------------- compile / fake / jit
@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph(kind):
    torch._dynamo.reset()
    torch.manual_seed(8)
    x = torch.randn(4, 32, requires_grad=True)
    r = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    b = torch.randn(32, requires_grad=True) if kind == "layer" else None

    def f(x, r, w, b):
        y, s = ours(kind, x, w, b, 1e-5, r)
        return (y * 2 + s).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = cf(x, r, w, b)
    grads = torch.autograd.grad(loss, [t for t in (x, r, w, b) if t is not None])
    loss_e = f(x, r, w, b)
    grads_e = torch.autograd.grad(loss_e, [t for t in (x, r, w, b) if t is not None])
    torch.testing.assert_close(loss, loss_e)
    for a, c in zip(grads, grads_e):
        torch.testing.assert_close(a, c)


def test_library_op_opcheck():
    x, r, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    for kind in KINDS:
        torch.library.opcheck(_norms.NORM.library, (x, w, w if kind == "layer" else None, r, 1e-5, kind, 1),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_fake_tensor_and_meta():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, r, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
        y, s = fl.rms_norm(x, w, residual=r)
        assert y.shape == (4, 16) and s.shape == (4, 16)
        assert fl.layer_norm(x, 16, w, w).shape == (4, 16)
    y = fl.layer_norm(torch.randn(2, 8, device="meta"), 8)
    assert y.shape == (2, 8) and y.device.type == "meta"


def test_jit_trace():
    x, w = torch.randn(4, 16), torch.randn(16)
    traced = torch.jit.trace(lambda x, w: fl.rms_norm(x, w), (x, w))
    torch.testing.assert_close(traced(x * 2, w), fl.rms_norm(x * 2, w))


def test_torch_func_vmap_grad():
    x, w = torch.randn(3, 4, 16), torch.randn(16)
    out = torch.func.vmap(lambda xi: fl.rms_norm(xi, w))(x)
    torch.testing.assert_close(out, hf_rms(x, w, 1e-6))
    g = torch.func.grad(lambda xi: fl.layer_norm(xi, 16, w).sum())(x[0])
    torch.testing.assert_close(g, torch.func.grad(lambda xi: F.layer_norm(xi, (16,), w).sum())(x[0]))


# ----------------------------------------------------------------------------- modules
def test_rmsnorm_module_is_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(9)
    hf = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        hf.weight.normal_()
    ours_m = fl.RMSNorm(48, eps=1e-5)
    ours_m.load_state_dict(hf.state_dict())
    assert set(ours_m.state_dict()) == set(hf.state_dict()) and ours_m.variance_epsilon == 1e-5
    for dtype in (torch.float32, torch.bfloat16):
        hf.to(dtype), ours_m.to(dtype)
        x = torch.randn(3, 5, 48, dtype=dtype)
        ye, yo = hf(x), ours_m(x)
        tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1.3e-6, atol=1e-5)
        torch.testing.assert_close(yo, ye, **tol)


def test_layernorm_module_is_nn_layernorm():
    torch.manual_seed(10)
    ref = nn.LayerNorm(24, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_(), ref.bias.normal_()
    m = fl.LayerNorm(24, eps=1e-6)
    assert isinstance(m, nn.LayerNorm)
    m.load_state_dict(ref.state_dict())
    x, r = torch.randn(5, 24), torch.randn(5, 24)
    torch.testing.assert_close(m(x), ref(x))
    y, s = m(x, r)
    torch.testing.assert_close(y, ref(x + r))
    m2 = fl.LayerNorm(24, elementwise_affine=False)
    torch.testing.assert_close(m2(x), F.layer_norm(x, (24,)))
    m3 = fl.LayerNorm(24, bias=False)
    assert m3.bias is None
    torch.testing.assert_close(m3(x), F.layer_norm(x, (24,), m3.weight))


def test_torch_rmsnorm_module():
    ref = nn.RMSNorm(24, eps=1e-6)
    m = _norms.TorchRMSNorm(24, eps=1e-6)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    torch.testing.assert_close(m.to(torch.bfloat16)(x), ref.to(torch.bfloat16)(x), rtol=0, atol=0)


def test_cpp_entry_points_check_buffers():
    """fastlayers._C's norm entry points refuse buffers that do not fit (never read out of bounds),
    and its norm kinds are the Python launcher's."""
    from fastlayers.backends.cpu import _ext
    from fastlayers.backends.cpu import norms as cpu_norms
    _C, _buf = _ext._C, _ext._buf
    assert dict(_C.NORM_KINDS) == cpu_norms._NORM_KINDS
    x, y = torch.randn(4, 8), torch.empty(4, 8)
    with pytest.raises(ValueError, match="norm_forward: argument 'w' has shape"):
        _C.norm_forward(_buf(x), None, None, _buf(torch.randn(7)), None, _buf(y), None, None, 0, 1e-6, 1)
    with pytest.raises(ValueError, match="norm_forward: argument 'rstd' has dtype code"):
        _C.norm_forward(_buf(x), None, None, None, None, _buf(y), None, _buf(torch.empty(4, dtype=torch.float64)),
                        0, 1e-6, 1)
    with pytest.raises(ValueError, match="norm_forward: 'res' and 's' go together"):
        _C.norm_forward(_buf(x), _buf(x), None, None, None, _buf(y), None, None, 0, 1e-6, 1)
    with pytest.raises(ValueError, match="norm_backward: argument 'dy' is not contiguous"):
        _C.norm_backward(_buf(torch.randn(8, 4).t()), None, _buf(x), None, None, _buf(torch.ones(4)), _buf(y),
                         None, None, 0, 1)
    with pytest.raises(ValueError, match="unknown norm kind 7"):
        _C.norm_forward(_buf(x), None, None, None, None, _buf(y), None, None, 7, 1e-6, 1)


@pytest.mark.parametrize("kind", ["layer", "layer_add", "rms", "rms_hf"])
def test_small_cpu_calls_run_pytorch_ops(monkeypatch, kind):
    """Below norms._TORCH_MAX_NUMEL elements, with no backend forced, a CPU call is PyTorch's own
    ops (their values and autograd); from there, and whenever a backend is forced, the kernels."""
    from fastlayers.ops import norms
    calls = unforced_applies(monkeypatch, norms.NormFunction)
    limit = norms._TORCH_MAX_NUMEL[kind]
    if kind == "layer":  # (2^23: the route is the point, not the size)
        monkeypatch.setitem(norms._TORCH_MAX_NUMEL, "layer", limit := 1 << 16)
    for rows, fused in ((limit // 64 - 1, False), (limit // 64, True)):
        x = torch.randn(rows, 64, requires_grad=True)
        w = torch.randn(64, requires_grad=True)
        calls.clear()
        if kind == "layer":
            y = fl.layer_norm(x, 64, w, None, 1e-5)
            s = None
            ref = F.layer_norm(x, (64,), w, None, 1e-5)
        elif kind == "layer_add":
            y, s = fl.layer_norm(x, 64, w, None, 1e-5, residual=x.detach())
            ref = F.layer_norm(x + x.detach(), (64,), w, None, 1e-5)
        else:
            y, s = fl.rms_norm(x, w, 1e-6, residual=x.detach(), mode="hf" if kind == "rms_hf" else "torch")
            ref = norms.norm_composite(x, w, None, x.detach(), 1e-6, kind, 1)[0]
        assert bool(calls) == fused, (rows, kind)
        torch.testing.assert_close(y, ref)
        g = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        torch.testing.assert_close(g, torch.autograd.grad(ref, (x, w), torch.ones_like(ref)), rtol=1e-4, atol=1e-4)
