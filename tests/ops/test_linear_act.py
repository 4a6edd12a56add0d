"""fl.linear_act / FusedLinear forward and backward against PyTorch, on the CPU backends."""
import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from fastlayers.activations import ACTIVATIONS, NAMES

from conftest import FLOAT_DTYPES, INF, LIMITS, SPECIAL, assert_matches, skip_low_precision

SLOPE = 0.01


def eager(x, w, b, act, slope=SLOPE):
    return ACTIVATIONS[act].ref(F.linear(x, w, b), slope)


def leaf(t):
    return t.detach().requires_grad_(True)


def check(x, w, b, act, g, slope=SLOPE):
    """Runs fl.linear_act forward + backward and compares y, dx, dW, db with float64 PyTorch."""
    x0, w0, b0, g0 = (None if t is None else t.detach().clone() for t in (x, w, b, g))
    y = fl.linear_act(x, w, b, act, slope)
    y.backward(g)
    grads = [x.grad, w.grad] + ([b.grad] if b is not None else [])
    # inputs are never modified
    for t, t0 in ((x, x0), (w, w0), (b, b0), (g, g0)):
        if t is not None:
            torch.testing.assert_close(t.detach(), t0, rtol=0, atol=0, equal_nan=True)

    def ref(dtype):
        xs, ws, bs = (None if t is None else leaf(t.detach().to(dtype)) for t in (x0, w0, b0))
        yr = eager(xs, ws, bs, act, slope)
        yr.backward(g0.to(dtype))
        return [yr, xs.grad, ws.grad] + ([bs.grad] if bs is not None else [])

    r64, rlow = ref(torch.float64), ref(x.dtype)
    m = x0.numel() // max(x0.shape[-1], 1)
    k, n = w0.shape[1], w0.shape[0]
    for name, out, r, e, red in zip(("y", "dx", "dW", "db"), [y] + grads, r64, rlow, (k, n, m, m)):
        assert_matches(out.detach(), r, e, red=red, what=f"{act} {x.dtype} {name}")


SHAPES = [  # (leading dims of x, in_features, out_features)
    ((1,), 1, 1),
    ((3,), 7, 5),
    ((33,), 65, 17),
    ((127,), 257, 129),
    ((2, 3), 7, 5),        # 3-D input
    ((2, 3, 4), 9, 6),     # 4-D input
    ((0,), 7, 5),          # zero-size batch
    ((4, 0), 6, 3),        # zero-size inner batch dim
    ((), 5, 4),            # 1-D x: (in,) -> (out,)
]


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_act_matches_torch(backend, act, dtype, lead, k, n, bias):
    torch.manual_seed(0)
    x = leaf(torch.randn(*lead, k, dtype=dtype))
    w = leaf(torch.randn(n, k, dtype=dtype) / k ** 0.5)
    b = leaf(torch.randn(n, dtype=dtype)) if bias else None
    g = torch.randn(*lead, n, dtype=dtype)
    check(x, w, b, act, g)


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["x_transposed", "x_sliced", "w_transposed", "w_sliced", "grad_transposed",
                                    "grad_expanded", "x_3d_permuted"])
def test_non_contiguous(backend, act, dtype, layout):
    torch.manual_seed(1)
    m, k, n = 19, 23, 11
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k ** 0.5
    g = torch.randn(m, n, dtype=dtype)
    if layout == "x_transposed":
        x = torch.randn(k, m, dtype=dtype).t()
    elif layout == "x_sliced":
        x = torch.randn(m, 2 * k, dtype=dtype)[:, ::2]
    elif layout == "w_transposed":
        w = (torch.randn(k, n, dtype=dtype) / k ** 0.5).t()
    elif layout == "w_sliced":
        w = torch.randn(2 * n, k, dtype=dtype)[::2]
    elif layout == "grad_transposed":
        g = torch.randn(n, m, dtype=dtype).t()
    elif layout == "grad_expanded":
        g = torch.randn(1, n, dtype=dtype).expand(m, n)
    elif layout == "x_3d_permuted":
        x = torch.randn(k, 4, 5, dtype=dtype).permute(1, 2, 0)
        g = torch.randn(4, 5, n, dtype=dtype)
    assert not (x.is_contiguous() and w.is_contiguous() and g.is_contiguous())
    x = x.requires_grad_() if x.is_leaf else leaf(x)
    w = w.requires_grad_() if w.is_leaf else leaf(w)
    b = leaf(torch.randn(n, dtype=dtype))
    check(x, w, b, act, g)


