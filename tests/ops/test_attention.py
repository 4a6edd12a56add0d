"""fl.scaled_dot_product_attention -- the fused attention with PyTorch's signature -- against
PyTorch's scaled_dot_product_attention (its math path in float64 as the oracle, its CPU flash
attention as "PyTorch's own error"), on the backends with fused attention (cpp, reference); the
calls the kernels do not take are PyTorch's own function, bit for bit."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from fastlayers.ops import attention as A

from conftest import assert_matches

KERNEL_BACKENDS = ["cpp", "reference"]
MATH = torch.ops.aten._scaled_dot_product_attention_math


def _qkv(B, H, L, S, D, dtype, layout="contiguous", seed=0):
    """q (B, H, L, D), k / v (B, H, S, D) in a memory layout: contiguous; "nanogpt" (transposed views
    of one (B, T, 3 H D) buffer, as nanoGPT's split + view + transpose makes them; L == S);
    "bshd" ((B, S, H, D) memory, as Hugging Face's q.view(...).transpose(1, 2)); "sliced" (every
    other head of a wider buffer: non-dense)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    if layout == "contiguous":
        return r(B, H, L, D), r(B, H, S, D), r(B, H, S, D)
    if layout == "nanogpt":
        assert L == S
        x = r(B, L, 3 * H * D)
        return tuple(t.view(B, L, H, D).transpose(1, 2) for t in x.split(H * D, dim=2))
    if layout == "bshd":
        return r(B, L, H, D).transpose(1, 2), r(B, S, H, D).transpose(1, 2), r(B, S, H, D).transpose(1, 2)
    if layout == "sliced":
        return r(B, 2 * H, L, D)[:, ::2], r(B, 2 * H, S, D)[:, ::2], r(B, 2 * H, S, D)[:, ::2]
    raise ValueError(layout)


def check(q, k, v, causal, scale=None, seed=1):
    """Output and the three gradients against float64 PyTorch math and PyTorch's own result in q's
    dtype (assert_matches: fp64 1e-7, fp32 within the GEMM tolerance for a reduction of max(S, D),
    16-bit within twice PyTorch's own error); the output laid out as PyTorch's."""
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fl.scaled_dot_product_attention(*ins, is_causal=causal, scale=scale)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(g)
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = MATH(*refs, is_causal=causal, scale=scale)[0]
    ref.backward(g.double())
    eags = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager = F.scaled_dot_product_attention(*eags, is_causal=causal, scale=scale)
    eager.backward(g)
    assert out.dtype == q.dtype and out.shape == eager.shape
    assert out.stride() == eager.stride(), (out.stride(), eager.stride())
    red = max(k.shape[2], q.shape[3])
    assert_matches(out.detach(), ref.detach(), eager.detach(), red=red, what="out")
    for name, a, b, c in zip("qkv", ins, refs, eags):
        assert_matches(a.grad, b.grad, c.grad, red=red, what=f"d{name}")


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 37, 37, 16), (1, 2, 5, 9, 20), (2, 2, 9, 5, 8), (1, 1, 1, 1, 4),
                                   (2, 2, 33, 17, 64), (1, 2, 70, 70, 40)])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_pytorch(backend_name, dtype, shape, causal):
    with fl.use_backend(backend_name):  # (forced: the kernels at every head dim)
        check(*_qkv(*shape, dtype), causal)


