"""fl.gated_linear (act(x Wg^T + bg) * (x Wu^T + bu)) and fl.FusedGatedMLP against PyTorch.

The `backend` fixture (conftest.py) runs the op tests on cpp and reference; the Triton backend
runs a smaller set through its interpreter (TRITON_INTERPRET=1, set by conftest.py) at the end.
Tolerances: conftest.assert_matches (fp64 1e-7; fp32 with GEMM-scaled atol; bf16 / fp16 within
2x PyTorch's own error against float64).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlayers as fl
from fastlayers.activations import ACTIVATIONS, NAMES
from fastlayers.backends import load

from conftest import FLOAT_DTYPES, assert_close_fp32, assert_matches, skip_low_precision
from integration_helpers import hf_causal_lm

SLOPE = 0.01
# (bf16 / fp16 cases skip on the interpreted Triton backend: conftest's LOW_PRECISION_SKIP)
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def eager(x, wg, wu, bg, bu, act, slope=SLOPE):
    g = F.linear(x, wg, bg)
    return (g if act == "none" else ACTIVATIONS[act].ref(g, slope)) * F.linear(x, wu, bu)


def leaf(t):
    return None if t is None else t.detach().requires_grad_(True)


def check(x, wg, wu, bg, bu, act, dh, slope=SLOPE):
    """fl.gated_linear forward + backward vs PyTorch in float64 and in x's dtype; inputs unchanged."""
    ins = (x, wg, wu, bg, bu)
    before = [None if t is None else t.detach().clone() for t in ins + (dh,)]
    h = fl.gated_linear(x, wg, wu, bg, bu, act, slope)
    h.backward(dh)
    for t, t0 in zip(ins + (dh,), before):
        if t is not None:
            assert torch.equal(t.detach().isnan(), t0.isnan())
            assert torch.equal(torch.nan_to_num(t.detach()), torch.nan_to_num(t0)), "an input was modified"
    got = [h] + [t.grad for t in ins if t is not None]

    def ref(dtype):
        ts = [None if t is None else leaf(t.to(dtype)) for t in before[:5]]
        hr = eager(*ts, act, slope)
        hr.backward(before[5].to(dtype))
        return [hr] + [t.grad for t in ts if t is not None]

    r64, rlow = ref(torch.float64), ref(x.dtype)
    m = x.numel() // max(x.shape[-1], 1)
    k, n = wg.shape[1], wg.shape[0]
    names = ["h", "dx", "dWg", "dWu"] + (["dbg"] if bg is not None else []) + (["dbu"] if bu is not None else [])
    reds = {"h": k, "dx": 2 * n, "dWg": m, "dWu": m, "dbg": m, "dbu": m}
    for name, o, r, e in zip(names, got, r64, rlow):
        assert_matches(o.detach(), r, e, red=reds[name], what=f"{act} {x.dtype} {name}")


def make(lead, k, n, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, dtype=dtype, generator=g)
    wg = torch.randn(n, k, dtype=dtype, generator=g) / max(k, 1) ** 0.5
    wu = torch.randn(n, k, dtype=dtype, generator=g) / max(k, 1) ** 0.5
    bg = torch.randn(n, dtype=dtype, generator=g) if bias else None
    bu = torch.randn(n, dtype=dtype, generator=g) if bias else None
    dh = torch.randn(*lead, n, dtype=dtype, generator=g)
    return [leaf(t) for t in (x, wg, wu, bg, bu)] + [dh]


SHAPES = [  # (leading dims of x, in_features, intermediate)
    ((1,), 1, 1),
    ((3,), 7, 5),
    ((33,), 65, 17),
    ((2, 3), 9, 6),    # 3-D x
    ((0,), 7, 5),      # zero-size batch
    ((), 5, 4),        # 1-D x
]


# bf16 runs the shapes with enough values for its rule ("max error <= 2x PyTorch's own") to mean
# something, plus a larger one: on a few values it is a coin toss between two roundings (eager
# rounds act(g) before the product and each GEMM of dx = dg Wg + du Wu before their sum; we round
# once fewer), not a measure of accuracy.
CASES = ([(dt, *shape) for dt in (torch.float32, torch.float64) for shape in SHAPES]
         + [(torch.bfloat16, *shape) for shape in (((33,), 65, 17), ((8, 16), 96, 80), ((0,), 7, 5))])


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype,lead,k,n", CASES, ids=str)
def test_matches_torch(backend, act, dtype, lead, k, n):
    x, wg, wu, bg, bu, dh = make(lead, k, n, dtype, bias=True)
    check(x, wg, wu, bg, bu, act, dh)


@pytest.mark.parametrize("dtype,lead,k,n", [
    (dt, *shape) for dt in FLOAT_DTYPES
    for shape in (((127,), 131, 257), ((4, 0), 6, 3), ((5,), 0, 3), ((5,), 4, 0), ((1,), 1, 1))
    if not (dt == torch.bfloat16 and shape[1] == 1)], ids=str)  # bf16: see CASES
