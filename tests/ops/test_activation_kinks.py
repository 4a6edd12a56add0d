"""Special values of the activations of real models (hardswish, hardsigmoid, relu6, quick_gelu,
mish) on every backend: the kinks (hardswish / hardsigmoid at +-3, relu6 at 0 and 6, one ulp either
side), +-0, NaN, +-inf and mish's large |z|. The op tests (test_linear_act.py, test_triton.py,
test_gradcheck.py) cover them on random data through the activation table.

Values go through fl.linear_act with a 1x1 identity weight (z = x exactly, up to the sign of a
zero, which the GEMM decides; PyTorch's side goes through F.linear for that reason), padded to 64
rows (fastlayers' vector loops). PyTorch's side applies the activation one element at a time: ATen's
formula (its scalar code). Its vectorised loop, which it runs on longer tensors, differs at NaN
(hardswish'(nan) = NaN, relu6'(nan) = 0 there; dy in the formula and in fastlayers at every size).
tests/ops/test_activation_grid.py covers every activation this way.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from fastlayers import activations as acts
from fastlayers.backends import load

NEW = ["hardswish", "hardsigmoid", "relu6", "quick_gelu", "mish"]
PIECEWISE = ["hardswish", "hardsigmoid", "relu6"]  # exact arithmetic: bit-equal to PyTorch


def _triton_ok() -> bool:
    try:
        return load("triton").unavailable_reason(torch.device("cpu")) is None
    except Exception:  # noqa: BLE001 - triton missing
        return False


BACKENDS = ["cpp", "reference", pytest.param("triton", marks=pytest.mark.skipif(
    not _triton_ok(), reason="triton backend cannot run on CPU tensors here (needs TRITON_INTERPRET=1)"))]

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def _ulps(v: float, dtype: torch.dtype):
    t = torch.tensor(v, dtype=dtype)
    return [torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)).item(), v,
            torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)).item()]


def _values(dtype):
    vals = [0.0, -0.0, float("nan"), 1e-30, -1e-30, 1.0, -1.0, 2.5, -2.5, 5.5, 7.0, -4.0]
    for k in (-3.0, 3.0, 0.0, 6.0):
        vals += _ulps(k, dtype)
    vals += [20.0, 20.5, 30.0, 88.0, 1e4, 1e20, -20.0, -30.0, -80.0, -88.0, -1e4, -1e20]
    return vals


def _run(backend, act, z):
    """(y, dy/dz with upstream gradient 1) through fl.linear_act on backend, and through torch."""
    n = z.shape[0]
    pad = max(64, n)
    zz = torch.cat([z, z[:1].expand(pad - n)]).unsqueeze(1)  # >= 64 values: torch's vector loop
    one = torch.ones(1, 1, dtype=z.dtype)
    x = zz.clone().requires_grad_()
    with fl.use_backend(backend):
        y = fl.linear_act(x, one, None, act)
    y.backward(torch.ones_like(y))
    xr = zz.clone().requires_grad_()
    zr = F.linear(xr, one)  # torch's GEMM decides the sign of a zero z too
    yr = torch.cat([acts.get(act).ref(zr[i:i + 1], 0.01) for i in range(zr.shape[0])])  # the formula
    yr.backward(torch.ones_like(yr))
    return (y.detach()[:n, 0], x.grad[:n, 0]), (yr.detach()[:n, 0], xr.grad[:n, 0])


def _same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("act", NEW)
def test_special_values_and_kinks(backend, act, dtype):
    z = torch.tensor(_values(dtype), dtype=dtype)
    (y, g), (yr, gr) = _run(backend, act, z)
    if act in PIECEWISE:  # the same few IEEE operations as ATen: bit-equal, signs of zero included
        assert _same(y, yr), f"{act} y: {list(zip(z.tolist(), y.tolist(), yr.tolist()))}"
        assert _same(g, gr), f"{act} dy/dz: {list(zip(z.tolist(), g.tolist(), gr.tolist()))}"
    else:
        torch.testing.assert_close(y, yr, equal_nan=True, rtol=1.3e-6, atol=1e-30)
        torch.testing.assert_close(g, gr, equal_nan=True, rtol=1.3e-6, atol=1e-30)
    zero = yr == 0
    assert torch.equal(torch.signbit(y[zero]), torch.signbit(yr[zero])), "sign of zero differs"


def test_kink_derivatives_are_pytorchs():
    """The exact one-sided choices, spelled out (ATen's formulas: hardswish_backward's, hardsigmoid's,
    hardtanh_backward's; at NaN hardswish' and relu6' pass dy, hardsigmoid' is 0)."""
    z = torch.tensor([-3.0, 3.0, 0.0, 6.0, float("nan"), -0.0])
    expect = {"hardswish": [0.0, 1.0, 0.5, 1.0, 1.0, 0.5],
              "hardsigmoid": [0.0, 0.0, 1 / 6, 0.0, 0.0, 1 / 6],
              "relu6": [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]}
    for act, want in expect.items():
        for backend in ("cpp", "reference") + (("triton",) if _triton_ok() else ()):
            (_, g), _ = _run(backend, act, z)
            torch.testing.assert_close(g, torch.tensor(want), equal_nan=True, msg=f"{act} on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", NEW)
def test_infinities(backend, act):
    """act(+-inf): PyTorch's value or the mathematical limit (hardswish(-inf) = nan in PyTorch)."""
    limits = {"hardswish": (math.inf, 0.0), "hardsigmoid": (1.0, 0.0), "relu6": (6.0, 0.0),
              "quick_gelu": (math.inf, 0.0), "mish": (math.inf, 0.0)}
    z = torch.tensor([math.inf, -math.inf])
    (y, _), (yr, _) = _run(backend, act, z)
    for v, t, lim in zip(y.tolist(), yr.tolist(), limits[act]):
        assert v == lim or v == t or (math.isnan(v) and math.isnan(t)), (act, v, t, lim)