@pytest.mark.parametrize("layout", ["nanogpt", "bshd", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_operands(layout, dtype):
    """Operands are read through their strides (no copies); the output keeps PyTorch's layout
    (nanoGPT's y.transpose(1, 2).contiguous() then copies nothing)."""
    q, k, v = _qkv(2, 4, 48, 48, 16, dtype, layout)
    assert not q.is_contiguous()
    check(q, k, v, True)
    out = fl.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.stride() == F.scaled_dot_product_attention(q, k, v, is_causal=True).stride()
    if layout == "nanogpt":
        assert out.transpose(1, 2).is_contiguous()


def test_scale_and_the_kernel_route(monkeypatch):
    """Unforced, small head dims run the kernels (the Function), with scale given or the default."""
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    calls = []
    real = A.AttentionFunction.apply
    monkeypatch.setattr(A.AttentionFunction, "apply", lambda *a: calls.append(a) or real(*a))
    q, k, v = _qkv(2, 2, 40, 40, 16, torch.float32)
    check(q, k, v, True, scale=0.3)
    check(q, k, v, True)
    check(*_qkv(2, 2, 40, 40, 32, torch.bfloat16), True)  # 16-bit with a gradient, D 32
    assert len(calls) == 3 and calls[0][3] == 0.3 and calls[1][3] == pytest.approx(1 / math.sqrt(16))


def _torch_sdpa_spy(monkeypatch):
    calls = []
    real = A._TORCH_SDPA
    monkeypatch.setattr(A, "_TORCH_SDPA", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("case", ["mask", "dropout", "gqa", "value_dim", "head_dim", "bf16_no_grad", "3d",
                                  "empty", "last_dim_strided", "mixed_dtypes", "not_causal", "float64",
                                  "causal_not_bool"])
def test_other_calls_are_pytorchs_function(monkeypatch, case):
    """What the kernels do not take is PyTorch's own function with the caller's arguments: the same
    bits (dropout: the same random stream)."""
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    calls = _torch_sdpa_spy(monkeypatch)
    q, k, v = _qkv(2, 4, 16, 16, 16, torch.float32)
    kw = {"is_causal": True}
    if case == "mask":
        kw = {"attn_mask": torch.rand(16, 16) > 0.3}
    elif case == "dropout":
        kw["dropout_p"] = 0.3
    elif case == "gqa":
        k, v, kw["enable_gqa"] = k[:, :2], v[:, :2], True
    elif case == "value_dim":
        v = torch.randn(2, 4, 16, 8)
    elif case == "head_dim":
        q, k, v = _qkv(2, 4, 16, 16, A.MAX_HEAD_DIM[torch.float32] + 8, torch.float32)
    elif case == "bf16_no_grad":
        q, k, v = _qkv(2, 4, 16, 16, 16, torch.bfloat16)
    elif case == "3d":
        q, k, v = q[0], k[0], v[0]
    elif case == "empty":
        q = q[:, :, :0]
    elif case == "last_dim_strided":
        q = torch.randn(2, 4, 16, 32)[..., ::2]
    elif case == "mixed_dtypes":
        v = v.double()
    elif case == "not_causal":
        kw = {}
    elif case == "float64":
        q, k, v = _qkv(2, 4, 16, 16, 16, torch.float64)
    elif case == "causal_not_bool":  # PyTorch's own TypeError
        kw = {"is_causal": 1}
    torch.manual_seed(3)
    try:
        ours = fl.scaled_dot_product_attention(q, k, v, **kw)
    except (RuntimeError, TypeError) as e:
        with pytest.raises(type(e), match=str(e).splitlines()[0][:40].replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            F.scaled_dot_product_attention(q, k, v, **kw)
        assert len(calls) == 1
        return
    torch.manual_seed(3)
    theirs = F.scaled_dot_product_attention(q, k, v, **kw)
    assert len(calls) == 1
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_special_values_as_pytorchs_math(dtype, value, which, causal):
    """NaN / inf in q, k or v: the output's and the gradients' NaN patterns are PyTorch's math path's
    (its masked keys get score + -inf and probability 0, so an inf / NaN past a row's diagonal
    still makes NaN: the kernel's exact mode), finite values close to it."""
    t = list(_qkv(1, 2, 7, 7, 16, dtype, seed=5))
    t[which] = t[which].clone()
    t[which][0, 1, 3, 5] = value
    ours = [x.clone().requires_grad_() for x in t]
    theirs = [x.clone().requires_grad_() for x in t]
    with fl.use_backend("cpp"):
        a = fl.scaled_dot_product_attention(*ours, is_causal=causal)
    b = MATH(*theirs, is_causal=causal)[0]
    g = torch.randn(a.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    a.backward(g)
    b.backward(g)
    for x, y, what in [(a, b, "out")] + [(p.grad, r.grad, f"d{n}") for p, r, n in zip(ours, theirs, "qkv")]:
        assert torch.equal(x.isnan(), y.isnan()), what
        torch.testing.assert_close(x, y, equal_nan=True, atol=1e-5, rtol=1e-5, msg=what)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck(backend_name, causal):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 6, 5, 8, torch.float64, seed=4))
    f = lambda a, b, c: fl.scaled_dot_product_attention(a, b, c, is_causal=causal)  # noqa: E731
    with fl.use_backend(backend_name):
        assert torch.autograd.gradcheck(f, (q, k, v))
        assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_inputs_unchanged_and_partial_grads():
    q, k, v = _qkv(2, 2, 20, 20, 16, torch.float32)
    before = [t.clone() for t in (q, k, v)]
    kk = k.clone().requires_grad_()
    out = fl.scaled_dot_product_attention(q, kk, v, is_causal=True)
    out.sum().backward()
    ref = k.clone().requires_grad_()
    F.scaled_dot_product_attention(q, ref, v, is_causal=True).sum().backward()
    torch.testing.assert_close(kk.grad, ref.grad, rtol=2.6e-6, atol=2e-5)
    for a, b in zip((q, k, v), before):
        assert torch.equal(a, b)


def test_threads_and_blocks_agree():
    """Results do not depend on the thread count (work is split by (batch, head) and row block)."""
    q, k, v = _qkv(3, 2, 45, 45, 24, torch.float32, seed=7)
    outs = []
    n = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            ins = [x.clone().requires_grad_() for x in (q, k, v)]
            o = fl.scaled_dot_product_attention(*ins, is_causal=True)
            o.sum().backward()
            outs.append([o.detach()] + [x.grad for x in ins])
    finally:
        torch.set_num_threads(n)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_compile_records_the_op():
    f = torch.compile(lambda a, b, c: fl.scaled_dot_product_attention(a, b, c, is_causal=True), fullgraph=True)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 24, 24, 16, torch.float32))
    out = f(q, k, v)
    out.sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref, is_causal=True).sum().backward()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(*ref, is_causal=True), rtol=2.6e-6, atol=2e-5)
    for a, b in zip((q, k, v), ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=2.6e-6, atol=2e-5)


