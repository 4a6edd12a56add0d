"""The cpp backend's forward routes (oneDNN fused, oneDNN + C++ pass, MKL + C++ pass), each forced
on small shapes and compared with float64 PyTorch at the tolerances of conftest.assert_matches,
special values included; the rule that picks a route; the fallback when oneDNN is missing."""
import os

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
import fastlayers.ops.linear_cross_entropy as fl_loss
from fastlayers import _dispatch
from fastlayers.activations import ACTIVATIONS, NAMES, SAVE_INPUT
from fastlayers.backends import cpu  # the package the registry hands out as "cpp"
from fastlayers.backends.cpu import _ext, gemm, postops  # the tunables live in gemm: patched there

from conftest import INF, LIMITS, SPECIAL, assert_matches

ROUTES = ["fused", "onednn", "mkl"]
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
SLOPE = 0.01


@pytest.fixture
def route(request, monkeypatch):
    """Force gemm.ROUTE and count the oneDNN calls (a forced route must really be taken)."""
    monkeypatch.setattr(gemm, "ROUTE", request.param)
    for dtype in DTYPES:  # the probe's own calls are not the route's
        gemm._probe_onednn(dtype)
    calls = []
    real = gemm._linear_pointwise

    def spy(*args):
        calls.append(args[3])
        return real(*args)
    monkeypatch.setattr(gemm, "_linear_pointwise", spy)
    with fl.use_backend("cpp"):
        yield request.param, calls


def expected_onednn_attr(route_name, act, dtype, grad, slope=SLOPE):
    """The attr the route must hand oneDNN, or None when it must not call oneDNN at all."""
    if route_name == "mkl" or not gemm._probe_onednn(dtype):
        return None
    fused = (route_name == "fused" and act in gemm._probe_onednn(dtype)
             and not (act == "leaky_relu" and slope == 0)
             and ACTIVATIONS[act].saves(slope) != SAVE_INPUT)  # with or without grad: same bits
    return postops.ONEDNN_POSTOPS[act][0] if fused else "none"


def leaf(t):
    return t.detach().requires_grad_(True)


