"""Every activation's value and derivative at the special values, through the public ops, against
PyTorch's own autograd: activation x dtype x backend x pre-activation z over a grid of NaN, +-inf,
+-0, the kinks (0, +-3, 6) and one ulp either side, +-finfo.max and values whose products overflow,
the smallest normal and subnormal numbers, the saturation points of exp / tanh / erf.

What counts as PyTorch's semantics: ATen's backward formula as written (its scalar code, which
PyTorch runs on tensors of fewer than two vectors, e.g. a user's reproducer). On long tensors
ATen's vectorised loop disagrees with its own formula at NaN for two activations (hardswish'(nan)
= NaN and relu6'(nan) = 0 there, dy in the formula), and its result then depends on the tensor's
length and on where the NaN sits in it; fastlayers follows the formula at every size. So the
PyTorch side here is always evaluated one z at a time (a 1- or 2-element tensor: the formula),
while fastlayers gets the whole grid in one call too (its vectorised paths, every lane).

Layouts (x (M, K) @ W^T, K = 2; z appears exactly):
  * reproducer: x = [[1, 0.5]], W = [[z, 0], [1, 2]], no bias: y = [[act(z), act(2)]], one z per
    call (the layout of the user report) for the special values of PER_CALL; y, dx, dW.
  * rows:  x = [[1, 0.5]], W[n] = [z_n, 0], bias 0: the whole grid in one call; y, dW, db per z.
  * cols:  x[m] = [z_m, 0.5], W = [[1, 0]]: the whole grid in one call; y, dx per z.
  * gated: gated_linear with the reproducer's x and W as the gate, u = 1: h, dx, dWg, dWu, dbg, dbu.
Compared: non-finite patterns (NaN, +inf, -inf positions) exactly; finite values within the
project's tolerances (fp64 1e-7; fp32 rtol 1.3e-6, atol 1e-5; bf16 / fp16: two ulps of the
dtype, rtol 2 eps, both sides computing in fp32 and rounding, atol 1e-6).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from fastlayers.activations import ACTIVATIONS, NAMES

from conftest import INTERPRETED, LOW_PRECISION_SKIP, _skip_reason

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

NAN, INF = math.nan, math.inf
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (activation, negative_slope): leaky_relu at its default, at 0 (y = -0 / NaN on z <= 0: saved-output
# mask) and negative (saves z), and one slope > 1.
CASES = [(a, 0.01) for a in NAMES if a != "leaky_relu"] + [("leaky_relu", s) for s in (0.01, 0.0, -0.3, 1.5)]
CASE_IDS = [a if a != "leaky_relu" else f"leaky_relu{s:g}" for a, s in CASES]


def grid(dtype: torch.dtype) -> list:
    fi = torch.finfo(dtype)

    def ulps(v):
        t = torch.tensor(v, dtype=dtype)
        return [torch.nextafter(t, torch.tensor(-INF, dtype=dtype)).item(), v,
                torch.nextafter(t, torch.tensor(INF, dtype=dtype)).item()]
    sub = torch.nextafter(torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype)).item()
    vals = [NAN, INF, -INF, 0.0, -0.0, fi.max, -fi.max, fi.max / 1.5, -fi.max / 1.5, fi.tiny, -fi.tiny,
            sub, -sub, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 5.0, 7.0, -4.0, 13.0, -13.0, 20.0, -20.0, 20.5,
            30.0, -30.0, 88.0, -88.0, 100.0, -100.0, 710.0, -710.0, 1e4, -1e4, 1e13, -1e13, 1e19, -1e19,
            1e20, -1e20, 1e38, -1e38, 1e200, -1e200]
    for k in (-3.0, 3.0, 6.0, 1.0):
        vals += ulps(k)
    out, seen = [], set()
    for v in vals:
        r = torch.tensor(v, dtype=torch.float64).to(dtype)
        if math.isinf(v) or not r.isinf():  # values beyond the dtype's range would round to inf
            key = (r.item(), math.copysign(1.0, r.item()) if not math.isnan(r.item()) else 0)
            if key not in seen or math.isnan(r.item()):
                seen.add(key)
                out.append(r.item())
    return out


def one_at_a_time(f, z: torch.Tensor, slope: float) -> torch.Tensor:
    """f(z, slope) applied to one element at a time (1-element tensors: ATen's formula, never its
    vectorised loop, which some kernels run from 2 elements on), with autograd through it."""
    flat = z.reshape(-1)
    return torch.cat([f(flat[i:i + 1], slope) for i in range(flat.numel())]).reshape(z.shape)


def _leaf(v, dtype):
    return torch.tensor(v, dtype=dtype).requires_grad_()


def _grads(out, ins, dy=None):
    out.backward(torch.ones_like(out) if dy is None else dy)
    return [out.detach()] + [None if t is None else t.grad for t in ins]


# ----------------------------------------------------------------------------- the computations
def _apply(op, act, slope, *args):
    """The op on leaf copies of args: fastlayers (op = "fl") or PyTorch's composition ("torch")."""
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    ref = functools.partial(one_at_a_time, ACTIVATIONS[act].ref)
    if op == "fl":
        y = fl.linear_act(leaves[0], leaves[1], leaves[2], act, slope)
    elif op == "torch":
        y = ref(F.linear(leaves[0], leaves[1], leaves[2]), slope)
    elif op == "fl_gated":
        y = fl.gated_linear(*leaves, activation=act, negative_slope=slope)
    else:  # torch_gated
        x, wg, wu, bg, bu = leaves
        y = ref(F.linear(x, wg, bg), slope) * F.linear(x, wu, bu)
    return _grads(y, leaves)


