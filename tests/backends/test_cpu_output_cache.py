"""The CPU output cache (fastlayers._fastpath, csrc/torch/fastpath.cpp; fastlayers.empty_cache): the
CPU kernels' outputs of 32 MiB and more reuse freed blocks instead of fresh pages. A reused block
holds the last tensor's data, so every kernel writing into one must write every element: each op
is run into blocks filled with NaN and compared with the same call on fresh memory."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import fastlayers as fl
from fastlayers import _dispatch
from fastlayers.backends.cpu import _ext

FP = _dispatch._FASTPATH
pytestmark = pytest.mark.skipif(FP is None, reason="fastlayers._fastpath is not built here (no torch at build time): "
                                                   "no output cache, large outputs are fresh buffers")
BIG = _dispatch.CACHED_MIN_BYTES


@pytest.fixture(autouse=True)
def _cache_on(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    cap = FP.cache_stats()[1]
    FP.set_cache_cap(1 << 30)
    fl.empty_cache()
    yield
    FP.set_cache_cap(cap)
    fl.empty_cache()


def test_a_freed_output_is_reused_and_empty_cache_frees_it():
    x, r, w = torch.randn(8192, 1024), torch.randn(8192, 1024), torch.rand(1024)
    y, s = fl.rms_norm(x, w, 1e-6, residual=r)
    ptrs = {y.data_ptr(), s.data_ptr()}
    assert FP.cache_stats()[0] == 0
    del y, s
    assert FP.cache_stats()[0] == 2 * x.numel() * 4
    y, s = fl.rms_norm(x, w, 1e-6, residual=r)
    assert {y.data_ptr(), s.data_ptr()} == ptrs and FP.cache_stats()[0] == 0
    small = fl.rms_norm(x[:100], w, 1e-6)  # below CACHED_MIN_BYTES: an ordinary allocation
    del small, y, s
    assert fl.empty_cache() == 2 * x.numel() * 4 and FP.cache_stats()[0] == 0


def test_the_cap_bounds_what_is_kept():
    FP.set_cache_cap(BIG + BIG // 2)  # room for one block
    a, b = _ext._empty(BIG // 4, dtype=torch.float32), _ext._empty(BIG // 4, dtype=torch.float32)
    del a
    del b  # the older block is evicted to make room
    assert FP.cache_stats()[0] == BIG
    FP.set_cache_cap(0)  # off: frees what it holds, keeps nothing
    assert FP.cache_stats()[0] == 0
    c = _ext._empty(BIG // 4, dtype=torch.float32)
    del c
    assert FP.cache_stats()[0] == 0


def test_cached_tensors_are_ordinary_tensors():
    t = _ext._empty(BIG // 4, dtype=torch.float32)
    t.fill_(1.5)
    t.resize_(BIG // 2)  # grows through the same allocator: data kept
    assert t.numel() == BIG // 2 and torch.equal(t[: BIG // 4], torch.full((BIG // 4,), 1.5))
    u = t.clone()
    v = t.view(2, -1).t()
    assert torch.equal(v.t().reshape(-1), u)
    done = []

    def free_elsewhere(x):
        del x
        done.append(1)
    th = threading.Thread(target=free_elsewhere, args=(t,))
    del t, v
    th.start()
    th.join()
    assert done and FP.cache_stats()[0] >= BIG * 2  # freed from another thread, kept


def test_cached_empty_like_is_empty_likes_layout():
    """_dispatch.empty_contiguous(x, preserve=True) from the cache gives torch.empty_like(x)'s
    sizes and strides (x's own for a dense, non-overlapping x: transposed and permuted views, odd
    strides of size-1 dims) as a tensor of its own (not a view); a non-dense x gets empty_like
    itself (None from the C++ side)."""
    base = torch.empty(64, 2048, 8, 16)  # 64 MiB
    cases = [base.transpose(1, 2), base.permute(3, 0, 2, 1), torch.empty(4096, 4096).t().unsqueeze(1),
             torch.empty(1, 2048, 4096).as_strided((1, 2048, 4096), (7, 4096, 1)), base]
    for x in cases:
        out = _dispatch.empty_contiguous(x, preserve=True)
        ref = torch.empty_like(x)
        assert (out.shape, out.stride(), out.dtype) == (ref.shape, ref.stride(), ref.dtype), x.stride()
        assert out._base is None and out.storage_offset() == 0
        ptr = out.data_ptr()
        del out
        assert _dispatch.empty_contiguous(x, preserve=True).data_ptr() == ptr  # the cached block again
    sliced = base[:, :, ::2]  # not dense: empty_like's own rule
    assert FP.cached_empty_like(sliced) is None
    out = _dispatch.empty_contiguous(sliced, preserve=True)
    assert out.stride() == torch.empty_like(sliced).stride()
    assert FP.cached_empty_like(torch.empty(2, 3).to_sparse()) is None


def test_env_sets_the_cap():
    code = ("import fastlayers._dispatch as d; print(d._FASTPATH.cache_stats()[1])")
    env = dict(os.environ, FASTLAYERS_CPU_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def _poison():
    """Leave cached blocks of the sizes the ops below allocate, filled with NaN."""
    blocks = [_ext._empty(n, dtype=torch.float32) for n in (8 << 20,) * 4 + (16 << 20,) * 3]  # 32 / 64 MiB
    for b in blocks:
        b.fill_(float("nan"))
    del blocks


def _run_both(fn):
    """fn() into NaN-filled reused blocks, then into fresh memory (cache off)."""
    _poison()
    before = FP.cache_stats()[0]
    got = fn()
    assert FP.cache_stats()[0] < before, "no cached block was reused"
    FP.set_cache_cap(0)
    ref = fn()
    return got, ref


def _grads(out, inputs):
    outs = out if isinstance(out, tuple) else (out,)
    g = [torch.ones_like(o) for o in outs]
    return tuple(torch.autograd.grad(outs, inputs, g))


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm", "softmax", "log_softmax", "attention_softmax", "rotary",
                                "rotary_transposed", "cross_entropy", "linear_gelu"])
def test_kernels_write_every_element_of_a_reused_block(op):
    torch.manual_seed(0)
    if op in ("rms_norm", "layer_norm"):
        x = torch.randn(8192, 1024, requires_grad=True)
        r = torch.randn(8192, 1024, requires_grad=True)
        w = torch.rand(1024, requires_grad=True)
        inputs = (x, r, w)
        if op == "rms_norm":
            def fn():
                out = fl.rms_norm(x, w, 1e-6, residual=r)
                return out + _grads(out, inputs)
        else:
            def fn():
                out = fl.layer_norm(x, (1024,), w, None, 1e-5, residual=r)
                return out + _grads(out, inputs)
    elif op in ("softmax", "log_softmax"):
        x = torch.randn(4096, 2048, requires_grad=True)

        def fn():
            y = getattr(fl, op)(x, -1)
            return (y,) + _grads(y, (x,))
    elif op == "attention_softmax":
        s = torch.randn(1, 8, 1024, 1024, requires_grad=True)

        def fn():
            y = fl.attention_softmax(s, 0.125, causal=True)
            return (y,) + _grads(y, (s,))
    elif op == "rotary":
        q = torch.randn(1, 32, 2048, 128, requires_grad=True)
        k = torch.randn(1, 32, 2048, 128, requires_grad=True)
        cos, sin = torch.randn(1, 2048, 128), torch.randn(1, 2048, 128)

        def fn():
            out = fl.rotary(q, k, cos, sin)
            return tuple(out) + _grads(tuple(out), (q, k))
    elif op == "rotary_transposed":  # Hugging Face's layout: (B, S, H, D) buffers viewed as (B, H, S, D)
        q = torch.randn(1, 2048, 32, 128).transpose(1, 2).requires_grad_()
        k = torch.randn(1, 2048, 32, 128).transpose(1, 2).requires_grad_()
        cos, sin = torch.randn(1, 2048, 128), torch.randn(1, 2048, 128)

        def fn():
            out = fl.rotary(q, k, cos, sin)
            assert out[0].stride() == q.stride()  # empty_like's layout, from the cache
            return tuple(out) + _grads(tuple(out), (q, k))
    elif op == "cross_entropy":
        z = torch.randn(2048, 8192, requires_grad=True)
        t = torch.randint(0, 8192, (2048,))
        t[::5] = -100

        def fn():
            loss = fl.cross_entropy(z, t)
            return (loss,) + _grads(loss, (z,))
    else:
        x = torch.randn(4096, 1024, requires_grad=True)
        lin = fl.FusedLinear(1024, 4096, activation="gelu")

        def fn():
            y = lin(x)
            return (y,) + _grads(y, (x, lin.weight))
    got, ref = _run_both(fn)
    for a, b in zip(got, ref):
        assert not a.isnan().any(), f"{op}: a NaN from the reused block's old data"
        assert torch.equal(a, b), op
