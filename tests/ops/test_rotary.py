"""fl.rotary against Hugging Face's apply_rotary_pos_emb (Llama's rotate_half, GPT-NeoX's partial
rotary, GPT-J's interleaved pairs) on every backend (triton: its interpreter, tiny shapes)."""
import pytest
import torch

import fastlayers as fl
from fastlayers.ops import rotary as _rot

from conftest import assert_matches, unforced_applies  # noqa: F401

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------- eager references
def rotate_half(x):
    """transformers' rotate_half (Llama), verbatim."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    """transformers' GPT-J rotate_every_two, on the last dim of any rank."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def eager(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    """Llama's apply_rotary_pos_emb (full rotary) or GPT-NeoX's (partial: cat of rotated and passed
    dims), with GPT-J's rotate_every_two when interleaved."""
    rot = rotate_every_two if interleaved else rotate_half
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    r = cos.shape[-1]
    if r == q.shape[-1] == k.shape[-1]:
        return (q * cos) + (rot(q) * sin), (k * cos) + (rot(k) * sin)
    q_rot, q_pass = q[..., :r], q[..., r:]
    k_rot, k_pass = k[..., :r], k[..., r:]
    q_embed = (q_rot * cos) + (rot(q_rot) * sin)
    k_embed = (k_rot * cos) + (rot(k_rot) * sin)
    return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