def reference(x, w, b, act, g, dtype):
    xs, ws, bs = (None if t is None else leaf(t.detach().to(dtype)) for t in (x, w, b))
    y = ACTIVATIONS[act].ref(F.linear(xs, ws, bs), SLOPE)
    if g is None:
        return [y.detach()]
    y.backward(g.to(dtype))
    return [y.detach(), xs.grad, ws.grad] + ([bs.grad] if bs is not None else [])


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("lead,k,n,bias", [((33,), 65, 17, True), ((2, 3), 9, 6, False)], ids=str)
def test_route_matches_torch(route, act, dtype, grad, lead, k, n, bias):
    route_name, calls = route
    torch.manual_seed(0)
    x = torch.randn(*lead, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k ** 0.5
    b = torch.randn(n, dtype=dtype) if bias else None
    g = torch.randn(*lead, n, dtype=dtype) if grad else None
    xs, ws, bs = (None if t is None else t.clone().requires_grad_(grad) for t in (x, w, b))
    y = fl.linear_act(xs, ws, bs, act, SLOPE)
    outs = [y.detach()]
    if grad:
        y.backward(g)
        outs += [xs.grad, ws.grad] + ([bs.grad] if bias else [])
    want = expected_onednn_attr(route_name, act, dtype, grad)
    assert calls == ([] if want is None else [want]), f"route {route_name}: oneDNN calls {calls}"
    r64, rlow = reference(x, w, b, act, g, torch.float64), reference(x, w, b, act, g, dtype)
    m = x.numel() // k
    for name, out, r, e, red in zip(("y", "dx", "dW", "db"), outs, r64, rlow, (k, n, m, m)):
        assert_matches(out, r, e, red=red, what=f"{route_name} {act} {dtype} {name}")


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("layout", ["x_transposed", "w_transposed", "x_sliced"])
def test_route_non_contiguous(route, layout):
    torch.manual_seed(1)
    x, w, b = torch.randn(12, 10), torch.randn(8, 10), torch.randn(8)
    if layout == "x_transposed":
        x = x.t().contiguous().t()
    elif layout == "w_transposed":
        w = w.t().contiguous().t()
    else:
        x = torch.randn(12, 20)[:, ::2]
    for act in ("gelu", "relu", "sigmoid"):
        y = fl.linear_act(x, w, b, act)
        r64 = ACTIVATIONS[act].ref(F.linear(x.double(), w.double(), b.double()), SLOPE)
        assert_matches(y, r64, ACTIVATIONS[act].ref(F.linear(x, w, b), SLOPE), red=10, what=f"{layout} {act}")


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("width", [1, 40])
def test_route_special_values(route, act, dtype, grad, width):
    """±0 (sign included), finite extremes, NaN and ±inf through each route, as test_linear_act's;
    width 40: z = x @ one.T repeats each value over 40 columns (oneDNN's vectorised kernels).
    x = [v, 0] against w = [1, 1]: z = v + 0, whose zeros are +0 in every BLAS (with K = 1 the
    sign of a zero z depends on the GEMM: oneDNN's accumulator turns -0 into +0, MKL's keeps it),
    so signs of zero test the activation."""
    z = torch.tensor(SPECIAL, dtype=dtype).unsqueeze(1)
    z = torch.cat([z, torch.zeros_like(z)], 1)  # (15, 2) @ (width, 2): y = act(v + 0)
    one = torch.ones(width, 2, dtype=dtype)
    x = z.clone().requires_grad_(grad)
    y = fl.linear_act(x, one, None, act, SLOPE)
    xr = z.clone().requires_grad_(grad)
    yr = ACTIVATIONS[act].ref(F.linear(xr, one), SLOPE)
    tol = 1.3e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.detach(), yr.detach(), equal_nan=True, rtol=tol, atol=1e-30)
    zero = yr == 0
    assert torch.equal(torch.signbit(y[zero]), torch.signbit(yr[zero])), "sign of zero differs"
    if grad and (act in postops.ONEDNN_POSTOPS or act == "relu"):
        # (the routes differ in the forward only; the other activations' backward at special
        # values, NaN included, is test_linear_act's test_special_values, with its own rules)
        y.backward(torch.ones_like(y))
        yr.backward(torch.ones_like(yr))
        torch.testing.assert_close(x.grad, xr.grad, equal_nan=True, rtol=tol, atol=1e-30)
    zi = torch.tensor(INF, dtype=dtype).unsqueeze(1)
    yi = fl.linear_act(zi, one[:, :1], None, act, SLOPE)[:, -1]
    torch_yi = ACTIVATIONS[act].ref(zi, SLOPE).squeeze(1)
    for i, v in enumerate(yi.tolist()):
        ok = {torch_yi[i].item(), LIMITS[act][i]}
        assert v in ok or (v != v and any(o != o for o in ok)), f"{act}({INF[i]}) = {v}, expected one of {ok}"


@pytest.mark.parametrize("route", ["fused"], indirect=True)
@pytest.mark.parametrize("slope", [0.0, -0.5, 2.0])
def test_fused_leaky_relu_slopes(route, slope):
    """The slope reaches oneDNN as its scalar (negative slopes save z: the "onednn" route;
    slope 0 is never fused)."""
    _, calls = route
    torch.manual_seed(2)
    x, w, b = torch.randn(9, 11), torch.randn(7, 11), torch.randn(7)
    for grad in (False, True):
        xs = x.clone().requires_grad_(grad)
        calls.clear()
        y = fl.linear_act(xs, w, b, "leaky_relu", slope)
        want = expected_onednn_attr("fused", "leaky_relu", torch.float32, grad, slope)
        assert calls == ([] if want is None else [want])
        yr = F.leaky_relu(F.linear(x.double(), w.double(), b.double()), slope)
        torch.testing.assert_close(y.double(), yr, rtol=1.3e-6, atol=1e-5)
        zero = yr == 0
        assert torch.equal(torch.signbit(y[zero]), torch.signbit(yr[zero].float()))


def wide(m, k, n, dtype=torch.float32):
    """(M, K) and (N, K) tensors of that shape without the memory (the rule reads shapes only)."""
    return torch.zeros(1, 1, dtype=dtype).expand(m, k), torch.zeros(1, 1, dtype=dtype).expand(n, k)


