"""fl.attention_softmax -- softmax(scores * scale + mask) with boolean / additive masks and causal
-- against its PyTorch composite (and Hugging Face's eager expression), on every backend (triton:
its interpreter, tiny shapes)."""
import pytest
import torch

import fastlayers as fl
from fastlayers.backends import reference as _reference
from fastlayers.ops import attention_softmax as A

from conftest import INTERPRETED, assert_matches, unforced_applies

comp = A.attention_softmax_composite
LOW = (torch.float16, torch.bfloat16)


def comp16(x, scale, mask, causal, dtype):
    """The composite with torch.softmax on the 16-bit tensor itself (no float32 dtype=): PyTorch's own
    low-precision softmax, whose backward reads the rounded probabilities as ours does -- the
    baseline of "PyTorch's own error" for 16-bit gradients (Hugging Face's expression saves the
    float32 probabilities instead: see the op's docstring)."""
    if dtype is not None or x.dtype not in LOW:
        return comp(x, scale, mask, causal, dtype)
    z = x * scale
    if mask is not None and mask.dtype != torch.bool:
        z = z + mask
    keep = _reference._attn_keep(mask, causal, z.shape[-2], z.shape[-1], z.device)
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    return torch.softmax(z, -1)


def _mask(kind, B, H, L, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "bool":  # (B, 1, L, S): per batch, broadcast over heads; one fully masked row
        m = torch.rand(B, 1, L, S, generator=g) > 0.3
        m[0, 0, L // 2] = False
        return m
    if kind == "bool2d":  # (L, S)
        return torch.rand(L, S, generator=g) > 0.4
    if kind == "float":  # (1, H, 1, S), with -inf entries (padding) and HF's finite minimum
        m = torch.randn(1, H, 1, S, generator=g).to(dtype)
        m[..., S - 1] = float("-inf")
        m[..., 0] = torch.finfo(dtype).min
        return m
    if kind == "float_full":
        return torch.randn(B, H, L, S, generator=g).to(dtype)
    raise ValueError(kind)


def check(x, scale, mask, causal, dtype=None, seed=0):
    """Forward and dscores against the float64 composite and the composite in x's dtype."""
    xs = x.detach().clone().requires_grad_()
    y = fl.attention_softmax(xs, scale, mask, causal, dtype)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(y.dtype)
    y.backward(g)

    def ref(dt, f=comp):
        xr = x.detach().to(dt).requires_grad_()
        mr = mask.to(dt) if mask is not None and mask.dtype != torch.bool else mask
        yr = f(xr, scale, mr, causal, None if dt == torch.float64 else dtype)
        yr.backward(g.to(yr.dtype))
        return yr.detach(), xr.grad

    y64, g64 = ref(torch.float64)
    ye, _ = ref(x.dtype)
    _, ge = ref(x.dtype, comp16)
    assert y.dtype == ye.dtype and y.shape == x.shape
    S = x.shape[-1]
    assert_matches(y.detach(), y64, ye, red=S, what="y")
    assert_matches(xs.grad, g64, ge, red=S, what="dscores")
    return y, xs.grad


SHAPES = [(2, 3, 5, 7), (1, 2, 9, 4), (2, 2, 6, 70)]
MASKS = ["none", "bool", "bool2d", "float", "float_full"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_composite(backend, dtype, mask, causal, shape):
    if backend == "triton" and INTERPRETED and shape != SHAPES[0] and mask not in ("none", "bool"):
        pytest.skip("interpreter: the other shapes are covered by the masks none / bool")
    torch.manual_seed(0)
    B, H, L, S = shape
    x = (torch.randn(shape) * 3).to(dtype)
    check(x, 0.37, _mask(mask, B, H, L, S, dtype), causal)


@pytest.mark.parametrize("shape", [(7, 9), (3, 4, 6), (2, 2, 2, 3, 5)], ids=str)
def test_other_ranks_and_broadcast_masks(backend, shape):
    """2-D, 3-D and 5-D scores; masks of fewer dims and with size-1 leading dims."""
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64)
    L, S = shape[-2:]
    check(x, 1.0, torch.rand(S) > 0.2, True)
    check(x, 0.5, torch.randn(L, 1, dtype=torch.float64), False)
    if len(shape) == 5:  # leading dims (2, 1, 3)-strided: not two strides -> the copied case
        m = torch.randn(2, 1, 2, L, S, dtype=torch.float64)
        check(x, 0.5, m, True)
        check(x, 0.5, torch.randn(1, 2, 1, L, S, dtype=torch.float64), True)


def test_mask_read_in_place():
    """Broadcast masks are strided views of the user's mask (stride 0), never expanded copies."""
    x = torch.randn(2, 4, 8, 16)
    m = torch.randn(2, 1, 1, 16)
    _, m4 = A._layout(x, m)
    assert m4.data_ptr() == m.data_ptr() and m4.stride() == (16, 0, 0, 1)
    m = torch.rand(8, 16) > 0.5
    _, m4 = A._layout(x, m)
    assert m4.data_ptr() == m.data_ptr() and m4.stride()[:2] == (0, 0)


def test_long_rows_cpp():
    """Rows longer than the C++ chunk (2048), causal and not, with masks."""
    torch.manual_seed(2)
    with fl.use_backend("cpp"):
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(1, 2, 3, 5000) * 4).to(dtype)
            check(x, 0.2, _mask("bool", 1, 2, 3, 5000, dtype), False)
            check(x, 0.2, _mask("float", 1, 2, 3, 5000, dtype), False)
        x = torch.randn(1, 1, 2100, 2100)  # causal rows crossing the chunk boundary
        check(x, 0.2, None, True)


def test_long_rows_triton(monkeypatch):
    """The streaming kernels, made reachable at tiny sizes."""
    from conftest import _skip_reason
    why = _skip_reason("triton")
    if why:
        pytest.skip(why)
    from fastlayers.kernels import softmax as K
    monkeypatch.setattr(K, "SINGLE_PASS_MAX_ELEMS", 32)
    monkeypatch.setattr(K, "STREAM_CHUNK_ELEMS", 16)
    torch.manual_seed(3)
    with fl.use_backend("triton"):
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(2, 2, 5, 45, dtype=dtype)
            check(x, 0.3, _mask("bool", 2, 2, 5, 45, dtype), True)
            check(x, 0.3, _mask("float", 2, 2, 5, 45, dtype), False)


# ----------------------------------------------------------------------------- special values
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_special_values(backend, dtype):
    """NaN / +-inf scores and fully masked rows give the composite's values and gradients (NaN rows,
    exact zero gradients where masked)."""
    x = torch.randn(1, 2, 6, 9).to(dtype)
    x[0, 0, 0, 3] = float("nan")
    x[0, 0, 1, 2] = float("inf")
    x[0, 0, 2, :] = float("-inf")      # all -inf: NaN row
    x[0, 0, 3, 5] = float("-inf")
    x[0, 1, 4, 7] = float("nan")        # NaN at a causally masked position: ignored
    x[0, 1, 5, 0] = 1e30 if dtype == torch.float32 else 1e30
    mask = torch.ones(1, 1, 6, 9, dtype=torch.bool)
    mask[0, 0, 5] = False               # fully masked by the mask
    for m, causal in ((None, False), (mask, False), (mask, True), (None, True)):
        xs = x.clone().requires_grad_()
        y = fl.attention_softmax(xs, 0.5, m, causal)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        y.backward(g)
        xr, x16 = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr = comp(xr, 0.5, m, causal, None)
        yr.backward(g)
        comp16(x16, 0.5, m, causal, None).backward(g)
        assert torch.equal(y.isnan(), yr.isnan()), (m is not None, causal)
        low = dtype == torch.bfloat16
        torch.testing.assert_close(y, yr, equal_nan=True, rtol=1e-2 if low else 1e-6, atol=1e-5)
        assert torch.equal(xs.grad.isnan(), x16.grad.isnan()) and torch.equal(xr.grad.isnan(), x16.grad.isnan())
        torch.testing.assert_close(xs.grad, x16.grad, equal_nan=True, rtol=2e-2 if low else 1e-6,
                                   atol=2e-3 if low else 1e-5)
        if m is not None:  # fully masked row: NaN probabilities, zero gradient
            assert y[0, 0, 5].isnan().all() and (xs.grad[0, 0, 5] == 0).all()


# ----------------------------------------------------------------------------- gradcheck
def test_create_graph_first_order_is_torchs(backend):
    """With create_graph=True the backward is a second formula (torch ops): gradgradcheck checks
    it only against its own derivative, so check its value against torch's autograd."""
    torch.manual_seed(5)
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    (got,) = torch.autograd.grad(fl.attention_softmax(x, 0.7, None, True), x, dy, create_graph=True)
    keep = torch.ones(4, 6, dtype=torch.bool).tril()
    (want,) = torch.autograd.grad(torch.softmax((x * 0.7).masked_fill(~keep, float("-inf")), -1), x, dy)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_gradcheck(backend, mask):
    torch.manual_seed(4)
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    if backend == "triton":
        x = x[:, :1].detach().requires_grad_()
    m = _mask(mask, 1, x.shape[1], 4, 6, torch.float64)
    if m is not None and m.dtype == torch.bool:
        m[0, 0, 2] = True  # no NaN rows in gradcheck
    if m is not None and m.dtype != torch.bool:
        m[..., -1] = 0.0

    def fn(x):
        return fl.attention_softmax(x, 0.7, m, True)
    torch.autograd.gradcheck(fn, (x,))
    if backend != "triton":  # (double backward is PyTorch ops on y for every backend; the interpreter is slow)
        torch.autograd.gradgradcheck(fn, (x,))


def test_float_mask_gradient():
    """A floating mask that requires grad gets PyTorch's gradient (composite route), reduced over
    its broadcast dims."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    m = torch.randn(1, 3, 1, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, m: fl.attention_softmax(x, 0.5, m, True), (x, m))
    y = fl.attention_softmax(x, 0.5, m)
    gm, = torch.autograd.grad(y.sum() * 0 + (y * y).sum(), m)
    gr, = torch.autograd.grad((lambda t: (t * t).sum())(comp(x, 0.5, m, False, None)), m)
    torch.testing.assert_close(gm, gr)


# ----------------------------------------------------------------------------- dtypes
def within_ulp(a, b):
    """Every element of a equals b's or one of its neighbours in b's dtype."""
    up, down = torch.nextafter(b, torch.full_like(b, float("inf"))), torch.nextafter(b, torch.full_like(b, -float("inf")))
    return bool(((a == b) | (a == up) | (a == down)).all())


def test_hf_eager_expression_bits():
    """For 16-bit scores the result is Hugging Face eager attention's
    ``softmax(w, -1, dtype=float32).to(dtype)`` bit for bit (the composite), within one ulp on the
    kernels; torch.softmax on the 16-bit tensor itself differs from it in ~1e-5 of the elements
    (torch 2.13's CPU kernel, found while checking this claim)."""
    torch.manual_seed(6)
    for dtype in (torch.bfloat16, torch.float16):
        s = (torch.randn(2, 4, 64, 4100) * 5).to(dtype)
        mask = torch.zeros(2, 1, 64, 4100, dtype=dtype)
        mask[..., :7] = torch.finfo(dtype).min
        w = s * 0.125 + mask
        hf = torch.softmax(w, dim=-1, dtype=torch.float32).to(dtype)
        assert torch.equal(comp(s, 0.125, mask, False, None), hf)
        torch_own = torch.softmax(w, -1)
        assert within_ulp(torch_own, hf) and (torch_own != hf).any()  # the finding: not bit-identical
        for be in ("cpp", "reference"):
            with fl.use_backend(be):
                y = fl.attention_softmax(s, 0.125, mask)
            assert within_ulp(y, hf), be
            assert (y != hf).float().mean() < 1e-3, be


def test_dtype_argument(backend):
    torch.manual_seed(7)
    x = torch.randn(1, 2, 5, 9)
    if not (backend == "triton" and INTERPRETED):  # (interpreter: 16-bit numerics are not a GPU's)
        y, _ = check(x.bfloat16(), 0.5, _mask("bool", 1, 2, 5, 9, torch.float32), True, dtype=torch.float32)
        assert y.dtype == torch.float32
    y, _ = check(x, 0.5, None, True, dtype=torch.float64)  # composite route
    assert y.dtype == torch.float64
    # a float32 mask with bfloat16 scores: PyTorch's type promotion (float32 result)
    m = torch.randn(9)
    assert fl.attention_softmax(x.bfloat16(), 1.0, m).dtype == comp(x.bfloat16(), 1.0, m, False, None).dtype


def test_autocast_cpu_as_torch_softmax():
    x = torch.randn(1, 2, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fl.attention_softmax(x, 0.5, causal=True).dtype == torch.softmax(x, -1).dtype == torch.float32
        xb = x.bfloat16()
        assert fl.attention_softmax(xb, 0.5).dtype == torch.softmax(xb, -1).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- layouts, inputs
def test_non_contiguous_scores(backend):
    torch.manual_seed(8)
    x = torch.randn(2, 7, 3, 5, dtype=torch.float64).transpose(1, 3)  # (2, 5, 3, 7) strided
    check(x, 0.4, _mask("float", 2, 5, 3, 7, torch.float64), True)
    m = (torch.rand(2, 1, 7, 3) > 0.3).transpose(-1, -2)  # a transposed bool mask
    check(x, 0.4, m, False)


def test_inputs_not_modified(backend):
    x = torch.randn(1, 2, 4, 6)
    m = torch.randn(1, 1, 4, 6)
    xc, mc = x.clone(), m.clone()
    xs = x.requires_grad_()
    y = fl.attention_softmax(xs, 0.5, m, True)
    g = torch.randn_like(y)
    gc = g.clone()
    y.backward(g)
    assert torch.equal(x.detach(), xc) and torch.equal(m, mc) and torch.equal(g, gc)


def test_grad_and_no_grad_bits_equal(backend):
    torch.manual_seed(9)
    x = torch.randn(2, 2, 5, 33)
    m = _mask("bool", 2, 2, 5, 33, torch.float32)
    with torch.no_grad():
        y0 = fl.attention_softmax(x, 0.3, m, True)
    y1 = fl.attention_softmax(x.clone().requires_grad_(), 0.3, m, True).detach()
    assert y0.isnan().any() and torch.equal(y0.isnan(), y1.isnan())  # (the fully masked row)
    assert torch.equal(y0.nan_to_num(), y1.nan_to_num())


def test_saves_only_the_output():
    """What backward keeps: y (and a bool mask, an input); eager HF attention keeps a float32 copy."""
    x = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16, requires_grad=True)
    m = torch.rand(1, 1, 64, 64) > 0.5
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t), \
            fl.use_backend("cpp"):
        y = fl.attention_softmax(x, 0.125, m, True)
    assert [(tuple(t.shape), t.dtype) for t in seen] == [((1, 2, 64, 64), torch.bfloat16),
                                                        ((1, 1, 64, 64), torch.bool)]
    assert seen[0].untyped_storage().data_ptr() == y.untyped_storage().data_ptr() and seen[1] is m


# ----------------------------------------------------------------------------- errors
def test_errors():
    x = torch.randn(2, 3, 4, 5)
    op = "fastlayers.attention_softmax"
    with pytest.raises(fl.ShapeError, match=rf"{op}: expected mask broadcastable to scores' shape"):
        fl.attention_softmax(x, 1.0, torch.randn(3, 5))
    with pytest.raises(fl.ShapeError, match=rf"{op}: expected mask broadcastable"):
        fl.attention_softmax(x, 1.0, torch.randn(2, 2, 3, 4, 5))  # would broadcast scores up
    with pytest.raises(fl.ShapeError, match=rf"{op}: expected scores of shape \(\*, L, S\)"):
        fl.attention_softmax(torch.randn(5))
    with pytest.raises(fl.DTypeError, match=rf"{op}: expected scores to be a floating-point"):
        fl.attention_softmax(torch.ones(4, 5, dtype=torch.int64))
    with pytest.raises(fl.DTypeError, match=rf"{op}: expected mask to be a boolean or floating-point"):
        fl.attention_softmax(x, 1.0, torch.ones(4, 5, dtype=torch.int32))
    with pytest.raises(fl.DTypeError, match=rf"{op}: expected dtype to be None or a floating-point"):
        fl.attention_softmax(x, dtype=torch.int32)
    with pytest.raises(TypeError, match=rf"{op}: expected scale to be a real number"):
        fl.attention_softmax(x, torch.tensor(1.0))
    with pytest.raises(TypeError, match=rf"{op}: expected causal to be a bool"):
        fl.attention_softmax(x, 1.0, None, 1)
    with pytest.raises(TypeError, match=rf"{op}: expected scores to be a torch.Tensor"):
        fl.attention_softmax([[1.0]])
    with pytest.raises(fl.DeviceError, match=rf"{op}: expected mask on the same device"):
        fl.attention_softmax(x, 1.0, torch.zeros(4, 5, device="meta"))


def test_cpp_entry_points_check_buffers():
    from fastlayers.backends.cpu import _ext
    from fastlayers.backends.cpu import attention as cpu_attention
    _C, _buf = _ext._C, _ext._buf
    x, y = torch.randn(1, 2, 3, 4), torch.empty(1, 2, 3, 4)
    with pytest.raises(ValueError, match="attention_softmax_forward: argument 'mask' has shape"):
        _C.attention_softmax_forward(_buf(x), cpu_attention._mask_buf(torch.ones(1, 1, 3, 4, dtype=torch.bool)), _buf(y),
                                     1.0, False, 1)
    with pytest.raises(ValueError, match="argument 'mask' has dtype code"):
        _C.attention_softmax_forward(_buf(x), cpu_attention._mask_buf(torch.ones(1, 2, 3, 4, dtype=torch.float64)),
                                     _buf(y), 1.0, False, 1)
    with pytest.raises(ValueError, match="probabilities of dtype code"):
        _C.attention_softmax_forward(_buf(x), None, _buf(torch.empty(1, 2, 3, 4, dtype=torch.float64)), 1.0,
                                     False, 1)
    with pytest.raises(ValueError, match="argument 'x' is not contiguous"):
        _C.attention_softmax_forward(_buf(torch.randn(1, 2, 4, 3).transpose(2, 3)), None, _buf(y), 1.0, False, 1)
    with pytest.raises(ValueError, match="attention_softmax_backward: argument 'mask' has dtype code"):
        _C.attention_softmax_backward(_buf(y), _buf(y), cpu_attention._mask_buf(x), _buf(x.clone()), 1.0, False, 1)


# ----------------------------------------------------------------------------- compile / fake / func
def test_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(10)
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    m = torch.rand(2, 1, 8, 8) > 0.2
    m[..., 0] = True

    def f(x, m):
        return (fl.attention_softmax(x, 0.3, m, True) * 2).sum()

    with fl.use_backend("cpp"):
        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        loss = cf(x, m)
        g, = torch.autograd.grad(loss, x)
        loss_e = f(x, m)
        ge, = torch.autograd.grad(loss_e, x)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(g, ge)


def test_library_op_opcheck():
    torch.manual_seed(11)
    x = torch.randn(1, 2, 4, 8)
    bmask = torch.rand(1, 1, 4, 8) > 0.3
    bmask[..., 0] = True  # (opcheck compares outputs without equal_nan: no fully masked row)
    for m in (None, bmask, torch.randn(4, 8)):
        torch.library.opcheck(A.ATTENTION_SOFTMAX.library, (x, m, 0.5, True, torch.float32, torch.float32),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_fake_tensor_meta_and_export():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.randn(2, 3, 4, 5)
        y = fl.attention_softmax(x, 0.5, torch.zeros(4, 5, dtype=torch.bool), True)
        assert y.shape == (2, 3, 4, 5)
    y = fl.attention_softmax(torch.randn(1, 2, 4, 5, device="meta"), causal=True)
    assert y.shape == (1, 2, 4, 5) and y.device.type == "meta"

    class M(torch.nn.Module):
        def forward(self, s, m):
            return fl.attention_softmax(s, 0.5, m, True)

    s, m = torch.randn(1, 2, 4, 6), torch.randn(1, 1, 4, 6)
    ep = torch.export.export(M(), (s, m))
    torch.testing.assert_close(ep.module()(s, m), comp(s, 0.5, m, True, None))


def test_torch_func():
    x = torch.randn(3, 2, 4, 6)
    m = torch.rand(4, 6) > 0.2
    m[:, 0] = True
    out = torch.func.vmap(lambda xi: fl.attention_softmax(xi, 0.5, m, True))(x)
    torch.testing.assert_close(out, comp(x, 0.5, m, True, None))
    g = torch.func.grad(lambda xi: (fl.attention_softmax(xi, 0.5, m, True) ** 2).sum())(x[0])
    torch.testing.assert_close(g, torch.func.grad(lambda xi: (comp(xi, 0.5, m, True, None) ** 2).sum())(x[0]))


def test_module():
    mod = fl.AttentionSoftmax(0.25, causal=True)
    x = torch.randn(1, 2, 4, 6)
    torch.testing.assert_close(mod(x), comp(x, 0.25, None, True, None))
    assert "scale=0.25, causal=True" in repr(mod)


def test_small_cpu_calls_run_pytorch_ops(monkeypatch):
    """Below _TORCH_MAX_NUMEL scores, unforced CPU calls run the composite; from there the kernels."""
    calls = unforced_applies(monkeypatch, A.AttentionSoftmaxFunction)
    n = A._TORCH_MAX_NUMEL
    for rows, fused in ((n // 64 - 1, False), (n // 64, True)):
        calls.clear()
        x = torch.randn(1, 1, rows, 64, requires_grad=True)
        fl.attention_softmax(x, 0.5, None, True)
        assert bool(calls) == fused, rows


@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 3, 0), (0, 4, 4)], ids=str)
def test_empty(backend, shape):
    x = torch.randn(shape, requires_grad=True)
    y = fl.attention_softmax(x, 0.5, torch.zeros(shape[-2:], dtype=torch.bool), True)
    assert y.shape == shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == shape