def _repro(z, dtype):
    return (torch.tensor([[1.0, 0.5]], dtype=dtype), torch.tensor([[z, 0.0], [1.0, 2.0]], dtype=dtype), None)


def _gated_args(z, dtype):
    x, wg, _ = _repro(z, dtype)
    wu = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=dtype)
    zero = torch.zeros(2, dtype=dtype)
    return x, wg, wu, zero.clone(), zero.clone()


def _rows(zs, dtype):
    return (torch.tensor([[1.0, 0.5]], dtype=dtype), torch.tensor([[z, 0.0] for z in zs], dtype=dtype),
            torch.zeros(len(zs), dtype=dtype))


def _cols(zs, dtype):
    return (torch.tensor([[z, 0.5] for z in zs], dtype=dtype), torch.tensor([[1.0, 0.0]], dtype=dtype), None)


@functools.lru_cache(maxsize=None)
def torch_side(act, slope, dtype, layout, compute=None):
    """PyTorch's results, one z per call (ATen's formula: see the module docstring), stacked as the
    batched layouts lay them out; for the per-z layouts, a list per z. compute: the dtype PyTorch
    runs in (float64 for the low-precision tolerance rule), on the grid of `dtype`."""
    zs = grid(dtype)
    cd = compute or dtype
    if layout in ("repro", "gated"):  # {index in the grid: results} for the values run one per call
        op, args = ("torch", _repro) if layout == "repro" else ("torch_gated", _gated_args)
        return {i: _apply(op, act, slope, *args(zs[i], cd)) for i in _repro_zs(None, dtype)}
    per = [_apply("torch", act, slope, *(_rows if layout == "rows" else _cols)([z], cd)) for z in zs]
    y = torch.cat([p[0] for p in per], 1 if layout == "rows" else 0)
    if layout == "rows":  # y (1, N), dW (N, 2), db (N,)
        return [y, None, torch.cat([p[2] for p in per]), torch.cat([p[3] for p in per])]
    return [y, torch.cat([p[1] for p in per]), None, None]  # y (M, 1), dx (M, 2)


# ----------------------------------------------------------------------------- comparison
def _cls(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t.isnan(), 1, torch.where(t == INF, 2, torch.where(t == -INF, 3, 0)))


def mismatches(got: torch.Tensor, want: torch.Tensor, want64: torch.Tensor = None) -> torch.Tensor:
    """Elementwise: a different non-finite class (NaN / +inf / -inf / finite) than PyTorch's result
    in the same dtype (`want`), or a finite value outside the tolerance: fp64 1e-7, fp32 rtol 1.3e-6 /
    atol 1e-5 against `want`; fp16 / bf16 (NOTES.md) at most twice PyTorch's own error against the
    float64 result `want64` from the same inputs, plus one ulp of the dtype (+1e-6)."""
    g, w = got.double(), want.double()
    bad = _cls(g) != _cls(w)
    fin = torch.isfinite(g) & torch.isfinite(w)
    if got.dtype in (torch.float64, torch.float32):
        rtol, atol = (1e-7, 1e-7) if got.dtype == torch.float64 else (1.3e-6, 1e-5)
        return bad | (fin & ((g - w).abs() > atol + rtol * w.abs()))
    r = want64.double()
    fin &= torch.isfinite(r)
    slack = 2 * (w - r).abs() + torch.finfo(got.dtype).eps * r.abs() + 1e-6
    return bad | (fin & ((g - r).abs() > slack))