@pytest.mark.parametrize("slope", [0.0, 0.2, -0.3, 1.5])
def test_leaky_relu_slopes(backend, slope):
    torch.manual_seed(2)
    x, w, b = leaf(torch.randn(9, 8)), leaf(torch.randn(7, 8)), leaf(torch.randn(7))
    check(x, w, b, "leaky_relu", torch.randn(9, 7), slope=slope)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, False), (False, True, True)])
def test_only_requested_grads(backend, needs):
    """Gradients for inputs that don't require grad are not computed (and stay None)."""
    torch.manual_seed(3)
    x, w, b = torch.randn(5, 4), torch.randn(3, 4), torch.randn(3)
    for t, r in zip((x, w, b), needs):
        t.requires_grad_(r)
    y = fl.linear_act(x, w, b, "gelu")
    y.sum().backward()
    for t, r in zip((x, w, b), needs):
        assert (t.grad is not None) == r
    ref = F.gelu(F.linear(*(t.detach().requires_grad_(r) for t, r in zip((x, w, b), needs))))
    torch.testing.assert_close(y, ref)


def test_no_grad_output_matches(backend):
    torch.manual_seed(4)
    x, w, b = torch.randn(6, 5, requires_grad=True), torch.randn(4, 5), torch.randn(4)
    with torch.no_grad():
        y = fl.linear_act(x, w, b, "silu")
    assert not y.requires_grad
    torch.testing.assert_close(y, F.silu(F.linear(x, w, b)))


@pytest.mark.parametrize("act", NAMES)
def test_dense_grid_distinguishes_variants(backend, act):
    """z on a dense grid through an exact identity GEMM (K = 1, w = 1): fp32 elementwise tolerance,
    tight enough to tell erf-GELU from tanh-GELU (they differ by up to 4.7e-4)."""
    z = torch.linspace(-12, 12, 4801).unsqueeze(1)
    one = torch.ones(1, 1)
    x = leaf(z)
    y = fl.linear_act(x, one, None, act)
    y.backward(torch.ones_like(y))
    zr = leaf(z.double())
    yr = ACTIVATIONS[act].ref(zr, SLOPE)
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y.double(), yr, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), zr.grad, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_special_values(backend, act, dtype):
    """±0, finite extremes and NaN give PyTorch's values (and signs of zero), derivatives too.
    64 values (SPECIAL repeated): fastlayers' vector loops; PyTorch's side one element at a time,
    ATen's formula (its vectorised loop, run on long tensors, departs from it at NaN:
    hardswish'(nan) = NaN, relu6'(nan) = 0 there, dy in the formula; tests/ops/test_activation_grid.py)."""
    z = torch.tensor((SPECIAL * 5)[:64], dtype=dtype).unsqueeze(1)
    one = torch.ones(1, 1, dtype=dtype)
    x = leaf(z)
    y = fl.linear_act(x, one, None, act)
    y.backward(torch.ones_like(y))
    xr = leaf(z)
    zr = F.linear(xr, one)  # torch's own GEMM too: it decides the sign of a zero z
    yr = torch.cat([ACTIVATIONS[act].ref(zr[i:i + 1], SLOPE) for i in range(zr.shape[0])])
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr, equal_nan=True, rtol=1.3e-6 if dtype != torch.bfloat16 else 1e-2, atol=1e-30)
    zero = yr == 0
    assert torch.equal(torch.signbit(y[zero]), torch.signbit(yr[zero])), "sign of zero differs"
    torch.testing.assert_close(x.grad, xr.grad, equal_nan=True,
                               rtol=1.3e-6 if dtype != torch.bfloat16 else 1e-2, atol=1e-30)


@pytest.mark.parametrize("act", NAMES)
def test_infinities(backend, act):
    z = torch.tensor(INF).unsqueeze(1)
    y = fl.linear_act(z, torch.ones(1, 1), None, act).squeeze(1)
    torch_y = ACTIVATIONS[act].ref(z, SLOPE).squeeze(1)
    for i, v in enumerate(y.tolist()):
        ok = {torch_y[i].item(), LIMITS[act][i]}
        assert v in ok or (v != v and any(o != o for o in ok)), f"{act}({INF[i]}) = {v}, expected one of {ok}"