@pytest.mark.skipif(not gemm._probe_onednn(torch.float32), reason="this torch has no usable oneDNN fused linear")
def test_auto_rule(monkeypatch):
    monkeypatch.setattr(gemm, "ROUTE", "auto")
    x, w = wide(2048, 1024, 4096, torch.float32)
    monkeypatch.setattr(gemm, "_FP32_MM_ONEDNN", False)  # MKL's own sgemm (Intel): fp32 stays on it
    assert gemm._forward_route(x, w, ACTIVATIONS["tanh"], 0.0) == "mkl"
    assert gemm._forward_route(x, w, ACTIVATIONS["tanh"], 0.0, packed=True) == "fused"
    assert not gemm.plain_linear_gain(2048, 1024, 4096, torch.float32)
    monkeypatch.setattr(gemm, "_FP32_MM_ONEDNN", True)  # MKL's generic sgemm (AMD): oneDNN from 2^22
    gelu, gelu_t, relu = ACTIVATIONS["gelu"], ACTIVATIONS["gelu_tanh"], ACTIVATIONS["relu"]
    sigmoid, tanh, leaky = ACTIVATIONS["sigmoid"], ACTIVATIONS["tanh"], ACTIVATIONS["leaky_relu"]
    for dtype in (torch.float32, torch.bfloat16):
        x, w = wide(2048, 1024, 4096, dtype)
        assert gemm._forward_route(x, w, tanh, 0.0) == "fused"        # the backward keeps y
        assert gemm._forward_route(x, w, sigmoid, 0.0) == "fused"
        assert gemm._forward_route(x, w, gelu_t, 0.0) == "onednn"     # keeps z: never fused, so
        # that a no-grad call gives the with-grad call's bits (oneDNN's post-op rounds once)
        assert gemm._forward_route(x, w, relu, 0.0) == "onednn"       # no exact post-op
        assert gemm._forward_route(x, w, leaky, 0.0) == "onednn"      # slope 0: relu there
        x, w = wide(1, 64, 64, dtype)
        assert gemm._forward_route(x, w, tanh, 0.0) == "mkl"          # too small for oneDNN
    x, w = wide(2048, 1024, 4096, torch.float32)
    assert gemm._forward_route(x, w, gelu, 0.0) == "onednn"  # fp32 erf GELU: signs of zero differ
    x, w = wide(2048, 1024, 4096, torch.float64)
    assert gemm._forward_route(x, w, gelu, 0.0) == "mkl"
    x, w = wide(0, 1024, 4096)
    assert gemm._forward_route(x, w, gelu, 0.0) == "mkl"


def test_probe_failure_falls_back(monkeypatch):
    """A torch whose oneDNN op is missing (or wrong) runs the "mkl" route, with right results."""
    real = gemm._linear_pointwise
    def missing(*args):
        raise RuntimeError("No such operator mkldnn::_linear_pointwise")
    monkeypatch.setattr(gemm, "_linear_pointwise", missing)
    monkeypatch.setattr(gemm, "_onednn_ok", {})
    monkeypatch.setattr(gemm, "ROUTE", "fused")
    torch.manual_seed(3)
    x, w, b = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4)
    with fl.use_backend("cpp"):
        y = fl.linear_act(x, w, b, "gelu")
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)))
    assert gemm._onednn_ok == {torch.float32: frozenset()}

    def nan_to_zero(x, w, b, attr, scalars, alg):  # a post-op that loses NaN: not fused
        y = real(x, w, b, attr, scalars, alg)
        return y.nan_to_num(0.0) if attr == "tanh" else y
    monkeypatch.setattr(gemm, "_linear_pointwise", nan_to_zero)
    monkeypatch.setattr(gemm, "_onednn_ok", {})
    assert "tanh" not in gemm._probe_onednn(torch.float32) and "none" in gemm._probe_onednn(torch.float32)

    def wrong(x, w, b, attr, scalars, alg):  # a wrong GEMM: no oneDNN route at all
        return torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)
    monkeypatch.setattr(gemm, "_linear_pointwise", wrong)
    monkeypatch.setattr(gemm, "_onednn_ok", {})
    assert not gemm._probe_onednn(torch.float32)