@pytest.mark.parametrize("act", NEW)
def test_low_precision_rounds_once(act):
    """bf16: computed in fp32 and rounded once (quick_gelu's reference does the same)."""
    z = torch.linspace(-25, 25, 2001).to(torch.bfloat16)
    (y, g), _ = _run("cpp", act, z)
    (y32, g32), _ = _run("cpp", act, z.float())
    assert torch.equal(y, y32.to(torch.bfloat16)) or (y.float() - y32).abs().max() <= 2 ** -8 * y32.abs().max()
    torch.testing.assert_close(g.float(), g32, rtol=2 ** -7, atol=1e-6)


def test_mish_large_arguments():
    """mish's softplus never overflows: mish(z) = z for large z, -0-ish tails for large -z, and the
    derivative tends to 1 and 0 without NaN (fp32 and fp64)."""
    for dtype in (torch.float32, torch.float64):
        z = torch.tensor([15.0, 20.0, 25.0, 40.0, 90.0, 710.0, 3e38, -40.0, -90.0, -710.0], dtype=dtype)
        (y, g), (yr, gr) = _run("cpp", "mish", z)
        torch.testing.assert_close(y, yr, rtol=1.3e-6, atol=1e-30)
        torch.testing.assert_close(g, gr, rtol=1.3e-6, atol=1e-30)
        assert not y.isnan().any() and not g.isnan().any()


def test_modules_are_the_torch_ones():
    """The table's modules (used by swap and the tests) are PyTorch's, plus QuickGELU."""
    assert isinstance(acts.get("hardswish").module(0.0), torch.nn.Hardswish)
    assert isinstance(acts.get("hardsigmoid").module(0.0), torch.nn.Hardsigmoid)
    assert isinstance(acts.get("relu6").module(0.0), torch.nn.ReLU6)
    assert isinstance(acts.get("mish").module(0.0), torch.nn.Mish)
    x = torch.randn(100)
    torch.testing.assert_close(acts.get("quick_gelu").module(0.0)(x), x * torch.sigmoid(1.702 * x))
    assert acts.get("relu6").saves(0.01) == "output"
    for name in ("hardswish", "hardsigmoid", "quick_gelu", "mish"):
        assert acts.get(name).saves(0.01) == "input"
    # the table's reference is torch's function
    torch.testing.assert_close(acts.get("relu6").ref(x, 0.0), F.relu6(x))
