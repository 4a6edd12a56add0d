"""Property-based differential tests (hypothesis): every op x activation x backend against float64
PyTorch on random shapes (0, 1, primes, long rows), dtypes, layouts of every tensor argument
(contiguous, transposed, sliced, stride-0 expanded) and value classes (ordinary, tiny/subnormal,
large, NaN and -0 sprinkled in, +-inf / NaN / -0 in any argument, near-overflow values up to
finfo.max where no sum of them is formed, -inf masks for softmax), forward and backward; non-finite
patterns (NaN, +inf, -inf positions) exactly PyTorch's, finite values within the tolerances.

Profiles (HYPOTHESIS_PROFILE, or pytest --hypothesis-profile):
    ci    (default) a bounded number of examples per test, derandomized: part of `make test`
    fuzz  many examples, random seeds: `make fuzz` loops over seeds for FUZZ_MINUTES and saves
          each failure's output (with its @reproduce_failure blob) under fuzz-failures/
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (make installs it)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastlayers as fl  # noqa: E402
from fastlayers.backends import reference as _ref_backend  # noqa: E402
from fastlayers.activations import ACTIVATIONS, NAMES  # noqa: E402
from conftest import assert_matches  # noqa: E402
from integration_helpers import backend_skip_reason  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=int(os.environ.get("FASTLAYERS_FUZZ_EXAMPLES", "2000")),
                          deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
# Longest row the softmax fuzz draws (the interpreter's: 5000): 2^20 when fuzzing long, 2^17 in CI.
LONGEST_ROW = 1 << 20 if PROFILE == "fuzz" else 1 << 17

BACKENDS = [b for b in ("cpp", "reference", "triton") if backend_skip_reason(b) is None]
# Interpreter programs cost ~2 ms each: triton gets small sizes; its bf16/fp16 numerics are not a
# GPU's there (conftest.LOW_PRECISION_SKIP), so it fuzzes fp32/fp64 only.
INTERPRETED = "triton" in BACKENDS and not torch.cuda.is_available()
SIZES = [0, 1, 2, 3, 5, 7, 13, 16, 31, 64, 97, 127]
SMALL = [0, 1, 2, 3, 5, 7, 13, 17, 33]


def _count(op: str, backend: str, dtype: torch.dtype) -> None:
    """`make fuzz` tallies the cases run per op x backend x dtype (scripts/fuzz.py)."""
    path = os.environ.get("FASTLAYERS_FUZZ_COUNTS")
    if path:
        with open(path, "a") as f:
            f.write(f"{op} {backend} {str(dtype).replace('torch.', '')}\n")


# ----------------------------------------------------------------------------- strategies
@st.composite
def values(draw, shape, dtype, klass=None):
    """A float64 tensor of `shape` in a value class, then rounded to dtype (so the float64
    reference sees exactly the rounded inputs)."""
    klass = klass or draw(st.sampled_from(["normal", "tiny", "large", "special", "nonfinite"]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if klass == "tiny":
        t = t * (1e-39 if dtype == torch.float32 else 1e-300 if dtype == torch.float64 else 1e-30)
    elif klass == "large":
        t = t * 30
    elif klass == "special" and t.numel():
        idx = torch.randint(0, t.numel(), (max(1, t.numel() // 7),), generator=g)
        flat = t.view(-1)
        flat[idx[::2]] = -0.0
        flat[idx[1::2]] = math.nan
    elif klass == "nonfinite" and t.numel():  # +-inf, NaN and -0 sprinkled in
        idx = torch.randint(0, t.numel(), (max(1, t.numel() // 7),), generator=g)
        flat = t.view(-1)
        flat[idx[0::4]] = math.inf
        flat[idx[1::4]] = -math.inf
        flat[idx[2::4]] = math.nan
        flat[idx[3::4]] = -0.0
    elif klass in ("huge", "overflow") and t.numel():
        # Near-overflow magnitudes sprinkled in: "overflow" up to the dtype's max (for a bias, added
        # once: no sum of them whose overflow would depend on the order of the additions), "huge"
        # 1e30 (1e300 in fp64; no sum of < 1e8 of them overflows, their products do).
        idx = torch.randint(0, t.numel(), (max(1, t.numel() // 5),), generator=g)
        mx = torch.finfo(dtype).max
        mags = ([mx, mx / 1.5, mx / 1.7, 1e20, 1e13] if klass == "overflow"
                else [1e300 if dtype == torch.float64 else 1e30, 1e20, 1e13])
        pick = torch.randint(0, len(mags), (idx.numel(),), generator=g)
        flat = t.view(-1)
        flat[idx] = torch.tensor(mags, dtype=torch.float64)[pick] * torch.sign(flat[idx] + 0.5)
    return t.to(dtype)


@st.composite
def laid_out(draw, t: torch.Tensor):
    """The same values as `t` in another memory layout (never changes what the op computes)."""
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced" and t.dim() >= 1:
        wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2 + 1, dtype=t.dtype)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    if kind == "expanded" and t.dim() >= 1 and t.numel() and t.shape[0] > 1:
        # rows all equal to the first one, as a stride-0 view
        return t[:1].expand(t.shape)
    return t


def assert_nonfinite_equal(out: torch.Tensor, eager: torch.Tensor, what: str, alt=None) -> None:
    """NaN, +inf and -inf at exactly PyTorch's positions (its result in the same dtype; elementwise
    or those of `alt`, another accepted result or a tuple of them)."""
    alts = () if alt is None else tuple(alt) if isinstance(alt, (tuple, list)) else (alt,)
    for name, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, b = f(out), f(eager)
        bad = a != b
        for other in alts:
            bad &= a != f(other)
        if bad.any():
            idx = bad.nonzero()[:5].tolist()
            raise AssertionError(f"{what}: {name} pattern differs from PyTorch's at {idx}: "
                                 f"ours {[out[tuple(i)].item() for i in idx]}, "
                                 f"torch {[eager[tuple(i)].item() for i in idx]}")


def _finite_only(out, r, e):
    """The three tensors with every position where any is not finite set to 0 (compared above)."""
    keep = torch.isfinite(out) & torch.isfinite(e) & torch.isfinite(r)
    z = lambda t: torch.where(keep, t, torch.zeros((), dtype=t.dtype))  # noqa: E731
    return z(out), z(r), z(e)


def _dtypes(backend: str):
    out = [torch.float32, torch.float64]
    if not (backend == "triton" and INTERPRETED):
        out += [torch.bfloat16]
    return out


# ----------------------------------------------------------------------------- linear + act
@st.composite
def linear_case(draw):
    backend = draw(st.sampled_from(BACKENDS))
    sizes = SMALL if backend == "triton" else SIZES
    m, k, n = (draw(st.sampled_from(sizes)) for _ in range(3))
    lead = draw(st.sampled_from([(m,), (1, m), (m, 1)] if m else [(m,)]))
    dtype = draw(st.sampled_from(_dtypes(backend)))
    act = draw(st.sampled_from(NAMES))
    slope = draw(st.sampled_from([0.01, 0.2, 0.0, -0.3]))
    klass = draw(st.sampled_from(["normal", "tiny", "large", "special", "nonfinite", "overflow"]))
    # Which arguments get the value class (the others are "normal"): "large" and "overflow"
    # pre-activations (saturating exp, tanh, erf; 1.702 z or z^2 overflowing) come from the bias:
    # added exactly, so the fp32 reference error stays that of an ordinary GEMM rather than
    # K * 30 * eps, and no sum of near-overflow terms (whose overflow would depend on the order of
    # the additions) is formed. "special" and "nonfinite" go into any of x, W, b, dy.
    where = ({"b"} if klass in ("large", "overflow") else {"x"} if klass in ("normal", "tiny")
             else set(draw(st.sets(st.sampled_from(["x", "w", "b", "dy"]), min_size=1))))

    def cls(arg):
        return klass if arg in where else "normal"
    x = draw(laid_out(draw(values((*lead, k), dtype, cls("x")))))
    w = draw(laid_out(draw(values((n, k), dtype, cls("w")))))
    b = draw(st.one_of(st.none(), values((n,), dtype, cls("b")).flatmap(laid_out)))
    dy = draw(laid_out(draw(values((*lead, n), dtype, cls("dy")))))
    return backend, x, w, b, act, slope, dy, klass


class _FormulaAct(torch.autograd.Function):
    """PyTorch's activation with the semantics of ATen's formula at every size: the reference
    backend's act_forward / act_grad, i.e. PyTorch's own ops except where their vectorised loop
    (run on long tensors) departs from the formula: gelu(+inf) and gelu(z >= ~1.7e38) forward,
    hardswish'(nan) and relu6'(nan) (tests/ops/test_activation_grid.py)."""

    @staticmethod
    def forward(ctx, z, name, slope):
        act = ACTIVATIONS[name]
        y = _ref_backend.act_forward(z, act, slope)
        kind = act.saves(slope)
        ctx.act, ctx.slope = act, slope
        ctx.save_for_backward(y if kind == "output" else z)
        return y

    @staticmethod
    def backward(ctx, dy):
        (saved,) = ctx.saved_tensors
        return _ref_backend.act_grad(dy, saved, ctx.act, ctx.slope), None, None


def formula_act(z, act, slope):
    return z if act == "none" else _FormulaAct.apply(z, act, slope)


def _linear_ref(x, w, b, act, slope, dy, dtype):
    xs, ws = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    bs = None if b is None else b.detach().to(dtype).requires_grad_()
    y = formula_act(F.linear(xs, ws, bs), act, slope)
    y.backward(dy.to(dtype))
    return [y.detach(), xs.grad, ws.grad] + ([] if bs is None else [bs.grad])


@given(linear_case())
def test_fuzz_linear_act(case):
    backend, x, w, b, act, slope, dy, klass = case
    _count("linear_act", backend, x.dtype)
    inputs = [t.clone() for t in (x, w, dy)] + ([] if b is None else [b.clone()])
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
    bl = None if b is None else b.detach().requires_grad_()
    with fl.use_backend(backend):
        y = fl.linear_act(xl, wl, bl, act, slope)
        y.backward(dy)
    outs = [y.detach(), xl.grad, wl.grad] + ([] if bl is None else [bl.grad])
    for t, t0 in zip([x, w, dy] + ([] if b is None else [b]), inputs):  # inputs never modified
        torch.testing.assert_close(t.detach(), t0, rtol=0, atol=0, equal_nan=True)
    ref64, eager = _linear_ref(x, w, b, act, slope, dy, torch.float64), _linear_ref(x, w, b, act, slope, dy, x.dtype)
    m = x.numel() // max(x.shape[-1], 1)
    k, n = w.shape[1], w.shape[0]
    names = ("y", "dx", "dW", "db")
    for i, (out, r, e) in enumerate(zip(outs, ref64, eager)):
        red = (k, n, m, m)[i]
        if klass in ("special", "nonfinite", "overflow"):
            # Non-finite patterns exactly PyTorch's in its own dtype (NaN / inf spread through the
            # backward's GEMMs the same way); the finite values within the tolerance. Also accepted:
            # - the exact pattern (float64's, rounded to the dtype): PyTorch's bf16 mm on this AMX
            #   Xeon spreads a NaN over a whole output row (dW[5, :] all NaN where float64 and
            #   fastlayers have it in 2 of 13 columns: dy's column 5 and x hold no NaN together);
            # - for the cpp backend's GELU, ATen's own kernel's result: bf16 GELU runs it (its
            #   vectorised loop: gelu(+inf) = NaN; tests/ops/test_activation_grid.py aten_alt), and
            #   the small-call routes run F.gelu, whose vectorised loop overflows to +inf from
            #   ~FLT_MAX / 2 (gelu(2.27e38) = inf, its scalar loop and float64 give 2.27e38).
            aten = F.gelu(F.linear(x, w, b)) if i == 0 and backend == "cpp" and act == "gelu" else None
            alts = (r.to(out.dtype),) + (() if aten is None else (aten,))
            assert_nonfinite_equal(out, e, f"{backend} {act} {x.dtype} {names[i]} ({klass})", alts)
            out, r, e = _finite_only(out, r, e)
            if aten is not None:
                keep = torch.isfinite(aten)
                out, r, e = (torch.where(keep, t, torch.zeros((), dtype=t.dtype)) for t in (out, r, e))
        if x.dtype == torch.bfloat16 and i > 0 and red < 8:
            # A bf16 gradient summed over a handful of terms: one bf16 ulp of a saved y (fused
            # epilogues round z once, eager twice) moves act'(y) by ~1% and the result by about an
            # ulp, while torch's own error can be ~0 by luck: "2x torch's error" is a coin flip.
            continue
        assert_matches(out, r, e, red=red, what=f"{backend} {act} {x.dtype} {names[i]}")


# ----------------------------------------------------------------------------- softmax
@st.composite
def softmax_case(draw):
    backend = draw(st.sampled_from(BACKENDS))
    ndim = draw(st.integers(0, 4))
    sizes = SMALL if backend == "triton" else SIZES
    shape = [draw(st.sampled_from(sizes)) for _ in range(ndim)]
    dim = draw(st.integers(-max(ndim, 1), max(ndim, 1) - 1))
    if ndim and draw(st.integers(0, 9)) == 0:  # now and then one long row
        longest = 5000 if backend == "triton" else LONGEST_ROW
        shape = [1] * ndim
        shape[dim] = draw(st.sampled_from([2047, 2049, 4096 + 3, longest]))
    dtype = draw(st.sampled_from(_dtypes(backend)))
    klass = draw(st.sampled_from(["normal", "tiny", "large", "special", "masked", "nonfinite", "huge"]))
    x = draw(values(tuple(shape), dtype, "normal" if klass == "masked" else klass))
    if klass == "masked" and x.numel():
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        x = x.masked_fill(torch.rand(x.shape, generator=g) < 0.6, -math.inf)  # some rows all -inf
    x = draw(laid_out(x))
    dy_klass = draw(st.sampled_from(["normal", "normal", "nonfinite", "huge"]))
    dy = draw(laid_out(draw(values(tuple(shape), dtype, dy_klass))))
    return backend, x, dim, draw(st.booleans()), dy, klass if dy_klass == "normal" else f"{klass}/dy {dy_klass}"


@given(softmax_case())
def test_fuzz_softmax(case):
    backend, x, dim, log, dy, klass = case
    _count("log_softmax" if log else "softmax", backend, x.dtype)
    x0 = x.clone()
    xl = x.detach().requires_grad_()
    with fl.use_backend(backend):
        y = (fl.log_softmax if log else fl.softmax)(xl, dim)
        y.backward(dy)
    torch.testing.assert_close(x, x0, rtol=0, atol=0, equal_nan=True)
    op = torch.log_softmax if log else torch.softmax

    def ref(dtype):
        xs = x.detach().to(dtype).requires_grad_()
        yr = op(xs, dim)
        yr.backward(dy.to(dtype))
        return yr.detach(), xs.grad

    (y64, g64), (ye, ge) = ref(torch.float64), ref(x.dtype)
    red = x.shape[dim] if x.dim() else 1
    what = f"{backend} {op.__name__} {x.dtype} ({klass})"
    yo, dx = y.detach(), xl.grad
    if klass != "normal":  # NaN / inf / fully -inf rows: the patterns exactly, then finite values
        assert_nonfinite_equal(yo, ye, what + " y")
        assert_nonfinite_equal(dx, ge, what + " dx")
        yo, y64, ye = _finite_only(yo, y64, ye)
        dx, g64, ge = _finite_only(dx, g64, ge)
    assert_matches(yo, y64, ye, red=red, what=what + " y")
    if "/dy" in klass:
        # dx = y (dy - sum(dy y)) with near-overflow / non-finite dy: a sum over the row whose
        # rounding and cancellation depend on the order of the additions: the patterns are the check.
        return
    if x.dtype == torch.bfloat16 and red < 8:
        # As for linear_act: over a few terms, one bf16 ulp of the saved y (its rounding depends on
        # the layout the row was reduced in -- found with the reference backend itself) decides dx.
        return
    assert_matches(dx, g64, ge, red=red, what=what + " dx")


# ----------------------------------------------------------------------------- bad input
@given(st.sampled_from(BACKENDS), st.sampled_from([(3, 4), (3,), (4, 3, 2)]),
       st.sampled_from([(5, 4), (4,), (5, 4, 1), (0, 4)]), st.sampled_from([None, (5,), (4,), (1, 5)]))
def test_fuzz_bad_shapes_raise_clearly(backend, xs, ws, bs):
    x, w = torch.randn(xs), torch.randn(ws)
    b = None if bs is None else torch.randn(bs)
    try:
        ref = F.linear(x, w, b)
    except RuntimeError:
        ref = None
    with fl.use_backend(backend):
        if ref is None or w.dim() != 2 or (b is not None and b.dim() != 1):
            with pytest.raises((ValueError, TypeError), match="fastlayers.linear_act: "):
                fl.linear_act(x, w, b, "relu")
        else:
            torch.testing.assert_close(fl.linear_act(x, w, b, "none"), ref)


# ----------------------------------------------------------------------------- gated linear
@st.composite
def gated_case(draw):
    backend = draw(st.sampled_from(BACKENDS))
    sizes = SMALL if backend == "triton" else SIZES
    m, k, n = (draw(st.sampled_from(sizes)) for _ in range(3))
    dtype = draw(st.sampled_from(_dtypes(backend)))
    act = draw(st.sampled_from(NAMES))
    slope = draw(st.sampled_from([0.01, -0.3]))
    # A value class for some arguments: "nonfinite" (+-inf, NaN, -0) anywhere, "huge" (1e30, 1e300
    # in fp64: products overflow, no sum of them does) in the biases only (pre-activations exact).
    klass = draw(st.sampled_from(["normal", "normal", "nonfinite", "huge"]))
    args = ("x", "wg", "wu", "bg", "bu", "dy")
    where = (set() if klass == "normal" else
             set(draw(st.sets(st.sampled_from(["bg", "bu"] if klass == "huge" else args), min_size=1))))

    def cls(arg):
        return klass if arg in where else "normal"
    x = draw(laid_out(draw(values((m, k), dtype, cls("x")))))
    wg, wu = (draw(laid_out(draw(values((n, k), dtype, cls(a))))) for a in ("wg", "wu"))
    bg, bu = (draw(st.one_of(st.none(), values((n,), dtype, cls(a)).flatmap(laid_out))) for a in ("bg", "bu"))
    dy = draw(laid_out(draw(values((m, n), dtype, cls("dy")))))
    return backend, x, wg, wu, bg, bu, act, slope, dy, klass


def _gated_ref(args, act, slope, dy, dtype):
    leaves = [None if a is None else a.detach().to(dtype).requires_grad_() for a in args]
    x, wg, wu, bg, bu = leaves
    y = formula_act(F.linear(x, wg, bg), act, slope) * F.linear(x, wu, bu)
    y.backward(dy.to(dtype))
    return [y.detach()] + [None if a is None else a.grad for a in leaves]


@given(gated_case())
def test_fuzz_gated_linear(case):
    backend, x, wg, wu, bg, bu, act, slope, dy, klass = case
    _count("gated_linear", backend, x.dtype)
    args = [x, wg, wu, bg, bu]
    before = [None if a is None else a.clone() for a in args]
    leaves = [None if a is None else a.detach().requires_grad_() for a in args]
    with fl.use_backend(backend):
        y = fl.gated_linear(*leaves, activation=act, negative_slope=slope)
        y.backward(dy)
    for a, a0 in zip(args, before):  # inputs never modified
        if a is not None:
            torch.testing.assert_close(a, a0, rtol=0, atol=0, equal_nan=True)
    outs = [y.detach()] + [None if a is None else a.grad for a in leaves]
    ref64, eager = _gated_ref(args, act, slope, dy, torch.float64), _gated_ref(args, act, slope, dy, x.dtype)
    m, k, n = x.shape[0], x.shape[1], wg.shape[0]
    names = ("y", "dx", "dWg", "dWu", "dbg", "dbu")
    for i, (out, r, e) in enumerate(zip(outs, ref64, eager)):
        if r is None:
            continue
        red = (k, n, m, m, m, m)[i]
        if klass != "normal":  # non-finite patterns exactly PyTorch's, then the finite values
            assert_nonfinite_equal(out, e, f"{backend} {act} {x.dtype} {names[i]} ({klass})")
            out, r, e = _finite_only(out, r, e)
        if x.dtype == torch.bfloat16 and i > 0 and red < 8:
            continue  # a bf16 gradient of a handful of terms: see test_fuzz_linear_act
        assert_matches(out, r, e, red=red, what=f"{backend} {act} {x.dtype} {names[i]}")


# ----------------------------------------------------------------------------- losses
import fastlayers.ops.linear_cross_entropy as _fl_loss  # noqa: E402


@st.composite
def loss_case(draw):
    """Logits / hidden states, class-index targets with ignored entries, the options of
    F.cross_entropy (ignore_index, label_smoothing, reduction, class weights for cross_entropy)."""
    backend = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from(_dtypes(backend)))
    n = draw(st.sampled_from(SMALL if backend == "triton" else SIZES))
    c = draw(st.sampled_from([1, 2, 3, 5, 17, 64] + ([] if backend == "triton" else [1000])))
    ignore_index = draw(st.sampled_from([-100, 0, 1]))
    t = torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)), dtype=torch.long)
    ignored = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    t = torch.where(ignored, torch.full_like(t, ignore_index), t) if n else t
    smoothing = draw(st.sampled_from([0.0, 0.1]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return backend, dtype, n, c, t, ignore_index, smoothing, reduction


def _loss_outputs(f, args, grad_of):
    """f(*args) and its gradients w.r.t. args[i] for i in grad_of, from an upstream gradient of ones
    scaled per element (a fixed pattern: the same for every dtype)."""
    y = f(*args)
    g = torch.linspace(0.5, 1.5, max(y.numel(), 1), dtype=torch.float64)[: y.numel()].reshape(y.shape)
    grads = torch.autograd.grad(y, [args[i] for i in grad_of], g.to(y.dtype), allow_unused=True)
    return [y.detach()] + list(grads)


def _sprinkle(t: torch.Tensor, klass: str, seed: int) -> torch.Tensor:
    """t with the special values of a value class sprinkled in (see values())."""
    if klass == "normal" or not t.numel():
        return t
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, t.numel(), (max(1, t.numel() // 7),), generator=g)
    out = t.detach().clone().double()
    flat = out.view(-1)
    if klass == "nonfinite":
        flat[idx[0::4]], flat[idx[1::4]], flat[idx[2::4]], flat[idx[3::4]] = math.inf, -math.inf, math.nan, -0.0
    else:  # huge
        flat[idx] = (1e300 if t.dtype == torch.float64 else 1e30) * torch.sign(flat[idx] + 0.5)
    return out.to(t.dtype)


def _check_loss(got, ref, eager, red, what, klass):
    for i, (a, r, e) in enumerate(zip(got, ref, eager)):
        if klass != "normal":
            assert_nonfinite_equal(a, e, f"{what} output {i} ({klass})")
            a, r, e = _finite_only(a, r, e)
        yield i, a, r, e


@given(loss_case(), st.booleans(), st.sampled_from(["normal", "normal", "nonfinite", "huge"]))
def test_fuzz_cross_entropy(case, weighted, klass):
    backend, dtype, n, c, t, ignore_index, eps, reduction = case
    _count("cross_entropy", backend, dtype)
    g = torch.Generator().manual_seed(n * 1000 + c)
    x = _sprinkle((torch.randn(n, c, generator=g) * 3).to(dtype), klass, n + c)
    w = (torch.rand(c, generator=g) + 0.5).to(dtype) if weighted else None
    x0 = x.clone()
    kw = dict(ignore_index=ignore_index, label_smoothing=eps, reduction=reduction)

    def ours(x):
        with fl.use_backend(backend):
            return fl.cross_entropy(x, t, weight=w, **kw)

    def torch_op(dt):  # F.cross_entropy on inputs of dtype dt
        return lambda x: F.cross_entropy(x, t, weight=None if w is None else w.to(dt), **kw)
    got = _loss_outputs(ours, [x.detach().requires_grad_()], [0])
    torch.testing.assert_close(x, x0, rtol=0, atol=0, equal_nan=True)  # inputs never modified
    ref = _loss_outputs(torch_op(torch.float64), [x.double().requires_grad_()], [0])
    eager = _loss_outputs(torch_op(dtype), [x.detach().requires_grad_()], [0])
    what = f"{backend} {dtype} {reduction}"
    for i, a, r, e in _check_loss(got, ref, eager, max(n, c), what, klass):
        if klass == "huge" and i == 0 and reduction != "none":
            continue  # a sum of huge row losses: its rounding depends on the order of the additions
        assert_matches(a, r, e, red=max(n, c), what=f"{what} output {i}")


@given(loss_case(), st.booleans(), st.sampled_from([1, 3, 16]), st.booleans(),
       st.sampled_from(["normal", "normal", "nonfinite", "huge"]), st.sampled_from(["h", "w", "b"]))
def test_fuzz_linear_cross_entropy(case, bias, hidden, small_blocks, klass, arg):
    """small_blocks: forward chunks of a few tokens and gradient blocks of 8 vocabulary entries.
    klass: non-finite or huge values sprinkled into the argument `arg`."""
    backend, dtype, n, c, t, ignore_index, eps, reduction = case
    _count("linear_cross_entropy", backend, dtype)
    g = torch.Generator().manual_seed(n * 1000 + c + hidden)
    h = _sprinkle(torch.randn(n, hidden, generator=g).to(dtype), klass if arg == "h" else "normal", n)
    w = _sprinkle((torch.randn(c, hidden, generator=g) / hidden ** 0.5).to(dtype), klass if arg == "w" else "normal", c)
    b = _sprinkle(torch.randn(c, generator=g).to(dtype), klass if arg == "b" else "normal", c + 1) if bias else None
    if arg == "b" and not bias:
        klass = "normal"
    kw = dict(ignore_index=ignore_index, label_smoothing=eps, reduction=reduction)
    args = [h, w] + ([b] if bias else [])

    def ours(h, w, *b):
        saved = (_fl_loss.CHUNK_BYTES, _fl_loss.forward_chunk_bytes, _fl_loss.GRAD_BLOCK_BYTES,
                 _fl_loss.MIN_BLOCK_COLS)
        if small_blocks:
            _fl_loss.CHUNK_BYTES, _fl_loss.GRAD_BLOCK_BYTES, _fl_loss.MIN_BLOCK_COLS = 3 * 37 * 8, 128, 8
            _fl_loss.forward_chunk_bytes = lambda weight, need_dw: _fl_loss.CHUNK_BYTES
        try:
            with fl.use_backend(backend):
                return fl.linear_cross_entropy(h, w, t, b[0] if b else None, **kw)
        finally:
            (_fl_loss.CHUNK_BYTES, _fl_loss.forward_chunk_bytes, _fl_loss.GRAD_BLOCK_BYTES,
             _fl_loss.MIN_BLOCK_COLS) = saved

    def torch_op(h, w, *b):  # the unfused composition on inputs of one dtype (16-bit: fp32 loss)
        z = F.linear(h, w, b[0] if b else None)
        return F.cross_entropy(z.float() if z.dtype == torch.bfloat16 else z, t, **kw).to(z.dtype)

    def leaves(dt):
        return [a.detach().to(dt).requires_grad_() for a in args]
    idx = list(range(len(args)))
    got = _loss_outputs(ours, leaves(dtype), idx)
    ref = _loss_outputs(torch_op, leaves(torch.float64), idx)
    eager = _loss_outputs(torch_op, leaves(dtype), idx)
    what = f"{backend} {dtype} {reduction}"
    for i, a, r, e in _check_loss(got, ref, eager, max(n, c, hidden), what, klass):
        if dtype == torch.bfloat16 and i > 0 and n < 8:
            continue  # a bf16 gradient of a handful of terms: see test_fuzz_linear_act
        if klass == "huge":
            continue  # huge logits: sums of huge terms, order-dependent rounding: the patterns are the check
        assert_matches(a, r, e, red=max(n, c, hidden), what=f"{what} output {i}")


# ----------------------------------------------------------------------------- the C++ small-call gates
# fastlayers._fastpath's small_linear / small_norm / small_cross_entropy / small_linear_ce take small
# CPU calls (no backend forced) in one C++ call. Differential: each must give exactly what the Python
# route it short-cuts gives (the same PyTorch ops: the same bits, NaN for NaN), forward and backward,
# or refuse (None) so that route runs -- including its errors, which must be the same exception.
def _same(a, b, what):
    assert type(a) is type(b), f"{what}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, tuple):
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{what}[{i}]")
        return
    if a is None:
        return
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _both_routes(monkeypatch, fn, switch, inputs):
    """(result or exception type, grads) of fn() with the C++ gate as built, then switched off."""
    out = []
    for off in (False, True):
        if off:
            switch()
        try:
            y = fn()
        except Exception as e:  # noqa: BLE001 - both routes must raise the same error
            out.append((type(e), str(e).split(":")[0], None))
            continue
        ys = y if isinstance(y, tuple) else (y,)
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        outs = [t for t in ys if t.requires_grad]
        grads = None
        if outs and leaves:
            g = [torch.ones_like(t) for t in outs]
            grads = tuple(torch.autograd.grad(outs, leaves, g, allow_unused=True))
        out.append((y, grads))
    return out


@pytest.mark.skipif(backend_skip_reason("cpp") is not None, reason="the cpp backend is not built here")
@given(st.data())
def test_fuzz_small_cpp_gates_equal_their_python_routes(data):
    from fastlayers import _dispatch
    from fastlayers.ops import cross_entropy as ce_mod, linear_cross_entropy as lce_mod, norms
    if _dispatch._FASTPATH is None:
        pytest.skip("fastlayers._fastpath is not built here (no torch at build time)")
    mp = pytest.MonkeyPatch()
    try:
        mp.delenv("FASTLAYERS_BACKEND", raising=False)
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
        klass = data.draw(st.sampled_from(["normal", "special", "nonfinite", "large"]))
        grad = data.draw(st.booleans())
        op = data.draw(st.sampled_from(["linear", "norm", "ce", "lce"]))
        m, k, n = (data.draw(st.sampled_from(SIZES)) for _ in range(3))
        if op == "linear":
            act = data.draw(st.sampled_from(NAMES))
            layer = fl.FusedLinear(max(k, 1), max(n, 1), bias=data.draw(st.booleans()), activation=act, dtype=dtype)
            kk = data.draw(st.sampled_from([max(k, 1), max(k, 1) + 1]))  # (a mismatched K: both raise)
            x = data.draw(laid_out(data.draw(values((m, kk), dtype, klass)))).requires_grad_(grad)
            inputs, fn = (x, layer.weight), lambda: layer(x)
            switch = lambda: mp.setattr(_dispatch, "_FAST_SMALL_LINEAR", None)  # noqa: E731
        elif op == "norm":
            kind = data.draw(st.sampled_from(["layer", "rms"]))
            d = max(n, 1)
            mod = fl.LayerNorm(d, dtype=dtype) if kind == "layer" else norms.TorchRMSNorm(d, eps=1e-6, dtype=dtype)
            x = data.draw(laid_out(data.draw(values((m, d), dtype, klass)))).requires_grad_(grad)
            rd = data.draw(st.sampled_from([d, d + 1]))
            r = data.draw(st.one_of(st.none(), values((m, rd), dtype, klass)))
            inputs = (x, mod.weight)
            fn = (lambda: mod(x)) if r is None else (lambda: mod(x, r))
            switch = lambda: mp.setattr(norms, "_FAST_SMALL_NORM", None)  # noqa: E731
        else:
            c = max(n, 1)
            t = torch.randint(-1, c + data.draw(st.sampled_from([0, 0, 0, 1])), (m,),
                              generator=torch.Generator().manual_seed(data.draw(st.integers(0, 1000))))
            red = data.draw(st.sampled_from(["mean", "sum", "none"]))
            eps = data.draw(st.sampled_from([0.0, 0.1]))
            if op == "ce":
                z = data.draw(laid_out(data.draw(values((m, c), dtype, klass)))).requires_grad_(grad)
                inputs, fn = (z,), lambda: fl.cross_entropy(z, t, -1, eps, red)
                switch = lambda: mp.setattr(ce_mod, "_FAST_SMALL_CE", None)  # noqa: E731
            else:
                h = data.draw(laid_out(data.draw(values((m, max(k, 1)), dtype, klass)))).requires_grad_(grad)
                w = data.draw(values((c, max(k, 1)), dtype, "normal")).requires_grad_(grad)
                inputs, fn = (h, w), lambda: fl.linear_cross_entropy(h, w, t, None, -1, eps, red)
                switch = lambda: mp.setattr(lce_mod, "_FAST_SMALL_LCE", None)  # noqa: E731
        (a, *ra), (b, *rb) = _both_routes(mp, fn, switch, inputs)
        if isinstance(a, type):
            assert isinstance(b, type) and a is b and ra[0] == rb[0], f"{op}: errors differ: {a} {ra} vs {b} {rb}"
            return
        assert not isinstance(b, type), f"{op}: the Python route raised {b.__name__}, the C++ gate did not"
        _same(a, b, f"{op} {dtype} {klass} grad={grad}")
        _same(ra[0], rb[0], f"{op} {dtype} {klass} grads")
    finally:
        mp.undo()


# ----------------------------------------------------------------------------- rotary
@st.composite
def rotary_case(draw):
    """(q, k, cos, sin, unsqueeze_dim, interleaved, dtype, threads): q (B, H, S, D) and k (B, HK, S, D)
    laid out in any memory order of their leading dims (HF's transposed (B, S, H, D) buffer, a
    contiguous (B, H, S, D), the batch innermost...) or sliced out of a wider buffer (not dense);
    cos / sin per batch or shared; full or partial rotary; NaN / inf sprinkled in."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    b, h, hk = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 5])), draw(st.sampled_from([1, 2, 3]))
    s = draw(st.sampled_from([1, 2, 7, 64, 65, 130]))
    d = draw(st.sampled_from([2, 8, 16, 34, 64, 96, 128]))
    r = draw(st.sampled_from(sorted({d, max(2, d // 2 // 2 * 2), 2})))
    il = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))

    def operand(heads):
        order = draw(st.permutations([0, 1, 2]))  # memory order of (B, H, S), outermost first
        sizes = [(b, heads, s)[i] for i in order]
        wide = draw(st.booleans())  # a slice of a buffer twice as wide in its innermost leading dim
        buf = torch.randn(*sizes[:2], sizes[2] * (2 if wide else 1), d, generator=g, dtype=torch.float64)
        if draw(st.booleans()) and buf.numel():  # NaN, +inf, -inf at random places
            buf.view(-1)[torch.randint(0, buf.numel(), (3,), generator=g)] = torch.tensor(
                [float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
        if wide:
            buf = buf[:, :, ::2]
        return buf.permute(*[order.index(i) for i in range(3)], 3).to(dtype)
    q, k = operand(h), operand(hk)
    pos = torch.arange(s, dtype=torch.float64)[:, None] + torch.arange(b, dtype=torch.float64)[:, None, None]
    f = pos * (1.0 / 10000 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    emb = f.repeat_interleave(2, -1) if il else torch.cat((f, f), -1)
    if draw(st.booleans()):
        emb = emb[:1].expand(b, s, r)  # one table for the whole batch (stride 0 over B)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    return q, k, cos, sin, 1, il, dtype, draw(st.sampled_from([1, 2, 3]))


@pytest.mark.skipif(backend_skip_reason("cpp") is not None, reason="the cpp backend is not built here")
@given(rotary_case())
def test_fuzz_rotary_cpp(case):
    """The C++ kernel over every visiting order and thread split (csrc/rotary.cpp row_order): values
    and gradients against eager and float64 (test_rotary.check); bf16 / fp16 bit for bit eager's
    (forward and backward)."""
    from test_rotary import check, eager, same_bits
    q, k, cos, sin, ud, il, dtype, threads = case
    _count("rotary", "cpp", dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fl.use_backend("cpp"):
            if dtype in (torch.float32, torch.float64):
                check(q, k, cos, sin, ud, il)
                return
            qs, ks = (t.detach().requires_grad_() for t in (q, k))
            oq, ok = fl.rotary(qs, ks, cos, sin, ud, il)
            gq, gk = torch.randn(oq.shape).to(dtype), torch.randn(ok.shape).to(dtype)
            torch.autograd.backward([oq, ok], [gq, gk])
        qe, ke = (t.detach().requires_grad_() for t in (q, k))
        eq, ek = eager(qe, ke, cos, sin, ud, il)
        torch.autograd.backward([eq, ek], [gq, gk])
        for what, o, e in (("q_embed", oq, eq), ("k_embed", ok, ek), ("dq", qs.grad, qe.grad),
                           ("dk", ks.grad, ke.grad)):
            assert same_bits(o.detach(), e.detach()), f"{what} {dtype} il={il} strides={q.stride()}"
    finally:
        torch.set_num_threads(old)


@st.composite
def attention_case(draw):
    """(q, k, v, causal, scale, threads): (B, H, L, D) / (B, H, S, D) operands in any memory order
    of their leading dims or sliced out of a wider buffer, L and S from 1 to 70 (L > S and L < S),
    head dims 1-64, the default or a given scale; fp32 / fp64 sometimes with NaN / +-inf in one
    operand."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    b, h = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 5]))
    L, S = draw(st.sampled_from([1, 2, 3, 5, 16, 17, 33, 70])), draw(st.sampled_from([1, 2, 3, 5, 16, 17, 33, 70]))
    d = draw(st.sampled_from([1, 2, 8, 16, 20, 33, 64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    nonfinite = dtype in (torch.float32, torch.float64) and draw(st.booleans())
    bad = draw(st.sampled_from([0, 1, 2])) if nonfinite else -1

    def operand(rows, i):
        order = draw(st.permutations([0, 1, 2]))  # memory order of (B, H, rows), outermost first
        sizes = [(b, h, rows)[j] for j in order]
        wide = draw(st.booleans())
        buf = torch.randn(*sizes[:2], sizes[2] * (2 if wide else 1), d, generator=g, dtype=torch.float64)
        if i == bad:
            buf.view(-1)[torch.randint(0, buf.numel(), (2,), generator=g)] = torch.tensor(
                [draw(st.sampled_from([float("nan"), float("inf"), -float("inf")])), float("nan")],
                dtype=torch.float64)
        if wide:
            buf = buf[:, :, ::2]
        return buf.permute(*[order.index(j) for j in range(3)], 3).to(dtype)
    q, k, v = operand(L, 0), operand(S, 1), operand(S, 2)
    scale = draw(st.sampled_from([None, 0.05, 1.0]))
    return q, k, v, draw(st.booleans()), scale, draw(st.sampled_from([1, 2, 3]))


@pytest.mark.skipif(backend_skip_reason("cpp") is not None, reason="the cpp backend is not built here")
@given(attention_case())
def test_fuzz_attention_cpp(case):
    """The C++ attention over layouts, lengths, head dims and thread counts: finite inputs against
    float64 PyTorch math and PyTorch's own error (test_attention.check); non-finite ones with PyTorch
    math's NaN / inf pattern in the output and every gradient."""
    from test_attention import MATH, check
    q, k, v, causal, scale, threads = case
    _count("attention", "cpp", q.dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fl.use_backend("cpp"):
            if all(torch.isfinite(t).all() for t in (q, k, v)):
                check(q, k, v, causal, scale)
                return
            ours = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = fl.scaled_dot_product_attention(*ours, is_causal=causal, scale=scale)
        theirs = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = MATH(*theirs, is_causal=causal, scale=scale)[0]
        gout = torch.randn(out.shape, dtype=torch.float64)
        out.backward(gout.to(out.dtype))
        ref.backward(gout)
        for what, a, r in [("out", out, ref)] + [(f"d{n}", x.grad, y.grad) for n, x, y in zip("qkv", ours, theirs)]:
            assert torch.equal(a.isnan(), r.isnan()), f"{what}: NaN pattern"
            torch.testing.assert_close(a.detach().double(), r.detach(), rtol=1e-4, atol=1e-4, equal_nan=True,
                                       msg=lambda m: f"{what}: {m}")
    finally:
        torch.set_num_threads(old)