# ----------------------------------------------------------------------------- FusedLinear inference
from fastlayers import nn as flnn  # noqa: E402


@pytest.fixture
def pack_calls(monkeypatch):
    """Count the cpp backend's prepacks and its fast-path forwards with / without a packed weight."""
    calls = {"pack": 0, "packed": 0, "plain": 0}
    real_pack, real_forward = cpu.prepack_weight, cpu.linear_act_forward_packed

    def pack(*a):
        calls["pack"] += 1
        return real_pack(*a)

    def forward(x, w, b, act, slope, packed):
        got = []

        def counted(*a):
            got.append(packed(*a))
            return got[-1]
        y = real_forward(x, w, b, act, slope, counted)
        calls["packed" if got and got[-1] is not None else "plain"] += 1
        return y
    monkeypatch.setattr(cpu, "prepack_weight", pack)
    monkeypatch.setattr(cpu, "linear_act_forward_packed", forward)
    monkeypatch.setattr(gemm, "ROUTE", "fused")  # small test shapes take the oneDNN routes too
    with fl.use_backend("cpp"):
        yield calls


def module(act="gelu", dtype=torch.float32, prepack=True, frozen=True):
    """A FusedLinear opted in to prepacking (fastlayers.prepack) with frozen weights (a trainable
    weight is never packed: tests/modules/test_never_stale.py)."""
    torch.manual_seed(4)
    m = fl.FusedLinear(24, 16, activation=act, dtype=dtype, prepack=prepack)
    return m.requires_grad_(not frozen)


def eager_module(m, x):
    return ACTIVATIONS[m.activation].ref(F.linear(x, m.weight, m.bias), m.negative_slope)


needs_onednn = pytest.mark.skipif(not gemm._probe_onednn(torch.float32),
                                  reason="this torch has no usable oneDNN fused linear: nothing is prepacked")


@needs_onednn
@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prepacked_matches_unpacked(pack_calls, act, dtype):
    m = module(act, dtype)
    x = torch.randn(3, 5, 24, dtype=dtype)
    with torch.no_grad():
        y = m(x)
        r64 = ACTIVATIONS[act].ref(F.linear(x.double(), m.weight.double(), m.bias.double()), SLOPE)
        assert_matches(y, r64, eager_module(m, x), red=24, what=f"prepacked {act} {dtype}")
        assert pack_calls["pack"] == 1 and pack_calls["packed"] == 1
        m(x[0])  # another batch size: same packed weight
        assert pack_calls["pack"] == 1 and pack_calls["packed"] == 2
        flnn.PREPACK = False
        try:
            y_plain = m(x)
        finally:
            flnn.PREPACK = True
    assert pack_calls["packed"] == 2 and pack_calls["plain"] == 1
    assert_matches(y_plain, r64, eager_module(m, x), red=24, what=f"unpacked {act} {dtype}")


@needs_onednn
def test_prepack_not_used_when_grad_needed(pack_calls):
    m = module(frozen=False)
    x = torch.randn(4, 24)
    y = m(x)  # parameters require grad: the autograd path
    assert y.requires_grad and pack_calls["pack"] == 0 and pack_calls["packed"] == 0
    y.sum().backward()
    assert m.weight.grad is not None
    with torch.no_grad():
        m(x)  # a trainable weight is never packed, even without grad
    assert pack_calls["pack"] == 0 and pack_calls["packed"] == 0
    xg = x.clone().requires_grad_(True)
    m.weight.requires_grad_(False)
    m.bias.requires_grad_(False)
    y = m(xg)  # only x requires grad: still autograd
    assert y.requires_grad and pack_calls["packed"] == 0
    with torch.no_grad():
        m(xg)
    assert pack_calls["packed"] == 1
    with torch.inference_mode():
        m(x)
    assert pack_calls["packed"] == 2


@needs_onednn
def test_prepack_opt_out(pack_calls):
    m = module(prepack=False)  # (the default)
    with torch.no_grad():
        y = m(torch.randn(4, 24))
    assert pack_calls["pack"] == 0 and pack_calls["packed"] == 0 and pack_calls["plain"] == 1
    assert y.shape == (4, 16)