def test_relu_derivative_at_zero(backend):
    """relu'(0) = 0, as PyTorch: a zero pre-activation passes no gradient."""
    x = leaf(torch.tensor([[0.0], [-0.0], [1.0], [-1.0]]))
    y = fl.linear_act(x, torch.ones(1, 1), None, "relu")
    y.sum().backward()
    assert x.grad.squeeze(1).tolist() == [0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("act", NAMES)
def test_double_backward(backend, act):
    """create_graph=True gives exact higher-order gradients (fp64 gradgradcheck)."""
    torch.manual_seed(6)
    x = leaf(torch.randn(3, 4, dtype=torch.float64))
    w = leaf(torch.randn(2, 4, dtype=torch.float64))
    b = leaf(torch.randn(2, dtype=torch.float64))
    if act == "hardsigmoid":  # PyTorch has no double backward for hardsigmoid: the same error, like torch
        with pytest.raises(RuntimeError, match="derivative for aten::hardsigmoid_backward is not implemented"):
            torch.autograd.gradgradcheck(lambda x, w, b: F.hardsigmoid(F.linear(x, w, b)), (x, w, b))
        with pytest.raises(RuntimeError, match="derivative for aten::hardsigmoid_backward is not implemented"):
            torch.autograd.gradgradcheck(lambda x, w, b: fl.linear_act(x, w, b, act), (x, w, b))
        return
    assert torch.autograd.gradgradcheck(lambda x, w, b: fl.linear_act(x, w, b, act), (x, w, b))


def test_long_rows_and_threads(backend):
    """Enough rows that the OpenMP path splits the work; 1 thread and all threads agree exactly."""
    torch.manual_seed(5)
    x, w, b = torch.randn(512, 96), torch.randn(200, 96), torch.randn(200)
    n = torch.get_num_threads()
    outs = []
    for t in (1, max(n, 3)):  # >= 3 threads even on a 1-core machine, or this compares 1 with 1
        torch.set_num_threads(t)
        try:
            xs, ws, bs = leaf(x), leaf(w), leaf(b)
            y = fl.linear_act(xs, ws, bs, "gelu")
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), xs.grad, ws.grad, bs.grad))
        finally:
            torch.set_num_threads(n)
    ref = F.gelu(F.linear(x, w, b))
    torch.testing.assert_close(outs[0][0], ref, atol=1e-4, rtol=1.3e-6)
    torch.testing.assert_close(outs[0][3], outs[1][3], atol=1e-5, rtol=1e-6)


def test_output_can_be_modified_in_place(backend):
    """Like any torch op's output (h = fc(x); h += x), and a saved output edited in place is
    detected at backward by PyTorch's usual version check."""
    x = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    h = fl.linear_act(x, w, None, "gelu")
    h += x  # gelu saves z, not h: fine, and the gradient is right
    h.sum().backward()
    xr, wr = leaf(x), leaf(w)
    (F.gelu(F.linear(xr, wr)) + xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    y = fl.linear_act(x, w, None, "relu")  # relu saves its output
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_saved_input_modified_in_place_raises(backend):
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(2, 4, requires_grad=True)
    xi = x * 1
    y = fl.linear_act(xi, w, None, "tanh")
    xi.mul_(2)  # x is saved for dW
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("k,n", [(0, 3), (4, 0), (0, 0)])
def test_zero_features(backend, k, n):
    """in_features or out_features of 0, like F.linear (z = bias, or an empty output)."""
    x, w, b = leaf(torch.randn(5, k)), leaf(torch.randn(n, k)), leaf(torch.randn(n))
    check(x, w, b, "gelu", torch.randn(5, n))


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("lead,k,n", [((3,), 7, 5), ((33,), 65, 17), ((2, 3), 9, 6)], ids=str)
def test_float16(backend, act, lead, k, n):
    """float16 (fp16 storage, fp32 math): the low-precision rule against float64."""
    skip_low_precision(backend)
    torch.manual_seed(7)
    x = leaf(torch.randn(*lead, k, dtype=torch.float16))
    w = leaf(torch.randn(n, k, dtype=torch.float16) / k ** 0.5)
    b = leaf(torch.randn(n, dtype=torch.float16))
    check(x, w, b, act, torch.randn(*lead, n, dtype=torch.float16))