@pytest.mark.parametrize("bias", ["both", "gate", "up", "none"])
def test_shapes_and_biases(backend, dtype, lead, k, n, bias):
    """Primes past the vector widths, 0-size dims (K = 0: h = act(bg) * bu), each bias alone."""
    x, wg, wu, bg, bu, dh = make(lead, k, n, dtype, bias=True, seed=1)
    bg = bg if bias in ("both", "gate") else None
    bu = bu if bias in ("both", "up") else None
    check(x, wg, wu, bg, bu, "silu", dh)


@pytest.mark.parametrize("act", ["silu", "gelu", "relu", "sigmoid"])
@pytest.mark.parametrize("layout", ["x_transposed", "x_sliced", "w_transposed", "w_sliced", "grad_transposed",
                                    "grad_expanded", "x_3d_permuted", "bias_strided"])
def test_non_contiguous(backend, act, layout):
    torch.manual_seed(1)
    m, k, n, dt = 19, 23, 11, torch.float32
    x, wg, wu = torch.randn(m, k), torch.randn(n, k) / k ** 0.5, torch.randn(n, k) / k ** 0.5
    bg, bu, dh = torch.randn(n), torch.randn(n), torch.randn(m, n)
    if layout == "x_transposed":
        x = torch.randn(k, m).t()
    elif layout == "x_sliced":
        x = torch.randn(m, 2 * k)[:, ::2]
    elif layout == "w_transposed":
        wg, wu = torch.randn(k, n, dtype=dt).t(), torch.randn(k, n, dtype=dt).t()
    elif layout == "w_sliced":
        both = torch.randn(2 * n, k) / k ** 0.5
        wg, wu = both[::2], both[1::2]
    elif layout == "grad_transposed":
        dh = torch.randn(n, m).t()
    elif layout == "grad_expanded":
        dh = torch.randn(1, n).expand(m, n)
    elif layout == "x_3d_permuted":
        x = torch.randn(k, 4, 5).permute(1, 2, 0)
        dh = torch.randn(4, 5, n)
    elif layout == "bias_strided":
        bg, bu = torch.randn(2 * n)[::2], torch.randn(n, 2)[:, 1]
    check(leaf(x), leaf(wg), leaf(wu), leaf(bg), leaf(bu), act, dh)


@pytest.mark.parametrize("slope", [0.0, 0.2, -0.3])
def test_leaky_relu_slopes(backend, slope):
    x, wg, wu, bg, bu, dh = make((9,), 8, 7, torch.float32)
    check(x, wg, wu, bg, bu, "leaky_relu", dh, slope=slope)


SPECIAL = [0.0, -0.0, 1e20, -1e20, 88.0, -88.0, float("nan"), 1.0, -1.0, 13.0, -13.0, 3.0, -3.0, 6.0,
           1e-30, float("inf"), float("-inf")]


def _close_to_either(out, a, b, what):
    """Elementwise: out equals PyTorch's result a (same dtype) or the float64 result b rounded to
    out's dtype, within rtol 1.3e-6 / atol 1e-30, or is at least as close to b as a is (NaN only
    where a or b is NaN). PyTorch's fp32 GELU loses ~1e-4 relative in its tail (gelu(-3))."""
    exact = b.double()
    b = b.to(out.dtype)
    ok = torch.isclose(out, a, rtol=1.3e-6, atol=1e-30, equal_nan=True)
    ok |= torch.isclose(out, b, rtol=1.3e-6, atol=1e-30, equal_nan=True)
    ok |= (out.double() - exact).abs() <= (a.double() - exact).abs()  # at least as close as PyTorch
    bad = torch.nonzero(~ok).flatten().tolist()
    assert not bad, f"{what}: " + "; ".join(f"[{i}] {out[i].item()} vs torch {a[i].item()} / exact {b[i].item()}"
                                            for i in bad[:5])


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_special_values(backend, act, dtype):
    """h = act(z) * v and its gradients with z, v special (identity 1x1 weights, 64 rows so
    PyTorch's activation kernels run vectorised): PyTorch's values (or the exact ones), NaN where
    PyTorch has NaN, the same signs of zero; with an infinite input, PyTorch's value or the
    limit act(+-inf) * v. dh = 1."""
    z = torch.tensor((SPECIAL * 4)[:64], dtype=dtype)
    v = torch.tensor((SPECIAL[5:] + SPECIAL[:5]) * 4, dtype=dtype)[:64]
    x = torch.stack([z, v], 1)  # (64, 2): g = z, u = v
    wg = torch.tensor([[1.0, 0.0]], dtype=dtype)
    wu = torch.tensor([[0.0, 1.0]], dtype=dtype)
    xs, xr, x64 = leaf(x), leaf(x), leaf(x.double())
    h = fl.gated_linear(xs, wg, wu, None, None, act, SLOPE)
    h.backward(torch.ones_like(h))
    hr = eager(xr, wg, wu, None, None, act)
    hr.backward(torch.ones_like(hr))
    h64 = eager(x64, wg.double(), wu.double(), None, None, act)
    h64.backward(torch.ones_like(h64))
    finite = torch.isfinite(x).all(1)
    _close_to_either(h[finite, 0], hr[finite, 0], h64[finite, 0], f"{act} h")
    for j in range(2):
        _close_to_either(xs.grad[finite, j], xr.grad[finite, j], x64.grad[finite, j], f"{act} dx[:, {j}]")
    zero = (hr == 0) & finite[:, None]
    assert torch.equal(torch.signbit(h[zero]), torch.signbit(hr[zero])), "sign of zero differs"
    # with an infinity: PyTorch's value, or the limit (both NaN-free where PyTorch is)
    for i in torch.nonzero(~finite).flatten().tolist():
        a, b = h[i, 0].item(), hr[i, 0].item()
        assert a == b or (math.isnan(b)) or (math.isnan(a) and math.isnan(b)) or math.isinf(a) == math.isinf(b), \
            (act, x[i].tolist(), a, b)