def tables(b, s, r, dtype, interleaved=False, batch=None):
    """cos, sin (b, s, r) as HF builds them: cat((freqs, freqs)) or, interleaved, each repeated twice."""
    pos = torch.arange(s, dtype=torch.float64)[:, None] + torch.arange(b, dtype=torch.float64)[:, None, None]
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    f = pos * inv
    emb = f.repeat_interleave(2, -1) if interleaved else torch.cat((f, f), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def layout(name, dtype, b=2, s=5, h=4, hk=2, d=16):
    """(q, k, cos, sin, unsqueeze_dim, interleaved) of a real model's call."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    if name == "llama_gqa":       # (B, S, H, D).transpose(1, 2), fewer KV heads
        return (rnd(b, s, h, d).transpose(1, 2), rnd(b, s, hk, d).transpose(1, 2), *tables(b, s, d, dtype), 1, False)
    if name == "unsqueeze2":      # (B, S, H, D) contiguous, cos unsqueezed at dim 2
        return (rnd(b, s, h, d), rnd(b, s, hk, d), *tables(b, s, d, dtype), 2, False)
    if name == "partial":         # GPT-NeoX / Phi: the first R dims rotate
        return (rnd(b, s, h, d).transpose(1, 2), rnd(b, s, hk, d).transpose(1, 2), *tables(b, s, 6, dtype), 1, False)
    if name == "gptj":            # interleaved pairs, (B, S, H, D), partial rotary_dim
        return (rnd(b, s, h, d), rnd(b, s, h, d), *tables(b, s, 8, dtype, interleaved=True), 2, True)
    if name == "interleaved_full":
        return (rnd(b, s, h, d).transpose(1, 2), rnd(b, s, hk, d).transpose(1, 2),
                *tables(b, s, d, dtype, interleaved=True), 1, True)
    if name == "qkv_slices":      # q, k sliced out of one fused projection: not dense
        qkv = rnd(b, s, h + 2 * hk, d)
        return (qkv[:, :, :h].transpose(1, 2), qkv[:, :, h:h + hk].transpose(1, 2), *tables(b, s, d, dtype), 1, False)
    if name == "batch_broadcast":  # one cos row for the whole batch, 3-D q
        c, sn = tables(1, s, d, dtype)
        return (rnd(h, s, d), rnd(hk, s, d), c[0], sn[0], 0, False)
    if name == "long_head":       # several column blocks (head dim 300 > one tile), partial
        return (rnd(1, 3, 2, 300).transpose(1, 2), rnd(1, 3, 1, 300).transpose(1, 2),
                *tables(1, 3, 260, dtype), 1, False)
    if name == "head_dims_differ":  # partial rotary, q and k of different head dims, a strided cos / sin
        c, sn = tables(b, s, 16, dtype)
        return (rnd(b, s, h, d).transpose(1, 2), rnd(b, s, hk, 12).transpose(1, 2), c[..., ::2], sn[..., ::2], 1,
                False)
    if name == "head_dim_96":     # bf16 rows of 32-lane steps (csrc/rotary.cpp) and a 16-lane tail
        return (rnd(b, s, h, 96).transpose(1, 2), rnd(b, s, hk, 96).transpose(1, 2), *tables(b, s, 96, dtype), 1,
                False)
    if name == "gptj_64":         # interleaved bf16 rows of 32-lane steps and a 16-lane tail (r = 48)
        return (rnd(b, s, h, 64), rnd(b, s, hk, 64), *tables(b, s, 48, dtype, interleaved=True), 2, True)
    if name == "empty":
        return (rnd(b, 0, h, d).transpose(1, 2), rnd(b, 0, hk, d).transpose(1, 2), *tables(b, 0, d, dtype), 1, False)
    raise ValueError(name)


LAYOUTS = ["llama_gqa", "unsqueeze2", "partial", "gptj", "interleaved_full", "qkv_slices", "batch_broadcast",
           "long_head", "head_dims_differ", "head_dim_96", "gptj_64", "empty"]


def strides(t):
    """Strides of the dims that have more than one element (the others' strides mean nothing)."""
    return tuple(st for sz, st in zip(t.shape, t.stride()) if sz > 1)


def check(q, k, cos, sin, ud, il):
    """Values, gradients, dtypes and layouts against eager (in the dtype and in float64)."""
    q0, k0, c0, s0 = (t.clone() for t in (q, k, cos, sin))
    qs, ks = (t.detach().requires_grad_() for t in (q, k))  # the same strided views, as leaves
    oq, ok = fl.rotary(qs, ks, cos, sin, ud, il)
    gq, gk = (torch.randn(o.shape, dtype=torch.float64).to(q.dtype) for o in (oq, ok))
    torch.autograd.backward([oq, ok], [gq, gk])
    for t, t0 in ((q, q0), (k, k0), (cos, c0), (sin, s0)):
        assert torch.equal(t, t0) or (t.isnan() == t0.isnan()).all(), "an input was modified"

    def ref(dtype):
        qr, kr = (t.detach().to(dtype).requires_grad_() for t in (q, k))
        a, b = eager(qr, kr, cos.to(dtype), sin.to(dtype), ud, il)
        torch.autograd.backward([a, b], [gq.to(dtype), gk.to(dtype)])
        return a.detach(), b.detach(), qr.grad, kr.grad
    r64, re = ref(torch.float64), ref(q.dtype)
    eq, ek = eager(q, k, cos, sin, ud, il)
    assert strides(oq) == strides(eq) and strides(ok) == strides(ek), (oq.stride(), eq.stride())
    for name, o, a, e in zip(("q_embed", "k_embed", "dq", "dk"), (oq, ok, qs.grad, ks.grad), r64, re):
        assert o.shape == e.shape and o.dtype == e.dtype, name
        assert_matches(o.detach(), a, e, red=2, what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", LAYOUTS)
def test_matches_eager(backend, dtype, name):
    check(*layout(name, dtype))


def visiting_orders(dtype):
    """Layouts that make the C++ kernel visit rows in each of its orders (csrc/rotary.cpp row_order):
    memory order over a transposed view; a contiguous (B, H, S, D) x, whose positions run in tiles
    of 64 KiB of cos + sin rows across all heads (64 positions at head dim 128 fp32: 150 positions
    are two full tiles and a partial one); per-batch cos rows; and the batch as the innermost dim
    in memory."""
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    b, s, h, hk, d = 2, 150, 3, 2, 128
    c, sn = tables(b, s, d, dtype)
    yield "transposed", (rnd(b, s, h, d).transpose(1, 2), rnd(b, s, hk, d).transpose(1, 2), c, sn, 1, False)
    yield "bhsd_tiles", (rnd(b, h, s, d), rnd(b, hk, s, d), c, sn, 1, False)
    yield "bhsd_tiles_partial", (rnd(b, h, s, d), rnd(b, hk, s, 160), c[..., :96], sn[..., :96], 1, False)
    yield "bhsd_tiles_gptj", (rnd(b, h, s, d), rnd(b, hk, s, d), *tables(b, s, d, dtype, interleaved=True), 1, True)
    yield "batch_innermost", (rnd(h, s, b, d).permute(2, 0, 1, 3), rnd(hk, s, b, d).permute(2, 0, 1, 3), c, sn, 1,
                              False)
    yield "one_cos_row", (rnd(b, h, s, d), rnd(b, hk, s, d), c[:1, :1].expand(b, s, d), sn[:1, :1].expand(b, s, d),
                          1, False)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_visiting_orders(threads, dtype):
    """Every row visited once, in any order and any split across threads: values and gradients
    against eager on each layout of visiting_orders (fails if a tile's rows or a thread's first row
    are decoded wrongly)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fl.use_backend("cpp"):
            for _, case in visiting_orders(dtype):
                check(*case)
    finally:
        torch.set_num_threads(old)


BIT_LAYOUTS = ["llama_gqa", "unsqueeze2", "partial", "gptj", "interleaved_full", "qkv_slices", "batch_broadcast",
               "head_dims_differ", "head_dim_96", "gptj_64"]


def same_bits(a, b):
    """Equal values (torch.equal; NaN where the other has NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", BIT_LAYOUTS)
def test_16bit_bits_equal_eager(backend, dtype, name):
    """bf16 / fp16: eager rounds q * cos, rotate(q) * sin and their sum each to the dtype (and its
    autograd g * cos, g * sin and their sum): the kernels give those bits, forward and backward, on
    data spanning many binades (fp16: up to overflow-free magnitudes and into its subnormals)."""
    q, k, cos, sin, ud, il = layout(name, torch.float32)
    g = torch.Generator().manual_seed(5)
    span = 30 if dtype == torch.bfloat16 else 10

    def spread(t):  # each element scaled by 2^e, e uniform in [-span, span]
        e = torch.randint(-span, span + 1, t.shape, generator=g).to(t.dtype)
        return (t * torch.exp2(e)).to(dtype)
    q, k = spread(q), spread(k)
    cos, sin = cos.to(dtype), sin.to(dtype)
    if q.numel():  # NaN, infinities, inf * 0 (the default NaN) and a zero
        first = lambda t, j: (0,) * (t.dim() - 1) + (j,)  # noqa: E731
        q[first(q, 0)], q[first(q, 1)], q[first(q, 2)], k[first(k, 3)] = float("nan"), float("inf"), 0.0, float("-inf")
        cos, sin = cos.clone(), sin.clone()
        cos[first(cos, 1)], sin[first(sin, 2)] = 0.0, float("inf")
    qs, ks = (t.detach().requires_grad_() for t in (q, k))
    oq, ok = fl.rotary(qs, ks, cos, sin, ud, il)
    gq, gk = (spread(torch.randn(o.shape, generator=g)) for o in (oq, ok))
    torch.autograd.backward([oq, ok], [gq, gk])
    qe, ke = (t.detach().requires_grad_() for t in (q, k))
    eq, ek = eager(qe, ke, cos, sin, ud, il)
    torch.autograd.backward([eq, ek], [gq, gk])
    for what, o, e in (("q_embed", oq, eq), ("k_embed", ok, ek), ("dq", qs.grad, qe.grad), ("dk", ks.grad, ke.grad)):
        assert same_bits(o.detach(), e.detach()), f"{what}: {(o.detach().float() - e.detach().float()).abs().max()}"


def test_matches_transformers():
    """Against transformers' own functions (Llama, GPT-NeoX partial, GPT-J interleaved)."""
    pytest.importorskip("transformers")
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama
    q, k, cos, sin, _, _ = layout("llama_gqa", torch.float32)
    with fl.use_backend("cpp"):
        for ours, theirs in zip(fl.rotary(q, k, cos, sin), llama(q, k, cos, sin)):
            torch.testing.assert_close(ours, theirs)
        for ours, theirs in zip(fl.rotary(q, k, cos[..., :6], sin[..., :6]), neox(q, k, cos[..., :6], sin[..., :6])):
            torch.testing.assert_close(ours, theirs)
        q, k, cos, sin, _, _ = layout("gptj", torch.float32)
        half_sin, half_cos = sin[..., ::2], cos[..., ::2]  # GPT-J takes one value per frequency
        qr = torch.cat([gptj(q[..., :8], half_sin, half_cos), q[..., 8:]], -1)
        torch.testing.assert_close(fl.rotary(q, k, cos, sin, 2, True)[0], qr)
        # 16-bit: transformers' functions round each product and the sum in the dtype (GPT-J casts its
        # sin / cos to q's dtype first); fastlayers gives those bits
        for dtype in (torch.bfloat16, torch.float16):
            q, k, cos, sin, _, _ = layout("llama_gqa", dtype)
            assert all(torch.equal(a, b) for a, b in zip(fl.rotary(q, k, cos, sin), llama(q, k, cos, sin)))
            c6, s6 = cos[..., :6], sin[..., :6]
            assert all(torch.equal(a, b) for a, b in zip(fl.rotary(q, k, c6, s6), neox(q, k, c6, s6)))
            q, k, cos, sin, _, _ = layout("gptj", dtype)
            qr = torch.cat([gptj(q[..., :8], sin[..., ::2], cos[..., ::2]), q[..., 8:]], -1)
            assert torch.equal(fl.rotary(q, k, cos, sin, 2, True)[0], qr)


# ----------------------------------------------------------------------------- gradients
def test_create_graph_first_order_is_eagers(backend):
    """With create_graph=True the backward is a second formula (torch ops): gradgradcheck checks
    it only against its own derivative, so check its value against eager's autograd."""
    torch.manual_seed(2)
    for name in ("llama_gqa", "partial", "gptj"):
        q, k, cos, sin, ud, il = layout(name, torch.float64, b=1, s=3, h=2, hk=1, d=8)
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        got = torch.autograd.grad(fl.rotary(q, k, cos, sin, ud, il), (q, k), (gq, gk), create_graph=True)
        want = torch.autograd.grad(eager(q, k, cos, sin, ud, il), (q, k), (gq, gk))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_gradcheck(backend):
    """fp64 gradcheck through the backend's kernels (q, k); the double backward and the cos / sin
    gradients run PyTorch ops (backend-independent: checked once, on cpp). The interpreter is slow:
    fast_mode there."""
    torch.manual_seed(1)
    for name in ("llama_gqa", "partial", "gptj"):
        q, k, cos, sin, ud, il = layout(name, torch.float64, b=1, s=3, h=2, hk=1, d=8)
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
        fn = lambda q, k: fl.rotary(q, k, cos, sin, ud, il)  # noqa: E731
        torch.autograd.gradcheck(fn, (q, k), fast_mode=backend == "triton")
        if backend != "cpp":
            continue
        torch.autograd.gradgradcheck(fn, (q, k))
        c, s = cos.clone().requires_grad_(), sin.clone().requires_grad_()
        torch.autograd.gradcheck(lambda q, k, c, s: fl.rotary(q, k, c, s, ud, il), (q, k, c, s))


def test_grad_of_one_output_only(backend):
    q, k, cos, sin, ud, il = layout("llama_gqa", torch.float32)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    oq, _ = fl.rotary(q, k, cos, sin, ud, il)
    gq, gk = torch.autograd.grad(oq.sum(), (q, k), allow_unused=True)
    eq, _ = eager(q, k, cos, sin)
    eg = torch.autograd.grad(eq.sum(), (q, k), allow_unused=True)
    torch.testing.assert_close(gq, eg[0])
    assert gk is None or torch.equal(gk, torch.zeros_like(k))


def test_no_grad_and_grad_bits_equal(backend):
    q, k, cos, sin, ud, il = layout("llama_gqa", torch.float32)
    with torch.no_grad():
        a = fl.rotary(q, k, cos, sin, ud, il)
    b = fl.rotary(q.requires_grad_(), k.requires_grad_(), cos, sin, ud, il)
    assert all(torch.equal(x, y.detach()) for x, y in zip(a, b))


def test_saves_only_cos_and_sin():
    q, k, cos, sin, ud, il = layout("llama_gqa", torch.float32)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t), fl.use_backend("cpp"):
        fl.rotary(q, k, cos, sin)
    assert len(seen) == 2 and all(t.untyped_storage().data_ptr() in (cos.untyped_storage().data_ptr(),
                                                                     sin.untyped_storage().data_ptr()) for t in seen)


# ----------------------------------------------------------------------------- special values
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_special_values(backend, dtype):
    q, k, cos, sin, ud, il = layout("llama_gqa", dtype)
    q, k, cos = q.clone(), k.clone(), cos.clone()
    q[0, 0, 0, 1] = float("nan")
    q[0, 1, 2, 3] = float("inf")
    q[1, 2, 3, 9] = float("-inf")
    k[1, 0, 4, 0] = float("inf")
    cos[1, 1, 2] = float("nan")
    cos[0, 3, 5] = float("inf")
    for il_ in (False, True):
        ours = fl.rotary(q, k, cos, sin, ud, il_)
        theirs = eager(q, k, cos, sin, ud, il_)
        for o, e in zip(ours, theirs):
            assert torch.equal(o.isnan(), e.isnan()), "NaN pattern differs"
            fin = ~e.isnan()
            assert torch.equal(o[fin].isinf(), e[fin].isinf()), "inf pattern differs"
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(o[fin], e[fin], rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- dtypes / routes
def test_mixed_dtypes_follow_torch():
    """bf16 q with fp32 cos / sin (HF under autocast): PyTorch's type promotion, eager's exact bits."""
    q, k, cos, sin, ud, il = layout("llama_gqa", torch.bfloat16)
    cos, sin = cos.float(), sin.float()
    for ours, theirs in zip(fl.rotary(q, k, cos, sin), eager(q, k, cos, sin)):
        assert ours.dtype == theirs.dtype == torch.float32
        assert torch.equal(ours, theirs)


def test_autocast_leaves_dtypes_alone():
    q, k, cos, sin, ud, il = layout("llama_gqa", torch.float32)
    for device_dtype in (torch.bfloat16,):
        with torch.autocast("cpu", dtype=device_dtype):
            ours, theirs = fl.rotary(q, k, cos, sin), eager(q, k, cos, sin)
            assert [t.dtype for t in ours] == [t.dtype for t in theirs] == [torch.float32] * 2
            qb = q.bfloat16()
            assert fl.rotary(qb, qb, cos, sin)[0].dtype == eager(qb, qb, cos, sin)[0].dtype


def test_deterministic(backend):
    q, k, cos, sin, ud, il = layout("llama_gqa", torch.float32, s=33)
    a = fl.rotary(q, k, cos, sin)
    assert all(torch.equal(x, y) for x, y in zip(a, fl.rotary(q, k, cos, sin)))


# ----------------------------------------------------------------------------- errors
def test_errors():
    q, k, cos, sin, _, _ = layout("llama_gqa", torch.float32)
    op = "fastlayers.rotary"
    with pytest.raises(fl.ShapeError, match=rf"{op}: q has head dim 16 .* smaller than the rotary dim 18"):
        fl.rotary(q, k, torch.randn(2, 5, 18), torch.randn(2, 5, 18))
    with pytest.raises(fl.ShapeError, match=rf"{op}: expected an even rotary dim .* got 7"):
        fl.rotary(q, k, cos[..., :7], sin[..., :7])
    with pytest.raises(fl.ShapeError, match=rf"{op}: expected sin with the same last dim as cos"):
        fl.rotary(q, k, cos, sin[..., :8])
    with pytest.raises(fl.ShapeError, match=rf"{op}: cos of shape \(3, 5, 16\).* does not broadcast with q"):
        fl.rotary(q, k, torch.randn(3, 5, 16), torch.randn(3, 5, 16))
    with pytest.raises(fl.DTypeError, match=rf"{op}: expected q to be a floating-point tensor"):
        fl.rotary(q.to(torch.int64), k, cos, sin)
    with pytest.raises(fl.DTypeError, match=rf"{op}: expected sin to be a floating-point tensor"):
        fl.rotary(q, k, cos, sin.to(torch.complex64))
    with pytest.raises(TypeError, match=rf"{op}: expected k to be a torch.Tensor"):
        fl.rotary(q, [1.0], cos, sin)
    with pytest.raises(fl.DeviceError, match=rf"{op}: expected cos on the same device as q"):
        fl.rotary(q, k, cos.to("meta"), sin)
    with pytest.raises(IndexError, match=rf"{op}: unsqueeze_dim out of range"):
        fl.rotary(q, k, cos, sin, unsqueeze_dim=4)
    with pytest.raises(TypeError, match=rf"{op}: expected unsqueeze_dim to be an int"):
        fl.rotary(q, k, cos, sin, unsqueeze_dim=1.0)
    with pytest.raises(TypeError, match=rf"{op}: expected interleaved to be a bool"):
        fl.rotary(q, k, cos, sin, interleaved=1)
    with pytest.raises(fl.ShapeError, match=rf"{op}: expected cos to have at least one dim"):
        fl.rotary(q, k, torch.tensor(1.0), sin)


def test_cpp_entry_point_checks_buffers():
    from fastlayers.backends.cpu import _ext
    q, k, cos, sin, _, _ = layout("llama_gqa", torch.float32)
    c4 = cos.unsqueeze(1).expand(2, 4, 5, 16)
    ck = cos.unsqueeze(1).expand(2, 2, 5, 16)
    b = _ext._buf
    out_q, out_k = torch.empty_like(q), torch.empty_like(k)
    with pytest.raises(ValueError, match="rotary: argument 'cos_k' has shape"):
        _ext._C.rotary(b(q), b(k), b(c4), b(c4), b(c4), b(c4), b(out_q), b(out_k), False, False, 1)
    with pytest.raises(ValueError, match="rotary: argument 'q' must be contiguous in its last dim"):
        qt = torch.randn(2, 4, 5, 32)[..., ::2]
        _ext._C.rotary(b(qt), b(k), b(c4), b(c4), b(ck), b(ck), b(out_q), b(out_k), False, False, 1)
    with pytest.raises(ValueError, match="rotary dim 7 must be even"):
        _ext._C.rotary(b(q), b(k), b(c4[..., :7]), b(c4[..., :7]), b(ck[..., :7]), b(ck[..., :7]), b(out_q), b(out_k),
                      False, False, 1)


# ----------------------------------------------------------------------------- compile / export / fake
def test_compile_fullgraph():
    torch._dynamo.reset()
    q, k, cos, sin, ud, il = layout("llama_gqa", torch.float32)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()

    def f(q, k, cos, sin):
        a, b = fl.rotary(q, k, cos, sin)
        return (a * 2).sum() + (b * b).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = cf(q, k, cos, sin)
    grads = torch.autograd.grad(loss, (q, k))
    loss_e = f(q, k, cos, sin)
    torch.testing.assert_close(loss, loss_e)
    for a, c in zip(grads, torch.autograd.grad(loss_e, (q, k))):
        torch.testing.assert_close(a, c)

    gm_ops = []  # the graph Dynamo records holds the registered op

    def backend(gm, inputs):
        gm_ops.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=backend)(q, k, cos, sin)
    assert any("fastlayers.rotary" in t for t in gm_ops), gm_ops


def test_export():
    q, k, cos, sin, ud, il = layout("partial", torch.float32)

    class M(torch.nn.Module):
        def forward(self, q, k, cos, sin):
            return fl.rotary(q, k, cos, sin)
    ep = torch.export.export(M(), (q, k, cos, sin))
    for a, b in zip(ep.module()(q, k, cos, sin), eager(q, k, cos, sin)):
        torch.testing.assert_close(a, b)


def test_library_op_opcheck():
    q, k, cos, sin, ud, il = layout("llama_gqa", torch.float32)
    torch.library.opcheck(_rot.ROTARY.library, (q, k, cos.unsqueeze(1), sin.unsqueeze(1), False))
    q, k, cos, sin, ud, il = layout("gptj", torch.float32)
    torch.library.opcheck(_rot.ROTARY.library, (q, k, cos.unsqueeze(2), sin.unsqueeze(2), True))


def test_fake_tensor_and_meta():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k = torch.randn(2, 5, 4, 16).transpose(1, 2), torch.randn(2, 5, 2, 16).transpose(1, 2)
        cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
        a, b = fl.rotary(q, k, cos, sin)
        assert a.shape == q.shape and b.shape == k.shape and a.stride() == q.stride()
    q = torch.randn(2, 4, 5, 16, device="meta")
    a, _ = fl.rotary(q, q, torch.randn(2, 5, 16, device="meta"), torch.randn(2, 5, 16, device="meta"))
    assert a.shape == q.shape and a.device.type == "meta"


def test_torch_func_vmap_grad():
    q, k, cos, sin, ud, il = layout("llama_gqa", torch.float32)
    out = torch.func.vmap(lambda qi, ki: fl.rotary(qi, ki, cos[0], sin[0], 0))(q, k)
    ref = torch.func.vmap(lambda qi, ki: eager(qi, ki, cos[0], sin[0], 0))(q, k)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    g = torch.func.grad(lambda qi: fl.rotary(qi, k, cos, sin)[0].pow(2).sum())(q)
    torch.testing.assert_close(g, torch.func.grad(lambda qi: eager(qi, k, cos, sin)[0].pow(2).sum())(q))


def test_small_cpu_calls_run_pytorch_ops(monkeypatch):
    """Below rotary._TORCH_MAX_NUMEL q + k elements, unforced CPU calls are PyTorch's own ops."""
    calls = unforced_applies(monkeypatch, _rot.RotaryFunction)
    limit = _rot._TORCH_MAX_NUMEL
    for s, fused in ((limit // (6 * 16) - 1, False), (limit // (6 * 16) + 1, True)):
        q, k, cos, sin, ud, il = layout("llama_gqa", torch.float32, b=1, s=s)
        calls.clear()
        a, b = fl.rotary(q.requires_grad_(), k, cos, sin)
        assert bool(calls) == fused, s
        torch.testing.assert_close(a, eager(q, k, cos, sin)[0])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the shape checks, run while tracing
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_jit_trace():
    q, k, cos, sin, ud, il = layout("llama_gqa", torch.float32)
    traced = torch.jit.trace(lambda q, k: fl.rotary(q, k, cos, sin), (q, k))
    for a, b in zip(traced(q * 2, k), eager(q * 2, k, cos, sin)):
        torch.testing.assert_close(a, b)


def test_unsqueeze_dim_checked_for_sin_too():
    q, k, cos, sin, _, _ = layout("llama_gqa", torch.float32)
    with pytest.raises(IndexError, match=r"fastlayers.rotary: unsqueeze_dim out of range for sin of 2 dims"):
        fl.rotary(q, k, cos, sin[0], unsqueeze_dim=3)
    # unsqueeze_dim counts from the end for each table as torch.unsqueeze does: broadcast like eager
    for a, b in zip(fl.rotary(q, k, cos, sin[0], unsqueeze_dim=-3), eager(q, k, cos, sin[0], -3)):
        torch.testing.assert_close(a, b)