def test_long_rows_and_many_heads():
    """Rows longer than a key block's registers; (b, h) fewer than the threads; L > S and L < S."""
    for shape in [(1, 1, 300, 300, 16), (1, 3, 129, 260, 32), (1, 1, 260, 129, 8)]:
        with fl.use_backend("cpp"):
            check(*_qkv(*shape, torch.float32, seed=9), True)


@pytest.mark.parametrize("causal", [True, False])
def test_a_row_of_minus_inf_scores_is_zero_as_pytorchs(causal):
    """A query whose scores are all -inf (an inf query against finite keys) gives 0, not NaN, and a
    zero dq row: PyTorch's safe softmax (its flash and math paths agree); the inf * 0 of the
    key padding must not turn it into NaN (found by the fuzz: head dim 1, one key)."""
    q = torch.tensor([[[[1.5, float("inf")], [-2.2, 0.3]]]])
    k = torch.tensor([[[[0.16, -0.61]]]])
    v = torch.tensor([[[[-0.78, 1.06]]]])
    for qq in (q, torch.tensor([[[[float("nan")], [-float("inf")], [-2.2]]]])):
        kk, vv = (k, v) if qq.shape[-1] == 2 else (k[..., :1], v[..., :1])
        ours = [t.clone().requires_grad_() for t in (qq, kk, vv)]
        theirs = [t.clone().requires_grad_() for t in (qq, kk, vv)]
        with fl.use_backend("cpp"):
            a = fl.scaled_dot_product_attention(*ours, is_causal=causal)
        b = MATH(*theirs, is_causal=causal)[0]
        a.sum().backward()
        b.sum().backward()
        for x, y in [(a, b)] + [(o.grad, t.grad) for o, t in zip(ours, theirs)]:
            torch.testing.assert_close(x, y, equal_nan=True, rtol=1e-5, atol=1e-6)