def off_kinks(g: torch.Tensor) -> bool:
    kinks = torch.tensor([0.0, 3.0, -3.0, 6.0], dtype=g.dtype)
    return bool(((g.unsqueeze(-1) - kinks).abs() > 2e-2).all())


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(backend, act, bias):
    gen = torch.Generator().manual_seed(0)
    while True:  # pre-activations away from the kinks of relu, hardswish, relu6 ...
        x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen) * 2
        wg = torch.randn(4, 5, dtype=torch.float64, generator=gen)
        wu = torch.randn(4, 5, dtype=torch.float64, generator=gen)
        bg = torch.randn(4, dtype=torch.float64, generator=gen) if bias else None
        bu = torch.randn(4, dtype=torch.float64, generator=gen) if bias else None
        if off_kinks(F.linear(x, wg, bg)):
            break
    args = [t.requires_grad_() for t in (x, wg, wu, bg, bu) if t is not None]
    if bias:
        fn = lambda x, wg, wu, bg, bu: fl.gated_linear(x, wg, wu, bg, bu, act)  # noqa: E731
    else:
        fn = lambda x, wg, wu: fl.gated_linear(x, wg, wu, None, None, act)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("act", ["silu", "gelu", "sigmoid", "leaky_relu"])
def test_double_backward(backend, act):
    """create_graph=True: exact higher-order gradients (fp64 gradgradcheck)."""
    x, wg, wu, bg, bu, _ = make((3,), 4, 2, torch.float64, seed=6)
    assert torch.autograd.gradgradcheck(lambda *a: fl.gated_linear(*a, activation=act), (x, wg, wu, bg, bu))


@pytest.mark.parametrize("needs", [(1, 0, 0, 0, 0), (0, 1, 0, 0, 0), (0, 0, 1, 0, 0), (0, 0, 0, 1, 0),
                                   (0, 0, 0, 0, 1), (1, 1, 1, 1, 1), (0, 1, 1, 0, 0)])
def test_only_requested_grads(backend, needs):
    torch.manual_seed(3)
    ts = [torch.randn(5, 4), torch.randn(3, 4), torch.randn(3, 4), torch.randn(3), torch.randn(3)]
    for t, r in zip(ts, needs):
        t.requires_grad_(bool(r))
    h = fl.gated_linear(*ts, activation="gelu")
    h.sum().backward()
    for t, r in zip(ts, needs):
        assert (t.grad is not None) == bool(r)
    torch.testing.assert_close(h, eager(*ts, "gelu"))


def test_no_grad_and_inference(backend):
    x, wg, wu, bg, bu, _ = make((6,), 5, 4, torch.float32)
    with torch.no_grad():
        h = fl.gated_linear(x, wg, wu, bg, bu)
    assert not h.requires_grad
    torch.testing.assert_close(h, eager(x, wg, wu, bg, bu, "silu").detach())
    with torch.inference_mode():
        h = fl.gated_linear(x, wg, wu, bg, bu, "gelu_tanh")
    torch.testing.assert_close(h, eager(x, wg, wu, bg, bu, "gelu_tanh").detach())