def check(what, got, want, zs, per_z_dim=None, want64=None, alt=None):
    """alt: another accepted result (elementwise), where a fastlayers path runs ATen's own kernel."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.shape, want.shape)
    bad = mismatches(got, want, want64)
    if alt is not None:
        bad &= mismatches(got, alt, alt.double())
    if bad.any():
        idx = bad.nonzero().tolist()[:8]
        rows = [f"  {tuple(i)}: got {got[tuple(i)].item()!r}, torch {want[tuple(i)].item()!r}"
                + (f" (z = {zs[i[per_z_dim]]!r})" if per_z_dim is not None else "") for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} element(s) differ\n" + "\n".join(rows))


def _low(dtype):
    return dtype in (torch.float16, torch.bfloat16)


def _backend_or_skip(backend, dtype):
    why = _skip_reason(backend)
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot run here: {why}")
    if INTERPRETED and backend == "triton" and dtype in (torch.float16, torch.bfloat16):
        pytest.skip(LOW_PRECISION_SKIP)


BACKENDS = ["cpp", "reference", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,slope", CASES, ids=CASE_IDS)
def test_grid_batched(act, slope, dtype, backend):
    """The whole grid in one call (rows: y, dW, db per z; cols: y, dx per z)."""
    _backend_or_skip(backend, dtype)
    zs = grid(dtype)
    tag = f"{backend} {act}({slope:g}) {dtype}"
    with fl.use_backend(backend):
        rows = _apply("fl", act, slope, *_rows(zs, dtype))
        cols = _apply("fl", act, slope, *_cols(zs, dtype))
    want_rows, want_cols = torch_side(act, slope, dtype, "rows"), torch_side(act, slope, dtype, "cols")
    r64 = torch_side(act, slope, dtype, "rows", torch.float64) if _low(dtype) else [None] * 4
    c64 = torch_side(act, slope, dtype, "cols", torch.float64) if _low(dtype) else [None] * 4
    # The cpp backend runs bf16 GELU's forward through ATen's own kernel where that pass has nothing
    # to fuse (backends/cpu/activation.py _ATEN_PASS: measured 2x faster than ours): on a long tensor that is
    # ATen's vectorised loop, whose gelu(+inf) = NaN and gelu(z >= ~1.7e38) = inf (the formula: z).
    alts = {"rows y": aten_alt(backend, act, dtype, *_rows(zs, dtype)),
            "cols y": aten_alt(backend, act, dtype, *_cols(zs, dtype))}
    failures = []
    for what, got, want, d, w64 in [("rows y", rows[0], want_rows[0], 1, r64[0]),
                                    ("rows dW", rows[2], want_rows[2], 0, r64[2]),
                                    ("rows db", rows[3], want_rows[3], 0, r64[3]),
                                    ("cols y", cols[0], want_cols[0], 0, c64[0]),
                                    ("cols dx", cols[1], want_cols[1], 0, c64[1])]:
        try:
            check(f"{tag} {what}", got, want, zs, d, w64, alts.get(what))
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


# One z per call (~0.1 ms on cpp, plus PyTorch's side): the values of the user report, the kinks
# and the saturation points; the batched layouts above cover the whole grid.
PER_CALL = [NAN, INF, -INF, 0.0, -0.0, 3.0, -3.0, 6.0, "max", "-max", "max/1.5", "-max/1.5", 1e20, -1e20,
            "sub", 20.5, -20.0, -100.0, 1e13]


# The interpreted Triton backend (~20 ms a call): the values of the user report and the kinks.
PER_CALL_INTERPRETED = [NAN, INF, -INF, 0.0, 3.0, -3.0, 6.0, "max", "-max"]


def _repro_zs(backend, dtype):
    """Indices in grid(dtype) of the values run one per call on `backend` (None: every backend's)."""
    zs = grid(dtype)
    per_call = PER_CALL_INTERPRETED if backend == "triton" and INTERPRETED else PER_CALL
    fi = torch.finfo(dtype)
    named = {"max": fi.max, "-max": -fi.max, "max/1.5": fi.max / 1.5, "-max/1.5": -fi.max / 1.5,
             "sub": torch.nextafter(torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype)).item()}
    want = [torch.tensor(named.get(v, v) if isinstance(v, str) else v, dtype=torch.float64).to(dtype).item()
            for v in per_call]
    return [i for i, z in enumerate(zs)
            if any((z == w and math.copysign(1, z) == math.copysign(1, w)) or (math.isnan(z) and math.isnan(w))
                   for w in want)]