@needs_onednn
@pytest.mark.parametrize("change", ["in_place", "load_state_dict", "to_dtype", "to_back", "data", "optimizer"])
def test_prepack_invalidated_when_weight_changes(pack_calls, change):
    m = module()
    x = torch.randn(6, 24)
    with torch.no_grad():
        m(x)
    assert pack_calls["pack"] == 1
    if change == "in_place":
        with torch.no_grad():
            m.weight.mul_(-2)
    elif change == "load_state_dict":
        sd = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
        m.load_state_dict(sd)
    elif change in ("to_dtype", "to_back"):
        m.to(torch.bfloat16)
        if change == "to_back":
            m.to(torch.float32)
        else:
            x = x.bfloat16()
    elif change == "data":
        m.weight.data = torch.randn(16, 24)
    else:
        m.requires_grad_(True)
        m(x).sum().backward()  # a training step between two evaluations
        torch.optim.SGD(m.parameters(), lr=0.5).step()
        m.requires_grad_(False)
    with torch.no_grad():
        y = m(x)
        y_again = m(x)
    assert pack_calls["pack"] == 2, "the packed weight was not rebuilt"
    torch.testing.assert_close(y, y_again, rtol=0, atol=0)
    r64 = F.gelu(F.linear(x.double(), m.weight.double(), m.bias.double()))
    assert_matches(y, r64, eager_module(m, x), red=24, what=change)


@needs_onednn
def test_prepack_not_in_state_dict_and_copies(pack_calls):
    import copy
    import io
    m = module()
    x = torch.randn(2, 24)
    with torch.no_grad():
        y = m(x)
    assert set(m.state_dict()) == {"weight", "bias"}
    m2 = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m3 = torch.load(buf, weights_only=False)
    for other in (m2, m3):
        assert other._packed is None
        with torch.no_grad():
            torch.testing.assert_close(other(x), y, rtol=0, atol=0)