def test_threads_agree_and_bias_grads_deterministic(backend):
    """Enough rows for the OpenMP split; 1 thread and all threads agree (bias grads: fixed order)."""
    x, wg, wu, bg, bu, dh = make((300,), 48, 100, torch.float32, seed=5)
    n = torch.get_num_threads()
    outs = []
    for t in (1, n, n):
        torch.set_num_threads(t)
        try:
            ins = [leaf(a) for a in (x, wg, wu, bg, bu)]
            h = fl.gated_linear(*ins)
            h.backward(dh)
            outs.append([h.detach()] + [a.grad for a in ins])
        finally:
            torch.set_num_threads(n)
    for a, b in zip(outs[1], outs[2]):
        assert torch.equal(a, b)  # same thread count: bit-identical
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_output_can_be_modified_in_place(backend):
    x, wg, wu, bg, bu, _ = make((2, 3), 4, 4, torch.float32)
    h = fl.gated_linear(x, wg, wu, bg, bu)
    h += x  # like any op's output
    h.sum().backward()
    xr, wgr, wur, bgr, bur = (leaf(t) for t in (x, wg, wu, bg, bu))
    (eager(xr, wgr, wur, bgr, bur, "silu") + xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(wg.grad, wgr.grad)


def test_saved_input_modified_in_place_raises(backend):
    x, wg, wu, _, _, _ = make((3,), 4, 2, torch.float32)
    xi = x * 1
    h = fl.gated_linear(xi, wg, wu)
    xi.mul_(2)  # x is saved for dWg, dWu
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpp_16bit_epilogue_rounds_as_eager(dtype):
    """fp16 / bf16: h = rnd(rnd(act(g)) * u) and du = rnd(dh * rnd(act(g))), the roundings of eager's
    act(gate) * up and its autograd (found by the fuzzer: at x = -0.2793, Wg = 0.3926, Wu = 0.6602
    the once-rounded product was one bf16 ulp off eager's, twice its error). act(g) itself is the
    cpp backend's own activation code (its GELU tail is more accurate than ATen's bf16 one)."""
    from fastlayers.ops.activation import activation
    g = torch.Generator().manual_seed(0)
    cases = [tuple(torch.tensor([[v]], dtype=dtype) for v in (-0.2793, 0.3926, 0.6602))]
    cases.append((torch.randn(37, 24, generator=g).to(dtype), torch.randn(19, 24, generator=g).to(dtype),
                  torch.randn(19, 24, generator=g).to(dtype)))
    for x, wg, wu in cases:
        gate, up = F.linear(x, wg), F.linear(x, wu)
        k = gate.shape[1]
        eye, zero = torch.eye(k, dtype=dtype), torch.zeros(k, k, dtype=dtype)
        for act in ("gelu", "silu", "gelu_tanh", "sigmoid"):
            with fl.use_backend("cpp"):
                # rnd(act(g)) by the same activation code (in fp32, as the 16-bit epilogue computes it;
                # the 16-bit activation op itself runs ATen's kernel for bf16 GELU)
                a = activation(gate.float(), act).to(dtype)
                # the epilogue on exactly these g and u: x = [gate | up], Wg = [I 0], Wu = [0 I]
                ul = up.detach().requires_grad_()
                h = fl.gated_linear(torch.cat([gate, ul], 1), torch.cat([eye, zero], 1), torch.cat([zero, eye], 1),
                                    activation=act)
            assert torch.equal(h.detach(), a * up), act
            dh = torch.randn(h.shape, generator=g).to(dtype)
            h.backward(dh)
            assert torch.equal(ul.grad, dh * a), act  # du through the identity GEMM: exact


@pytest.mark.parametrize("act", ["silu", "gelu", "relu6"])
def test_float16(backend, act):
    skip_low_precision(backend)
    x, wg, wu, bg, bu, dh = make((33,), 65, 17, torch.float16, seed=7)
    check(x, wg, wu, bg, bu, act, dh)


@pytest.mark.parametrize("act", ["silu", "relu", "gelu", "leaky_relu", "relu6", "none"])
@pytest.mark.parametrize("dtype,lead,k,n", [(torch.float32, (2, 9), 33, 17), (torch.float64, (5,), 8, 3),
                                            (torch.bfloat16, (8, 16), 96, 80)], ids=str)
@pytest.mark.parametrize("bias", ["both", "gate", "none"])
def test_stacked_weights(backend, act, dtype, lead, k, n, bias):
    """w_up right after w_gate in memory: the cpp backend runs one GEMM on [Wg; Wu] each way
    (and writes [dg | du] in one buffer); results equal the general path's."""
    x, _, _, bg, bu, dh = make(lead, k, n, dtype, seed=11)
    both = torch.randn(2 * n, k, dtype=dtype, generator=torch.Generator().manual_seed(12)) / k ** 0.5
    wg, wu = nn.Parameter(both[:n]), nn.Parameter(both[n:])
    if backend == "cpp":
        from fastlayers.backends.cpu.gated import _stacked
        assert _stacked(wg, wu) is not None
    bg = bg if bias in ("both", "gate") else None
    bu = bu if bias == "both" else None
    check(x, wg, wu, bg, bu, act, dh)


@pytest.mark.parametrize("needs", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 1, 1)])
def test_stacked_weights_partial_grads_and_accumulation(backend, needs):
    torch.manual_seed(13)
    both = torch.randn(2 * 6, 5, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=bool(needs[0]))
    wg, wu = nn.Parameter(both[:6], requires_grad=bool(needs[1])), nn.Parameter(both[6:], requires_grad=bool(needs[2]))
    base = [x, wg, wu]
    req = [i for i, r in enumerate(needs) if r]

    def f(*a):
        args = list(base)
        for i, t in zip(req, a):
            args[i] = t
        return fl.gated_linear(*args, activation="gelu")
    assert torch.autograd.gradcheck(f, [base[i] for i in req])
    for _ in range(2):  # .grad accumulates over two backward calls (the grads may share one buffer)
        fl.gated_linear(x, wg, wu, activation="gelu").sum().backward()
    xr, wgr, wur = (t.detach().requires_grad_(t.requires_grad) for t in (x, wg, wu))
    for _ in range(2):
        eager(xr, wgr, wur, None, None, "gelu").sum().backward()
    for a, b in zip((x, wg, wu), (xr, wgr, wur)):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------- bad input