def aten_alt(backend, act, dtype, x, w, b):
    """What the cpp backend may return instead of the formula: it runs bf16 GELU's forward through
    ATen's own kernel where that pass has nothing to fuse (backends/cpu/activation.py _ATEN_PASS: measured twice
    as fast as ours), and on two elements or more that is ATen's vectorised loop, whose gelu(+inf) =
    NaN and gelu(z >= ~1.7e38) = inf (the formula: inf and z). The same holds in every dtype for tiny
    calls (fewer than cpu/gemm.py TORCH_OPS_MAX_OUT outputs), which are PyTorch's own F.linear + activation,
    with or without grad (the no-grad gate's ops: both give eager's bits). PyTorch's own answer for
    the same call."""
    if backend == "cpp" and act == "gelu":
        return F.gelu(F.linear(x, w, b))
    return None


# The layouts run one z per call: (fastlayers' op, its arguments, the names of its results).
PER_CALL_LAYOUTS = {"repro": ("fl", _repro, ("y", "dx", "dW")),
                    "gated": ("fl_gated", _gated_args, ("h", "dx", "dWg", "dWu", "dbg", "dbu"))}


@pytest.mark.parametrize("layout", list(PER_CALL_LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,slope", CASES, ids=CASE_IDS)
def test_grid_per_call(act, slope, dtype, backend, layout):
    """One z per call: the user report's layout (repro: y, dx, dW) and gated_linear with it as the
    gate (gated: its backward uses the same act' code; h, dx, dWg, dWu, dbg, dbu)."""
    _backend_or_skip(backend, dtype)
    op, args, names = PER_CALL_LAYOUTS[layout]
    zs = grid(dtype)
    want = torch_side(act, slope, dtype, layout)
    want64 = torch_side(act, slope, dtype, layout, torch.float64) if _low(dtype) else None
    failures = []
    for i in _repro_zs(backend, dtype):
        with fl.use_backend(backend):
            got = _apply(op, act, slope, *args(zs[i], dtype))
        for j, (name, g, w) in enumerate(zip(names, got, want[i])):
            try:
                check(f"{backend} {act}({slope:g}) {dtype} z={zs[i]!r} {name}", g, w, zs,
                      want64=None if want64 is None else want64[i][j],
                      alt=aten_alt(backend, act, dtype, *_repro(zs[i], dtype)) if name == "y" else None)
            except AssertionError as e:
                failures.append(str(e))
    assert not failures, "\n".join(failures)


def test_user_report():
    """The three reports, spelled out (fp32, cpp and triton): relu6'(nan) and hardswish'(nan) pass the
    gradient as PyTorch's formula does; quick_gelu' at +-3.4e38 is finite."""
    x = torch.tensor([[1.0, 0.5]])
    for backend in ("cpp", "triton"):
        if _skip_reason(backend) is not None:
            continue
        for act, z in (("relu6", NAN), ("hardswish", NAN), ("quick_gelu", 3.4e38), ("quick_gelu", -3.4e38)):
            w = torch.tensor([[z, 0.0], [1.0, 2.0]])
            with fl.use_backend(backend):
                got = _apply("fl", act, 0.01, x, w, None)
            want = _apply("torch", act, 0.01, x, w, None)
            for name, g, r in zip(("y", "dx", "dW"), got, want):
                assert not mismatches(g, r).any(), (backend, act, z, name, g, r)
            if act != "quick_gelu":
                assert got[2][0].tolist() == [1.0, 0.5], (backend, act, got[2])  # dW row: dy * x
            else:
                assert torch.isfinite(got[2]).all(), (backend, act, got[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
def test_gated_saved_output_rounds_like_pytorch(act, dtype, backend):
    """gated_linear's act' from the output uses the output rounded to fp16 / bf16, as PyTorch's
    composition saves it: where tanh(g) / sigmoid(g) rounds to 1, act' = 0 and an infinite upstream
    gradient gives NaN (inf * 0), as in PyTorch (found by the fuzz: inf, from the fp32 output)."""
    _backend_or_skip(backend, dtype)
    x = torch.tensor([[1.0, 0.5]], dtype=dtype)
    wg = torch.tensor([[9.0, 0.0], [1.0, 2.0]], dtype=dtype)
    wu = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=dtype)
    dh = torch.tensor([[INF, 1.0]], dtype=dtype)
    with fl.use_backend(backend):
        leaves = [t.clone().requires_grad_() for t in (x, wg, wu)]
        got = _grads(fl.gated_linear(*leaves, activation=act), leaves, dh)
    leaves_r = [t.clone().requires_grad_() for t in (x, wg, wu)]
    want = _grads(ACTIVATIONS[act].ref(F.linear(leaves_r[0], leaves_r[1]), 0.01) * F.linear(leaves_r[0], leaves_r[2]),
                  leaves_r, dh)
    for name, g, w in zip(("h", "dx", "dWg", "dWu"), got, want):
        assert torch.equal(_cls(g.double()), _cls(w.double())), (backend, act, name, g, w)