def test_fast_path_falls_back_for_errors_and_autocast():
    """Calls the fast path does not take still raise the general path's errors / follow autocast."""
    m = module("relu")
    with torch.no_grad():
        with pytest.raises(fl.ShapeError, match="linear_act"):
            m(torch.randn(3, 7))
        with pytest.raises(fl.DTypeError, match="linear_act"):
            m(torch.randn(3, 24, dtype=torch.float64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(torch.randn(3, 24))
        assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=str)
def test_no_grad_fast_path_matches(monkeypatch, fast, lead):
    monkeypatch.setattr(flnn, "FAST_PATH", fast)
    for act in NAMES:
        m = module(act)
        x = torch.randn(*lead, 24)
        with torch.no_grad():
            y = m(x)
        r64 = ACTIVATIONS[act].ref(F.linear(x.double(), m.weight.double(), m.bias.double()), SLOPE)
        assert_matches(y, r64, eager_module(m, x), red=24, what=f"{act} fast={fast}")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
def test_no_grad_paths_under_transforms_and_modes(monkeypatch, fast):
    """No-grad calls under vmap, a dispatch mode, FakeTensorMode and a tensor subclass give
    PyTorch's result (the fast paths must hand these to the general path, not to raw pointers)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(flnn, "FAST_PATH", fast)
    m = module("gelu")
    xs = torch.randn(3, 4, 24)

    def ref(x):
        return F.gelu(F.linear(x, m.weight, m.bias))

    class Seen(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))
    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(m)(xs), ref(xs))
        torch.testing.assert_close(torch.func.vmap(lambda x: fl.linear_act(x, m.weight, m.bias, "gelu"))(xs),
                                   ref(xs))
        with Seen() as mode:
            y = m(xs[0])
        torch.testing.assert_close(y, ref(xs[0]))
        assert mode.ops, "the dispatch mode saw no op: a raw-pointer kernel ran under it"
        with FakeTensorMode() as fake:
            fm = fl.FusedLinear(24, 16, activation="gelu")
            assert fm(fake.from_tensor(xs)).shape == (3, 4, 16)


def test_env_reader_matches_os_environ(monkeypatch):
    """FASTLAYERS_BACKEND is read on every call through a cheap reader; it must agree with
    os.environ whatever is set, changed or removed after import."""
    from fastlayers import backends as B
    for value in ("reference", "cpp", "", "triton"):
        monkeypatch.setenv("FASTLAYERS_BACKEND", value)
        assert B._read_env() == os.environ.get("FASTLAYERS_BACKEND") == value
    monkeypatch.delenv("FASTLAYERS_BACKEND")
    assert B._read_env() is None and B.forced() is None


# FusedLinear(activation="none") with no backend forced: F.linear (nn.Linear's own forward) where
# fastlayers has nothing to add, the cpp backend's oneDNN GEMM where plain_linear_gain says so.
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n", [(3, 16, 8), (64, 256, 256)], ids=["small", "large"])
@pytest.mark.parametrize("fused_min", ["default", "lowered"])
def test_fused_linear_none_routes(monkeypatch, grad, dtype, m, k, n, fused_min):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    if fused_min == "lowered":  # "large" on the oneDNN route (by default it is below FUSED_MIN_MACS)
        monkeypatch.setattr(gemm, "FUSED_MIN_MACS", 1 << 20)
    gemm._probe_onednn(dtype)  # (its own F.linear calls are not the route's)
    calls = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(_dispatch, "_F_LINEAR", F.linear)  # the tiny gate's own F.linear
    for name in ("_FAST_TINY_LINEAR", "_FAST_SMALL_LINEAR"):  # ... and the C++ gates' at::linear, where built
        fast = getattr(_dispatch, name)
        if fast is not None:
            monkeypatch.setattr(_dispatch, name,
                                (lambda f: lambda *a: (lambda y: y if y is None else calls.append(1) or y)(f(*a)))(fast))
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, dtype=dtype)
    fused = fl.FusedLinear(k, n, activation="none", dtype=dtype)
    fused.load_state_dict(lin.state_dict())
    x = torch.randn(2, m, k, dtype=dtype, requires_grad=grad)
    x64, w64, b64 = (leaf(t.detach().double()) for t in (x, lin.weight, lin.bias))
    with torch.set_grad_enabled(grad):
        y = fused(x)
        ours = not calls
        calls.clear()
        eager, ref64 = real(x, lin.weight, lin.bias), real(x64, w64, b64)
    assert ours == gemm.plain_linear_gain(2 * m, k, n, dtype), "route"  # (not opted in to prepacking)
    assert ours == (m * 2 * k * n >= max(gemm.ONEDNN_MIN_MACS, gemm.FUSED_MIN_MACS) and bool(gemm._probe_onednn(dtype))
                    and (dtype != torch.float32 or gemm._FP32_MM_ONEDNN))  # fp32: MKL's own sgemm on Intel
    assert_matches(y, ref64, eager, red=k)
    if grad:
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, fused.weight, fused.bias), g)
        exp = torch.autograd.grad(eager, (x, lin.weight, lin.bias), g)
        exp64 = torch.autograd.grad(ref64, (x64, w64, b64), g.double())
        for a, b, c, red in zip(got, exp, exp64, (n, 2 * m, 2 * m)):
            assert_matches(a, c, b, red=red)


def test_fused_linear_none_errors_are_nn_linear_errors(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    lin, fused = torch.nn.Linear(4, 3), fl.FusedLinear(4, 3, activation="none")
    for x in (torch.randn(2, 5), torch.randn(2, 4, dtype=torch.float64)):
        with pytest.raises(RuntimeError) as want:
            lin(x)
        with pytest.raises(RuntimeError) as got:
            fused(x)
        assert str(got.value) == str(want.value)


# fp32 GEMMs on oneDNN where MKL's sgemm is generic (gemm._mm): forced on small shapes, the forward
# and backward of linear_act, gated_linear and linear_cross_entropy (its logits GEMMs), with
# transposed and sliced operands, against float64 PyTorch.
@pytest.mark.skipif(not gemm._probe_onednn(torch.float32), reason="this torch has no usable oneDNN fused linear")
@pytest.mark.parametrize("layout", ["contiguous", "x_transposed", "w_transposed", "sliced"])
def test_fp32_gemms_on_onednn(monkeypatch, layout):
    monkeypatch.setattr(gemm, "_FP32_MM_ONEDNN", True)
    monkeypatch.setattr(gemm, "ONEDNN_MIN_MACS", 1)
    monkeypatch.setattr(gemm, "TORCH_OPS_MAX_OUT", 0)
    monkeypatch.setattr(gemm, "FUSED_MIN_MACS", 0)  # (small shapes: our routes, not PyTorch's ops)
    monkeypatch.setattr(fl_loss, "TORCH_MAX_LOGITS", 0)
    calls = []
    real = gemm._linear_pointwise
    monkeypatch.setattr(gemm, "_linear_pointwise", lambda *a: calls.append(a[3]) or real(*a))
    g = torch.Generator().manual_seed(0)
    m, k, n = 37, 29, 23
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / 4
    wu = torch.randn(n, k, generator=g) / 4
    if layout == "x_transposed":
        x = x.t().contiguous().t()
    elif layout == "w_transposed":
        w, wu = w.t().contiguous().t(), wu.t().contiguous().t()
    elif layout == "sliced":
        x = torch.randn(m, 2 * k, generator=g)[:, ::2]
    b = torch.randn(n, generator=g)
    t = torch.randint(0, n, (m,), generator=g)
    ops = {
        "linear_act": (lambda x, w, wu, b: fl.linear_act(x, w, b, "gelu"),
                       lambda x, w, wu, b: F.gelu(F.linear(x, w, b))),
        "gated": (lambda x, w, wu, b: fl.gated_linear(x, w, wu, b, None, "silu"),
                  lambda x, w, wu, b: F.silu(F.linear(x, w, b)) * F.linear(x, wu)),
        "linear_ce": (lambda x, w, wu, b: fl.linear_cross_entropy(x, w, t, b),
                      lambda x, w, wu, b: F.cross_entropy(F.linear(x, w, b), t)),
    }
    with fl.use_backend("cpp"):
        for name, (ours, torch_op) in ops.items():
            calls.clear()
            ins = [leaf(v) for v in (x, w, wu, b)]
            y = ours(*ins)
            gy = torch.randn(y.shape, generator=g)
            got = [y.detach()] + list(torch.autograd.grad(y, ins, gy, allow_unused=True))
            assert calls, f"{name}: no GEMM went to oneDNN"
            ins32 = [leaf(v) for v in (x, w, wu, b)]
            y32 = torch_op(*ins32)
            eager = [y32.detach()] + list(torch.autograd.grad(y32, ins32, gy, allow_unused=True))
            ins64 = [leaf(v.double()) for v in (x, w, wu, b)]
            y64 = torch_op(*ins64)
            ref = [y64.detach()] + list(torch.autograd.grad(y64, ins64, gy.double(), allow_unused=True))
            for i, (a, e, r) in enumerate(zip(got, eager, ref)):
                if r is None:
                    assert a is None or not a.any(), (name, i)
                    continue
                assert_matches(a, r, e, red=max(m, k, n), what=f"{name} output {i}")


@pytest.mark.parametrize("act", ["gelu_tanh", "silu", "quick_gelu"])
def test_sigmoid_based_derivatives_as_accurate_as_torch(act):
    """act'(z) through the cpp backend's backward on a dense grid of z (the derivative times
    dy = 1, w = 1): max error vs float64 no larger than PyTorch's own fp32 error. 1 - sigmoid
    computed by subtraction lost the low bits there (gelu_tanh' was off by 2e-6, PyTorch 1e-6)."""
    z = torch.linspace(-30, 30, 120001)
    x = z[:, None].clone().requires_grad_()
    with fl.use_backend("cpp"):
        y = fl.linear_act(x, torch.ones(1, 1), None, act)
    (ours,) = torch.autograd.grad(y, x, torch.ones_like(y))
    ref = ACTIVATIONS[act].ref
    x64, x32 = z.double()[:, None].requires_grad_(), z[:, None].clone().requires_grad_()
    (d64,) = torch.autograd.grad(ref(x64, SLOPE), x64, torch.ones_like(x64))
    (d32,) = torch.autograd.grad(ref(x32, SLOPE), x32, torch.ones_like(x32))
    err, torch_err = ((d.double() - d64).abs().max().item() for d in (ours, d32))
    assert err <= torch_err, (err, torch_err)


@pytest.mark.parametrize("dtype,act,aten", [(torch.bfloat16, "gelu", True), (torch.bfloat16, "silu", False),
                                            (torch.bfloat16, "gelu_tanh", False), (torch.float32, "gelu", False),
                                            (torch.float16, "gelu", False)], ids=str)
def test_forward_pass_where_aten_is_faster(monkeypatch, dtype, act, aten):
    """With grad, once the bias is in the GEMM, the activation pass runs in PyTorch's kernel where
    that measured faster (cpu/activation.py _ATEN_PASS: bf16 GELU), else in ours; both give y = act(z) with z kept.
    (128 x 48 -> 40: above gemm.TORCH_OPS_MAX_OUT, where every activation is PyTorch's own.)"""
    calls = []
    real = _ext._C.bias_act_forward
    monkeypatch.setattr(_ext._C, "bias_act_forward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    monkeypatch.setattr(gemm, "FUSED_MIN_MACS", 0)  # (a small shape on the fused path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 48, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(40, 48, generator=g) / 7).to(dtype).requires_grad_()
    b = torch.randn(40, generator=g).to(dtype).requires_grad_()
    y = fl.linear_act(x, w, b, act)
    assert bool(calls) != aten
    ref = ACTIVATIONS[act].ref(F.linear(x, w, b), SLOPE)
    if aten:  # PyTorch's GEMM with the bias inside, then PyTorch's kernel: eager's values exactly
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    got = torch.autograd.grad(y, (x, w, b), dy)
    r64 = [leaf(t.detach().double()) for t in (x, w, b)]
    y64 = ACTIVATIONS[act].ref(F.linear(*r64), SLOPE)
    exp64 = torch.autograd.grad(y64, r64, dy.double())
    exp = torch.autograd.grad(ref, (x, w, b), dy)
    assert_matches(y, y64, ref, red=48)
    for a, c, e, red in zip(got, exp64, exp, (40, 128, 128)):
        assert_matches(a, c, e, red=red)


@pytest.mark.skipif(not gemm._probe_onednn(torch.float32), reason="this torch has no usable oneDNN fused linear")
def test_weight_gradient_gemm_route(monkeypatch):
    """gemm._mm: a transposed source with a long reduction and a narrow output (the weight gradient
    dz^T @ x of a wide-N, narrow-K layer) stays on MKL, where oneDNN's transposing copy lost;
    otherwise fp32 GEMMs go to oneDNN where MKL's sgemm is generic. Same values either way."""
    monkeypatch.setattr(gemm, "_FP32_MM_ONEDNN", True)
    calls = []
    real = gemm._linear_pointwise
    monkeypatch.setattr(gemm, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    dz, x = torch.randn(4096, 512, generator=g), torch.randn(4096, 256, generator=g)
    for a, b, onednn in [(dz.t(), x, False),                  # reduction 4096 > 2048, width 256
                         (dz.t()[:, :2048], x[:2048], True),  # reduction 2048
                         (dz.t(), torch.randn(4096, 1024, generator=g), True),  # width 1024
                         (dz.t().contiguous(), x, True)]:     # a contiguous source
        calls.clear()
        out = gemm._mm(a, b)
        assert bool(calls) == onednn, (tuple(a.shape), b.shape[1], a.is_contiguous())
        torch.testing.assert_close(out, torch.mm(a.double(), b.double()).float(), rtol=1e-5, atol=2e-3)


def test_probe_runs_outside_the_callers_autocast(monkeypatch):
    """The first oneDNN call of a process may come under autocast (a bf16 loss under
    torch.autocast): the probe must still compare like with like (it raised 'Float did not match
    BFloat16' from inside its allclose)."""
    monkeypatch.setattr(gemm, "_onednn_ok", {})
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(512, 256, generator=g).bfloat16()
    w = (torch.randn(4096, 256, generator=g) * 0.05).bfloat16()
    t = torch.randint(0, 4096, (512,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fl.linear_cross_entropy(h, w, t)
    ref = F.cross_entropy(F.linear(h.float(), w.float()), t)
    torch.testing.assert_close(loss.float(), ref, rtol=2e-2, atol=2e-2)
    assert gemm._onednn_ok  # probed (under autocast's own off switch)