def _ok(**over):
    d = dict(x=torch.randn(3, 4), w_gate=torch.randn(5, 4), w_up=torch.randn(5, 4), b_gate=torch.randn(5),
             b_up=torch.randn(5))
    d.update(over)
    return d


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(x=[[1.0]]), TypeError, "expected x to be a torch.Tensor"),
    (dict(w_up="w"), TypeError, "expected w_up to be a torch.Tensor"),
    (dict(x=torch.ones(3, 4, dtype=torch.int64)), TypeError, "expected x to be a floating-point tensor"),
    (dict(b_gate=torch.ones(5, dtype=torch.int32)), TypeError, "expected b_gate to be a floating-point"),
    (dict(w_gate=torch.randn(5, 4, dtype=torch.float64)), TypeError, "expected w_gate to have the same dtype"),
    (dict(b_up=torch.randn(5, dtype=torch.float64)), TypeError, "expected b_up to have the same dtype"),
    (dict(w_gate=torch.randn(5, 4, 1)), ValueError, "expected w_gate of shape"),
    (dict(w_up=torch.randn(6, 4)), ValueError, "expected w_up to have w_gate's shape"),
    (dict(x=torch.randn(3, 7)), ValueError, "x has 7 features"),
    (dict(x=torch.tensor(1.0)), ValueError, "0-d tensor"),
    (dict(b_gate=torch.randn(4)), ValueError, r"expected b_gate of shape \(5,\)"),
    (dict(b_up=torch.randn(5, 1)), ValueError, r"expected b_up of shape \(5,\)"),
    (dict(w_up=torch.randn(5, 4, device="meta")), RuntimeError, "expected w_up on the same device"),
    (dict(x=torch.randn(3, 4).to_sparse()), TypeError, "expected x to be a dense"),
])
def test_bad_input(over, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        fl.gated_linear(**_ok(**over))
    assert "fastlayers.gated_linear" in str(info.value)


def test_bad_activation_and_slope():
    with pytest.raises(ValueError, match="fastlayers.gated_linear: unknown activation 'swish'"):
        fl.gated_linear(**_ok(), activation="swish")
    with pytest.raises(TypeError, match="fastlayers.gated_linear: expected negative_slope to be a real"):
        fl.gated_linear(**_ok(), activation="leaky_relu", negative_slope="0.1")


def test_cpp_entry_points_check_their_arguments():
    """The C++ side refuses buffers it cannot work on (never reads out of bounds)."""
    C = pytest.importorskip("fastlayers._C")
    from fastlayers.backends.cpu._ext import _buf
    g, u, h, b = torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(4)
    with pytest.raises(ValueError, match="gated_forward: argument 'u' has shape"):
        C.gated_forward(_buf(g), None, _buf(torch.zeros(2, 3)), None, _buf(h), 5, 0.0, False, 1)
    with pytest.raises(ValueError, match="gated_forward: argument 'bg' has shape"):
        C.gated_forward(_buf(g), _buf(torch.zeros(3)), _buf(u), None, _buf(h), 5, 0.0, False, 1)
    with pytest.raises(ValueError, match="gated_forward: argument 'h' has dtype code"):
        C.gated_forward(_buf(g), None, _buf(u), None, _buf(h.double()), 5, 0.0, False, 1)
    with pytest.raises(ValueError, match="gated_forward: argument 'u' is not contiguous"):
        C.gated_forward(_buf(g), None, _buf(torch.zeros(4, 2).t()), None, _buf(h), 5, 0.0, False, 1)
    with pytest.raises(ValueError, match="keep=True needs 'h' apart from 'g'"):
        C.gated_forward(_buf(g), _buf(b), _buf(u), None, _buf(g), 5, 0.0, True, 1)
    with pytest.raises(ValueError, match="gated_backward: unknown activation code 99"):
        C.gated_backward(_buf(h), _buf(g), _buf(u), _buf(g.clone()), _buf(u.clone()), None, None, 99, 0.0,
                         False, 1)
    null = (0, 0, (2, 4), (4, 1))
    with pytest.raises(ValueError, match="gated_backward: argument 'dg' is a null pointer"):
        C.gated_backward(_buf(h), _buf(g), _buf(u), null, _buf(u.clone()), None, None, 5, 0.0, False, 1)


def test_meta_tensors():
    """Model init on the meta device: shapes and dtypes only (reference backend)."""
    x, wg, wu = (torch.empty(s, device="meta") for s in ((2, 3, 4), (5, 4), (5, 4)))
    h = fl.gated_linear(x, wg, wu)
    assert h.shape == (2, 3, 5) and h.device.type == "meta"


# ----------------------------------------------------------------------------- autocast, compile
def test_autocast_matches_torch(backend):
    skip_low_precision(backend)
    x, wg, wu, bg, bu, _ = make((4, 6), 8, 5, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = fl.gated_linear(x, wg, wu, bg, bu)
        hr = eager(x, wg, wu, bg, bu, "silu")
    assert h.dtype == hr.dtype == torch.bfloat16
    h.float().sum().backward()
    assert x.grad.dtype == torch.float32 and wg.grad.dtype == torch.float32
    ref64 = eager(*(t.detach().bfloat16().double() for t in (x, wg, wu, bg, bu)), "silu")
    assert_matches(h.detach(), ref64, hr.detach(), red=8, what="autocast h")


def test_compile_fullgraph(backend):
    """torch.compile sees fastlayers::gated_linear as one opaque op: no graph break; forward and
    backward equal eager (the compiled backward reuses the op's saved g and u)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    x, wg, wu, bg, bu, dh = make((2, 3), 8, 6, torch.float32, seed=9)

    def f(x, wg, wu, bg, bu):
        return fl.gated_linear(x, wg, wu, bg, bu, "gelu") * 2

    compiled = torch.compile(f, fullgraph=True)
    h = compiled(x, wg, wu, bg, bu)
    h.backward(dh)
    got = [h.detach()] + [t.grad for t in (x, wg, wu, bg, bu)]
    ins = [leaf(t) for t in (x, wg, wu, bg, bu)]
    hr = f(*ins)
    hr.backward(dh)
    for a, b in zip(got, [hr.detach()] + [t.grad for t in ins]):
        torch.testing.assert_close(a, b)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] >= 1


def test_library_op_opcheck(backend):
    """torch.library.opcheck: schema, fake kernel, autograd registration of the custom ops."""
    x, wg, wu, bg, bu, dh = make((3,), 4, 5, torch.float32)
    op = torch.ops.fastlayers.gated_linear.default
    torch.library.opcheck(op, (x, wg, wu, bg, bu, "silu", 0.01))
    torch.library.opcheck(op, (x, wg, wu, None, None, "relu", 0.01))
    g, u = F.linear(x, wg, bg).detach(), F.linear(x, wu, bu).detach()
    torch.library.opcheck(torch.ops.fastlayers.gated_linear_backward.default,
                          ([dh], [x.detach(), wg.detach(), wu.detach(), bg.detach(), None, g, u],
                           [True, True, True, True, False], "silu", 0.01))


# ----------------------------------------------------------------------------- triton (interpreter)
def _triton_reason():
    try:
        return load("triton").unavailable_reason(torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - triton missing
        return str(e)


needs_triton = pytest.mark.skipif(_triton_reason() is not None,
                                  reason=f"triton backend cannot run on CPU tensors here: {_triton_reason()}")


@needs_triton
@pytest.mark.parametrize("act", NAMES)
def test_triton_every_activation(act):
    x, wg, wu, bg, bu, dh = make((2, 35), 40, 70, torch.float32, seed=2)  # straddles the 64-wide tiles
    with fl.use_backend("triton"):
        check(x, wg, wu, bg, bu, act, dh)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("lead,k,n,bias", [((1,), 1, 1, "both"), ((65,), 33, 129, "gate"), ((3,), 0, 4, "up"),
                                           ((0,), 5, 4, "both"), ((6,), 5, 0, "none")], ids=str)
def test_triton_shapes(dtype, lead, k, n, bias):
    x, wg, wu, bg, bu, dh = make(lead, k, n, dtype, seed=3)
    bg = bg if bias in ("both", "gate") else None
    bu = bu if bias in ("both", "up") else None
    with fl.use_backend("triton"):
        check(x, wg, wu, bg, bu, "silu", dh)


@needs_triton
def test_triton_gradcheck_fp64_and_non_contiguous():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, dtype=torch.float64, generator=gen).t().requires_grad_()  # (6, 3), transposed
    both = torch.randn(8, 3, dtype=torch.float64, generator=gen)
    wg, wu = both[::2].detach().requires_grad_(), both[1::2].detach().requires_grad_()
    bg = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    with fl.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda *a: fl.gated_linear(*a, None, "gelu"), (x, wg, wu, bg))


@needs_triton
@pytest.mark.parametrize("act", ["silu", "hardswish", "relu6", "mish"])
def test_triton_special_values(act):
    z = torch.tensor((SPECIAL[:15] * 5)[:64])
    x = torch.stack([z, z.flip(0)], 1)
    wg, wu = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    xs, xr = leaf(x), leaf(x)
    with fl.use_backend("triton"):
        h = fl.gated_linear(xs, wg, wu, None, None, act)
    h.backward(torch.ones_like(h))
    hr = eager(xr, wg, wu, None, None, act)
    hr.backward(torch.ones_like(hr))
    torch.testing.assert_close(h, hr, equal_nan=True, rtol=1.3e-6, atol=1e-30)
    torch.testing.assert_close(xs.grad, xr.grad, equal_nan=True, rtol=1.3e-6, atol=1e-30)


# ----------------------------------------------------------------------------- FusedGatedMLP
class LlamaStyleMLP(nn.Module):
    """The plain-PyTorch gated MLP of Llama / Mistral / Qwen (Hugging Face's LlamaMLP layout)."""

    def __init__(self, hidden, inter, bias=False, act_fn=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act_fn = act_fn or nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _assert_same_model(model, ref, x, k):
    """Outputs and every gradient of two fp32 models equal at conftest's rule for two fp32 results."""
    xs, xr = leaf(x), leaf(x)
    y, yr = model(xs), ref(xr)
    dy = torch.randn_like(yr)
    y.backward(dy)
    yr.backward(dy)
    assert_close_fp32(y, yr, red=k, what="output")
    assert_close_fp32(xs.grad, xr.grad, red=k, what="dx")
    pr = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close_fp32(p.grad, pr[name].grad, red=k, what=name)


def _compare_mlp(fused, plain, x, k):
    _assert_same_model(fused, plain, x, k)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act,module", [("silu", nn.SiLU()), ("gelu", nn.GELU()), ("gelu_tanh", nn.GELU("tanh")),
                                        ("relu", nn.ReLU())])
def test_fused_gated_mlp_matches_llama_style(backend, bias, act, module):
    torch.manual_seed(0)
    plain = LlamaStyleMLP(24, 40, bias=bias, act_fn=module)
    fused = fl.FusedGatedMLP(24, 40, bias=bias, activation=act)
    assert list(fused.state_dict()) == list(plain.state_dict())  # same keys, same order
    fused.load_state_dict(plain.state_dict())
    _compare_mlp(fused, plain, torch.randn(2, 7, 24), 40)
    # and back: the fused module's checkpoint loads into the plain one
    plain2 = LlamaStyleMLP(24, 40, bias=bias, act_fn=module)
    plain2.load_state_dict(fused.state_dict())
    for (n1, a), (n2, b) in zip(plain2.state_dict().items(), fused.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)


def test_fused_gated_mlp_loads_hf_llama_mlp():
    """state_dict compatibility with transformers' own LlamaMLP (random weights)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from transformers.models.llama.modeling_llama import LlamaMLP
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=88, hidden_act="silu")
    torch.manual_seed(1)
    hf = LlamaMLP(cfg)
    fused = fl.FusedGatedMLP(32, 88)
    fused.load_state_dict(hf.state_dict())  # strict
    _compare_mlp(fused, hf, torch.randn(3, 5, 32), 88)


def test_fused_gated_mlp_from_linears_shares_parameters(backend):
    plain = LlamaStyleMLP(8, 12, bias=True)
    fused = fl.FusedGatedMLP.from_linears(plain.gate_proj, plain.up_proj, plain.down_proj, "silu")
    assert fused.gate_proj.weight is plain.gate_proj.weight
    _compare_mlp(fused, copy.deepcopy(plain), torch.randn(4, 8), 12)
    with pytest.raises(ValueError, match="gate_proj and up_proj must have the same shape"):
        fl.FusedGatedMLP.from_linears(nn.Linear(8, 12), nn.Linear(8, 13), nn.Linear(12, 8))
    with pytest.raises(ValueError, match="down_proj.in_features"):
        fl.FusedGatedMLP.from_linears(nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(13, 8))


def test_fused_gated_mlp_module_api():
    m = fl.FusedGatedMLP(6, 10, activation="gelu_tanh", dtype=torch.float64)
    # gate and up weights back to back in one buffer (one GEMM on the cpp backend), two Parameters
    assert m.up_proj.weight.data_ptr() == m.gate_proj.weight.data_ptr() + 60 * 8
    assert m.gate_proj.weight._base is None and m.gate_proj.weight.is_leaf
    assert m.gate_proj.weight.dtype == torch.float64 and m.down_proj.weight.shape == (6, 10)
    assert "activation=gelu_tanh" in repr(m)
    assert m.gate_proj.bias is None
    with pytest.raises(ValueError, match="fastlayers.FusedGatedMLP: unknown activation 'swiglu'"):
        fl.FusedGatedMLP(6, 10, activation="swiglu")
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    meta = fl.FusedGatedMLP(6, 10, device="meta")
    assert meta(torch.empty(2, 6, device="meta")).shape == (2, 6)


# ----------------------------------------------------------------------------- swap: gated MLPs
class TimmSwiGLU(nn.Module):
    """The shape of timm's layers/mlp.py SwiGLU (fc1_g / fc1_x / act / drop / norm / fc2), written here."""

    def __init__(self, in_features, hidden_features, bias=True):
        super().__init__()
        self.fc1_g = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        x_gate = self.fc1_g(x)
        x = self.fc1_x(x)
        x = self.act(x_gate) * x
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        return self.drop2(x)


class ChunkGeGLU(nn.Module):
    """GeGLU with one projection split in two (diffusers-style); gate_first picks which half gates."""

    def __init__(self, dim_in, dim_out, gate_first=False, approximate="none"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)
        self.gate_first, self.approximate = gate_first, approximate

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class ChunkGateFirst(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=False)

    def forward(self, x):
        gate, x = torch.chunk(self.proj(x), 2, dim=-1)
        return F.silu(gate) * x


def _swap_and_compare(model, x, k, *, n_gated, backend_name=None):
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    fl.swap(model)
    rep = model.fastlayers_swap_report
    assert len(rep.gated) == n_gated, str(rep)
    assert list(model.state_dict()) == keys  # state_dict keys unchanged
    _assert_same_model(model, ref, x, k)
    return rep


def test_swap_llama_style_mlp(backend):
    torch.manual_seed(0)
    model = nn.Sequential(LlamaStyleMLP(16, 40), nn.LayerNorm(16), LlamaStyleMLP(16, 24, act_fn=nn.GELU("tanh")))
    rep = _swap_and_compare(model, torch.randn(3, 5, 16), 40, n_gated=2)
    assert [r[2] for r in rep.gated] == ["silu", "gelu_tanh"]
    assert not any("gate_proj" in p or "up_proj" in p for p, _ in rep.left), str(rep)


def test_swap_timm_swiglu_and_chunked_geglu(backend):
    torch.manual_seed(1)
    model = nn.Sequential(TimmSwiGLU(12, 20), ChunkGeGLU(12, 10), nn.Linear(10, 12), ChunkGateFirst(12, 6))
    rep = _swap_and_compare(model, torch.randn(4, 12), 20, n_gated=3)
    assert [r[2] for r in rep.gated] == ["silu", "gelu", "silu"]


def _fc_then(act_fn):
    """A module class whose forward is act_fn(Linear(x)): swap sees the call of act_fn
    (F.hardswish, ...), a constant of the class, not state of the instance."""

    class FcThen(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return act_fn(self.fc(x))

    return FcThen


@pytest.mark.parametrize("act,module,functional", [("hardswish", nn.Hardswish, F.hardswish),
                                                   ("hardsigmoid", nn.Hardsigmoid, F.hardsigmoid),
                                                   ("relu6", nn.ReLU6, F.relu6), ("mish", nn.Mish, F.mish)])
def test_swap_new_activations(backend, act, module, functional):
    """Linear -> nn.Hardswish / ... and Linear -> F.hardswish / ... are fused like the others."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 8), module(), _fc_then(functional)())
    ref = copy.deepcopy(model)
    fl.swap(model)
    assert [f[2] for f in model.fastlayers_swap_report.fused] == [act, act], str(model.fastlayers_swap_report)
    x = torch.randn(5, 8) * 3
    torch.testing.assert_close(model(x), ref(x))


def test_swap_leaves_gated_products_that_are_not_fusable(backend):
    class UpUsedTwice(LlamaStyleMLP):
        def forward(self, x):
            u = self.up_proj(x)
            return self.down_proj(self.act_fn(self.gate_proj(x)) * u) + u.sum()

    class ReadsState(LlamaStyleMLP):
        def __init__(self, *a):
            super().__init__(*a)
            self.scale = 2.0

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * self.scale

    class DifferentInputs(LlamaStyleMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x * 2))

    hooked = LlamaStyleMLP(8, 16)
    hooked.up_proj.register_forward_hook(lambda *a: None)
    for mlp, reason in ((UpUsedTwice(8, 16), "its output is used by"), (ReadsState(8, 16), "reads Python state"),
                        (DifferentInputs(8, 16), ""), (hooked, "has hooks registered")):
        ref = copy.deepcopy(mlp)
        fl.swap(mlp)
        rep = mlp.fastlayers_swap_report
        assert not rep.gated, str(rep)
        left = rep.why_not_fused()
        assert reason in left["up_proj"], str(rep)
        x = torch.randn(3, 8)
        torch.testing.assert_close(mlp(x), ref(x))


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_swap_hf_causal_lm_fuses_every_mlp(backend, name):
    """A real, unmodified Hugging Face model (small config, random weights): every MLP's gate, up
    and activation become one gated_linear; logits, loss and every gradient equal the original's."""
    model = hf_causal_lm(name)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    fl.swap(model)
    rep = model.fastlayers_swap_report
    n_layers = model.config.num_hidden_layers
    assert len(rep.gated) == n_layers, str(rep)
    assert all(g[2] == "silu" for g in rep.gated)
    for i in range(n_layers):
        assert f"model.layers.{i}.mlp" in rep.rewritten
    assert list(model.state_dict()) == keys
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    out, outr = model(ids, labels=ids), ref(ids, labels=ids)
    tol = dict(rtol=1.3e-6 * 4, atol=1e-5 * math.sqrt(72))
    torch.testing.assert_close(out.logits, outr.logits, **tol)
    torch.testing.assert_close(out.loss, outr.loss, **tol)
    out.loss.backward()
    outr.loss.backward()
    pr = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, pr[n].grad, **tol, msg=lambda m: f"{n}: {m}")
