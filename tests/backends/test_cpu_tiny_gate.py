"""The tiny no-grad gate (fastlayers._dispatch.tiny_cpu_linear): a CPU linear with at most
gemm.TORCH_OPS_MAX_OUT outputs and nothing needing grad runs PyTorch's own F.linear + activation
(in place) before any other check. It must give PyTorch's values bit for bit, leave the inputs
alone, and hand everything it is not sure of to the general path, which checks and raises.
Every gate test runs twice: with the C++ gate (fastlayers._fastpath, csrc/torch/fastpath.cpp)
in front of the Python one, and with the Python gate alone (as where _fastpath is not built)."""
import threading

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from fastlayers import _dispatch
from fastlayers.activations import ACTIVATIONS, NAMES
from fastlayers.backends.cpu import gemm  # the tunables live there: patched there
from fastlayers.backends.cpu import softmax as cpu_softmax

from conftest import INF, SPECIAL

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SLOPES = {"leaky_relu": [0.01, -0.2, 0.0]}


FAST = _dispatch._FAST_TINY_LINEAR  # the C++ gate, or None where fastlayers._fastpath is not built


class Calls(list):
    mode = ""


def record_gates(monkeypatch, mode: str, cxx_attr: str, fast, python_attrs) -> "Calls":
    """Records in the returned list which gate took each call: "cxx" (the C++ gate _dispatch.<cxx_attr>
    returned a tensor) or "python" (the Python gate called one of _dispatch.<python_attrs>); no
    backend forced. mode "python": the C++ gate switched off (as where _fastpath is not built)."""
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    calls = Calls()
    calls.mode = mode
    if mode == "python":
        monkeypatch.setattr(_dispatch, cxx_attr, None)
    elif fast is None:
        pytest.skip("fastlayers._fastpath is not built (torch did not import at build time)")
    else:
        monkeypatch.setattr(_dispatch, cxx_attr,
                            lambda *a: (lambda y: y if y is None else calls.append("cxx") or y)(fast(*a)))
    for name in python_attrs:
        real = getattr(_dispatch, name)
        monkeypatch.setattr(_dispatch, name, (lambda f: lambda *a, **kw: calls.append("python") or f(*a, **kw))(real))
    return calls


@pytest.fixture(params=["cxx", "python"])
def gate_calls(request, monkeypatch):
    """The tiny linear gate's calls (record_gates)."""
    return record_gates(monkeypatch, request.param, "_FAST_TINY_LINEAR", FAST, ["_F_LINEAR"])


def expected_gate(calls, act: str) -> str:
    """The gate that takes a call the gates admit: the C++ one, but for what it has no in-place
    ATen op for (quick_gelu) and where it is switched off."""
    return "cxx" if calls.mode == "cxx" and act != "quick_gelu" else "python"


def same_in_threads(fn, ref: torch.Tensor, threads: int = 4, calls: int = 200) -> None:
    """fn() from several Python threads at once (the C++ gates release the GIL on larger calls):
    every result is ref, bit for bit, and none raised."""
    out, errors = [], []

    def work():
        try:
            for _ in range(calls):
                out.append(fn())
        except Exception as e:  # surfaced below
            errors.append(e)
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors and len(out) == threads * calls
    for y in out:
        same_bits(y, ref)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(a), torch.signbit(b)), "signs of zero differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", NAMES)
def test_tiny_gate_is_pytorch_bit_for_bit(gate_calls, act, dtype):
    """Every activation and dtype, special pre-activations included (K = 1 and a unit weight make
    z the special values themselves), 1-D / 2-D / 3-D x, with and without bias: the gate's result
    is act.ref(F.linear(x, w, b)) to the bit, and the inputs are untouched."""
    a = ACTIVATIONS[act]
    g = torch.Generator().manual_seed(0)
    special = torch.tensor(SPECIAL + INF, dtype=torch.float64).to(dtype).view(-1, 1)
    cases = [(special, torch.ones(7, 1, dtype=dtype), None),
             (special, torch.ones(7, 1, dtype=dtype), torch.zeros(7, dtype=dtype))]
    for lead, k, n in [((), 19, 23), ((1,), 19, 23), ((5,), 19, 23), ((2, 3), 19, 23),
                       ((64,), 64, 64)]:  # (64: 2^18 multiply-adds, the C++ gate releases the GIL)
        x = torch.randn(*lead, k, generator=g).to(dtype)
        w = (torch.randn(n, k, generator=g) / 4).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        cases += [(x, w, b), (x, w, None), (x, w.t().contiguous().t(), b[:1].expand(n))]
    for slope in SLOPES.get(act, [0.01]):
        for x, w, b in cases:
            before = [t.clone() for t in (x, w, b) if t is not None]
            with torch.no_grad():
                gate_calls.clear()
                y = _dispatch.tiny_cpu_linear(x, w, b, a, slope)
                assert y is not None and gate_calls == [expected_gate(gate_calls, act)]
                y_public = fl.linear_act(x, w, b, act, slope)
                assert len(gate_calls) == 2, "fl.linear_act did not take the gate"
            ref = a.ref(F.linear(x, w, b), slope)
            same_bits(y, ref)
            same_bits(y_public, ref)
            for t, t0 in zip((t for t in (x, w, b) if t is not None), before):
                same_bits(t, t0)


def test_fused_linear_takes_the_gate(gate_calls, monkeypatch):
    # (where _fastpath is built, FusedLinear's small-call C++ gate answers these calls before the
    # tiny gate: test_cpu_small_calls.py; here it is off, as where the gate refuses a call)
    monkeypatch.setattr(_dispatch, "_FAST_SMALL_LINEAR", None)
    torch.manual_seed(0)
    for act in NAMES:
        m = fl.FusedLinear(64, 64, activation=act)
        x = torch.randn(1, 64)
        with torch.no_grad():
            y = m(x)
        assert gate_calls == [expected_gate(gate_calls, act)], f"{act}: FusedLinear did not take the gate"
        gate_calls.clear()
        same_bits(y, ACTIVATIONS[act].ref(F.linear(x, m.weight, m.bias), m.negative_slope))
        y = m(x)  # grad needed (the parameters require it): the general path, differentiable
        assert not gate_calls and y.requires_grad


def refused(x, w, b=None, act="relu"):
    """The gate hands the call to the general path."""
    return _dispatch.tiny_cpu_linear(x, w, b, ACTIVATIONS[act], 0.01) is None


def test_tiny_gate_refuses_what_it_must_not_take(gate_calls, monkeypatch):
    x, w, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
    with torch.no_grad():
        assert not refused(x, w, b) and not refused(x, w) and not refused(x[0], w, b)
        assert not refused(x, torch.nn.Parameter(w), torch.nn.Parameter(b))
        # size: M * N above the limit, and K = 0 (M unknown)
        assert refused(torch.randn(gemm.TORCH_OPS_MAX_OUT // 4 + 1, 8), w, b)
        assert not refused(torch.randn(gemm.TORCH_OPS_MAX_OUT // 4, 8), w, b)
        assert refused(torch.randn(5, 0), torch.randn(4, 0), b)
        # layouts and tensor kinds the general path refuses or routes elsewhere
        assert refused(x.to_sparse(), w, b) and refused(x, w.to_sparse(), b)
        assert refused(x, w.to_sparse_csr(), b) and refused(x.to_mkldnn(), w, b)
        assert refused(x, w, b.to_sparse()) and refused(x, w, b.to_mkldnn())
        nested = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)])
        assert refused(nested, w, b)
        assert refused(x.long(), w.long(), b.long()) and refused(x.to(torch.complex64), w, b)
        assert refused(torch.randn(2, 8, device="meta"), w, b) and refused(x, w.to("meta"), b)

        class Sub(torch.Tensor):
            pass
        assert refused(x.as_subclass(Sub), w, b) and refused(x, w.as_subclass(Sub), b)
        assert refused(x, w, b.as_subclass(Sub))
        # arguments F.linear rejects: the general path raises fastlayers' errors
        assert refused(x, torch.randn(4, 7), b) and refused(x, torch.randn(4, 8, 1), b)
        assert refused(x, torch.randn(8), None) and refused(x, w, torch.randn(5))
        # biases F.linear would broadcast, against the (out_features,) contract
        assert refused(x, w, b.view(1, 4)) and refused(x, w, b[:1]) and refused(x, w, b[0])
        assert refused(x, w.double(), b) and refused(x, w, b.double()) and refused(torch.tensor(1.0), w, b)
        with pytest.raises(fl.ShapeError, match="linear_act"):
            fl.linear_act(x, torch.randn(8), None)
        with pytest.raises(fl.ShapeError, match="linear_act"):
            fl.linear_act(x, w, torch.randn(5))
        with pytest.raises(fl.DTypeError, match="linear_act"):
            fl.linear_act(x.long(), w.long(), b.long())
        with pytest.raises(TypeError, match="linear_act"):
            fl.linear_act(x, w.to_sparse(), b)
        with pytest.raises(TypeError, match="linear_act"):
            fl.linear_act(nested, w, b)
        with pytest.raises(fl.DeviceError, match="linear_act"):
            fl.linear_act(x, w.to("meta"), b)
        # a backend forced elsewhere, or a forced cpp route: the backend runs its own kernels
        for name in ("reference", "triton"):
            with fl.use_backend(name):
                assert refused(x, w, b)
        with fl.use_backend("cpp"):
            assert not refused(x, w, b)
        monkeypatch.setenv("FASTLAYERS_BACKEND", "reference")
        assert refused(x, w, b)
        monkeypatch.delenv("FASTLAYERS_BACKEND")
        monkeypatch.setattr(gemm, "ROUTE", "mkl")
        assert refused(x, w, b)
        monkeypatch.setattr(gemm, "ROUTE", "auto")
        # transforms, dispatch modes, jit.trace: the general path's composite / registered op
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))
        with Mode():
            assert refused(x, w, b)
        seen = []
        torch.func.vmap(lambda r: seen.append(refused(r, w, b)) or r)(x)
        assert seen == [True]
        traced = []
        torch.jit.trace(lambda t: traced.append(refused(t, w, b)) or t * 1, x, check_trace=False)
        assert traced == [True]
    # grad: needed only when enabled and something requires it
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    assert refused(xg, w, b) and refused(x, wg, b) and refused(x, w, bg)
    assert not refused(x, w, b)  # grad enabled, nothing requires it
    with torch.no_grad():
        assert not refused(xg, wg, bg)
    with torch.inference_mode():
        assert not refused(xg, wg, bg)


needs_fastpath = pytest.mark.skipif(FAST is None, reason="fastlayers._fastpath is not built "
                                    "(torch did not import at build time)")


@needs_fastpath
def test_cxx_gate_leaves_torch_function_modes_to_python(gate_calls):
    """F.linear calls an active TorchFunctionMode; at::linear in C++ would not: the C++ gate refuses,
    and the Python gate's F.linear shows the mode the call, as before."""
    from torch.overrides import TorchFunctionMode
    seen = []

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))
    x, w, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
    with torch.no_grad():
        with Mode():
            assert FAST(x, w, b, 1, 0.01, gemm.TORCH_OPS_MAX_OUT, gemm.TORCH_OPS_MAX_MACS) is None
            y = fl.linear_act(x, w, b, "relu")
        assert F.linear in seen
        assert gate_calls[-1] == "python"
        same_bits(y, F.relu(F.linear(x, w, b)))


@needs_fastpath
def test_cxx_gate_arguments_and_threads():
    x, w, b = torch.randn(64, 64), torch.randn(64, 64), torch.randn(64)  # 2^18 MACs: GIL released
    with pytest.raises(TypeError, match="7 arguments"):
        FAST(x, w, b, 1, 0.01)
    with torch.no_grad():
        assert FAST(x, w, b, 11, 0.01, 4096, 1 << 20) is None  # quick_gelu: the Python gate's
        assert FAST(x, w, b, 99, 0.01, 4096, 1 << 20) is None
        assert FAST(x, w, b, 1, 0.01, 4095, 1 << 20) is None  # the limits are the caller's
        assert FAST(x, w, b, 1, 0.01, 4096, 1 << 18) is None
        same_in_threads(lambda: fl.linear_act(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)))


@needs_fastpath
def test_fastpath_load_checks(monkeypatch):
    """A _fastpath built against another torch is not used (a warning says to rebuild); one built
    with other activation codes than activations.py refuses to load."""
    from fastlayers import _fastpath
    assert _dispatch._load_fastpath() is _fastpath
    monkeypatch.setattr(_fastpath, "TORCH_VERSION", "0.0.0")
    with pytest.warns(RuntimeWarning, match="rebuild"):
        assert _dispatch._load_fastpath() is None
    monkeypatch.undo()
    codes = dict(_fastpath.ACTIVATION_CODES)
    codes["relu"], codes["gelu"] = codes["gelu"], codes["relu"]
    monkeypatch.setattr(_fastpath, "ACTIVATION_CODES", codes)
    with pytest.raises(ImportError, match="activation codes"):
        _dispatch._load_fastpath()


def test_tiny_gate_under_autocast_is_the_general_path(gate_calls):
    """Autocast: the gate's F.linear casts as the general path does (same dtype, same values)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fl.linear_act(x, w, b, "gelu")
        assert gate_calls
        with fl.use_backend("cpp"):
            monkey_max = gemm.TORCH_OPS_MAX_OUT
            try:
                gemm.TORCH_OPS_MAX_OUT = 0  # the general path, casting itself, then cpp's kernels
                y_general = fl.linear_act(x, w, b, "gelu")
            finally:
                gemm.TORCH_OPS_MAX_OUT = monkey_max
    assert y.dtype == y_general.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_general.float(), rtol=1.6e-2, atol=1e-2)


# Few rows, large K * N: a tiny output can still be a large GEMV. The rule (backends/cpu/gemm.py):
# PyTorch's ops below TORCH_OPS_MAX_MACS; FusedLinear without grad on its prepacked oneDNN weight
# (opted in with fastlayers.prepack, frozen weights) from PACKED_MIN_MACS with K >= PACKED_MIN_K;
# the unpacked oneDNN routes from ONEDNN_MIN_MACS.
needs_onednn = pytest.mark.skipif(not gemm._probe_onednn(torch.float32),
                                  reason="this torch has no usable oneDNN fused linear")


@needs_onednn
@pytest.mark.parametrize("act", ["relu", "gelu", "none", "tanh"])
@pytest.mark.parametrize("m,k,n,packed,unpacked", [
    (1, 1024, 1024, True, False),   # 2^20 MACs, tiny output: packed oneDNN; functional: PyTorch's ops
    (4, 256, 1024, True, False),
    (1, 4096, 1024, True, True),    # 2^22: oneDNN either way (F.linear's MKL GEMV was 2x slower)
    (16, 64, 1024, False, False),   # K = 64: F.linear won there
    (8, 256, 256, False, False),    # 2^19: PyTorch's ops
], ids=lambda v: str(v))
def test_few_rows_large_gemv_routes(gate_calls, monkeypatch, act, m, k, n, packed, unpacked):
    calls = []
    real = gemm._linear_pointwise
    monkeypatch.setattr(gemm, "_linear_pointwise", lambda *a: calls.append(type(a[1])) or real(*a))
    torch.manual_seed(0)
    mod = fl.FusedLinear(k, n, activation=act, prepack=True).requires_grad_(False)
    x = torch.randn(m, k)
    ref = ACTIVATIONS[act].ref(F.linear(x.double(), mod.weight.double(), mod.bias.double()), 0.01)
    with torch.no_grad():
        y_mod = mod(x)
        used_mod, calls[:] = bool(calls), []
        y_fn = fl.linear_act(x, mod.weight, mod.bias, act)
        used_fn = bool(calls)
    assert used_mod == packed, "FusedLinear's no-grad route"
    assert used_fn == (unpacked and gemm._FP32_MM_ONEDNN), "linear_act's no-grad route"  # (fp32: MKL on Intel)
    assert (mod._packed is not None and mod._packed[1] is not None) == packed
    for y in (y_mod, y_fn):
        torch.testing.assert_close(y.double(), ref, rtol=1.3e-6, atol=1e-5 * (k / 16) ** 0.5)
    # the gate takes only what stays on PyTorch's ops
    assert _dispatch.tiny_cpu_linear(x, mod.weight.detach(), None, ACTIVATIONS[act], 0.01) is None or \
        (m * k * n < gemm.TORCH_OPS_MAX_MACS and m * n <= gemm.TORCH_OPS_MAX_OUT)


@needs_onednn
def test_fused_linear_none_packed_gemv_beats_f_linear_route(monkeypatch):
    """FusedLinear(activation="none") runs its packed oneDNN GEMM without grad where that pays,
    and F.linear with grad at the same size (no packed weight then)."""
    calls = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    torch.manual_seed(0)
    mod = fl.FusedLinear(1024, 1024, activation="none", prepack=True).requires_grad_(False)
    x = torch.randn(2, 1024)
    with torch.no_grad():
        y = mod(x)
    assert not calls and gemm.plain_linear_gain(2, 1024, 1024, torch.float32, packed=True)
    mod.requires_grad_(True)
    y_grad = mod(x)
    assert calls and not gemm.plain_linear_gain(2, 1024, 1024, torch.float32)
    torch.testing.assert_close(y, y_grad.detach(), rtol=1.3e-6, atol=1e-4)


# ----------------------------------------------------------------------------- tiny softmax
# fastlayers._dispatch.tiny_cpu_softmax: below cpu_softmax.TORCH_SOFTMAX_MAX_NUMEL elements, with no backend
# forced, softmax / log_softmax are PyTorch's own ops (values, gradients, dtype argument).

FAST_SOFTMAX = _dispatch._FAST_TINY_SOFTMAX


@pytest.fixture(params=["cxx", "python"])
def softmax_calls(request, monkeypatch):
    """The tiny softmax gate's calls (record_gates)."""
    return record_gates(monkeypatch, request.param, "_FAST_TINY_SOFTMAX", FAST_SOFTMAX,
                        ["_SOFTMAX", "_LOG_SOFTMAX"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_tiny_softmax_is_pytorch_bit_for_bit(softmax_calls, log, dtype):
    op, ref = (fl.log_softmax, torch.log_softmax) if log else (fl.softmax, torch.softmax)
    g = torch.Generator().manual_seed(0)
    special = torch.tensor(SPECIAL + INF, dtype=torch.float64)
    cases = [torch.tensor(1.5), torch.randn(7, generator=g), torch.randn(3, 0), torch.randn(0, 4),
             torch.randn(5, 9, generator=g) * 30, torch.randn(2, 3, 4, generator=g),
             torch.randn(4, 6, generator=g).t(), special.view(1, -1), special.view(-1, 1),
             torch.stack([special, special.flip(0)]), torch.full((2, 5), float("-inf"))]
    for x in cases:
        x = x.to(dtype)
        for dim in range(-max(x.dim(), 1), max(x.dim(), 1)):
            for out_dtype in (None, torch.float64):
                before = x.clone()
                softmax_calls.clear()
                y = op(x, dim) if out_dtype is None else op(x, dim, dtype=out_dtype)
                # (a dtype argument is the Python gate's)
                expected = "cxx" if softmax_calls.mode == "cxx" and out_dtype is None else "python"
                assert softmax_calls == [expected], "the gate did not take the call"
                same_bits(y, ref(x, dim) if out_dtype is None else ref(x, dim, dtype=out_dtype))
                same_bits(x, before)
        # gradients: PyTorch's own autograd node
        if x.numel() and x.dim():
            xg = x.detach().clone().requires_grad_()
            xr = x.detach().clone().requires_grad_()
            dy = torch.randn(x.shape, generator=g).to(dtype)
            softmax_calls.clear()
            yg = op(xg, -1)
            assert len(softmax_calls) == 1 and yg.requires_grad
            same_bits(torch.autograd.grad(yg, xg, dy)[0], torch.autograd.grad(ref(xr, -1), xr, dy)[0])


def test_tiny_softmax_refuses_what_it_must_not_take(softmax_calls, monkeypatch):
    x = torch.randn(4, 8)

    def gate(*args, **kw):
        return _dispatch.tiny_cpu_softmax(*args, **kw)
    assert gate(x, -1, None, False) is not None and gate(x, 1, torch.float64, True) is not None
    # a forced backend runs its own kernels, at every size
    for name in ("cpp", "reference"):
        with fl.use_backend(name):
            assert gate(x, -1, None, False) is None
            calls = len(softmax_calls)
            torch.testing.assert_close(fl.softmax(x, -1), torch.softmax(x, -1))
            assert len(softmax_calls) == calls, "a forced backend took the gate"
    monkeypatch.setenv("FASTLAYERS_BACKEND", "cpp")
    assert gate(x, -1, None, False) is None
    monkeypatch.delenv("FASTLAYERS_BACKEND")
    # size
    big = torch.randn(cpu_softmax.TORCH_SOFTMAX_MAX_NUMEL)
    assert gate(big, 0, None, False) is None and gate(big[:-1], 0, None, False) is not None
    # an int-like dim (numpy integer, 0-d integer tensor) takes the gate as its int does (the same
    # bits however dim is spelled); a bool, None or an out-of-range dim: the general path (its errors)
    import numpy as np
    for spelled in (np.int64(1), torch.tensor(1)):
        assert torch.equal(gate(x, spelled, None, False), gate(x, 1, None, False))
    assert gate(x, True, None, False) is None and gate(x, 2, None, False) is None and gate(x, None, None, False) is None
    with pytest.raises(IndexError, match="fastlayers.softmax"):
        fl.softmax(x, 2)
    with pytest.raises(TypeError, match="fastlayers.softmax"):
        fl.softmax(x, True)
    torch.testing.assert_close(fl.softmax(x, np.int64(1)), torch.softmax(x, 1))
    # dtypes, layouts, devices, tensor kinds
    with pytest.raises(fl.DTypeError, match="fastlayers.softmax"):
        fl.softmax(x.long(), -1)
    assert gate(x.long(), -1, None, False) is None and gate(x, -1, torch.int64, False) is None
    assert gate(x.to_sparse(), -1, None, False) is None and gate(x.to("meta"), -1, None, False) is None
    nested = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)])
    assert gate(nested, -1, None, False) is None

    class Sub(torch.Tensor):
        pass
    assert gate(x.as_subclass(Sub), -1, None, False) is None
    assert gate([1.0, 2.0], 0, None, False) is None
    with pytest.raises(TypeError, match="fastlayers.softmax"):
        fl.softmax([1.0, 2.0], 0)
    # jit.trace records fastlayers' registered op
    traced = []
    torch.jit.trace(lambda t: traced.append(gate(t, -1, None, False)) or t * 1, x, check_trace=False)
    assert traced == [None]


@needs_fastpath
def test_cxx_softmax_gate_arguments_and_modes(softmax_calls):
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="4 arguments"):
        FAST_SOFTMAX(x, -1, False)
    limit = cpu_softmax.TORCH_SOFTMAX_MAX_NUMEL
    assert FAST_SOFTMAX(x, 1 << 70, False, limit) is None and FAST_SOFTMAX(x, 1.0, False, limit) is None
    assert FAST_SOFTMAX(x, -3, False, limit) is None and FAST_SOFTMAX(x, 2, True, limit) is None
    assert FAST_SOFTMAX(x, True, False, limit) is None and FAST_SOFTMAX(x, -1, False, 32) is None
    same_bits(FAST_SOFTMAX(x, -2, True, limit), torch.log_softmax(x, -2))
    same_bits(FAST_SOFTMAX(torch.tensor(2.0), 0, False, limit), torch.softmax(torch.tensor(2.0), 0))
    # modes: the Python gate, whose torch.softmax they see
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = []

    class FMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    class DMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    for mode in (FMode(), DMode()):
        with mode:
            assert FAST_SOFTMAX(x, -1, False, limit) is None
            y = fl.softmax(x, -1)
        same_bits(y, torch.softmax(x, -1))
    assert torch.softmax in seen
    assert softmax_calls[-2:] == ["python", "python"]
    # 4 threads x 200 calls, the GIL released (2^14 elements)
    big = torch.randn(128, 128)
    ref = torch.softmax(big, 0)
    same_in_threads(lambda: fl.softmax(big, 0), ref)


# ----------------------------------------------------------------------------- property tests
# Random shapes, layouts, dtypes and special values through the public ops with no backend forced
# (the gates' own path; tests/ops/test_fuzz.py forces each backend): PyTorch's values, bit for bit.
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (make installs it)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

GATE_FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.function_scoped_fixture])  # (delenv: idempotent)


@st.composite
def small_tensors(draw):
    shape = [draw(st.integers(0, 9)) for _ in range(draw(st.integers(0, 4)))]
    x = torch.randn(shape, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
    if x.numel() and draw(st.booleans()):
        flat = x.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIAL + INF))
    x = x.to(draw(st.sampled_from(DTYPES)))
    return x.transpose(0, 1) if x.dim() >= 2 and draw(st.booleans()) else x


@GATE_FUZZ
@given(small_tensors(), st.integers(-4, 3), st.booleans(), st.booleans())
def test_gate_fuzz_softmax(monkeypatch, x, dim, log, grad):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    if not -max(x.dim(), 1) <= dim < max(x.dim(), 1):
        return
    op, ref = (fl.log_softmax, torch.log_softmax) if log else (fl.softmax, torch.softmax)
    xa, xb = (x.detach().clone().requires_grad_(grad) for _ in range(2))
    ya, yb = op(xa, dim), ref(xb, dim)
    same_bits(ya, yb)
    if grad and x.numel():
        dy = torch.randn(ya.shape, generator=torch.Generator().manual_seed(0)).to(ya.dtype)
        same_bits(torch.autograd.grad(ya, xa, dy)[0], torch.autograd.grad(yb, xb, dy)[0])


@GATE_FUZZ
@given(st.sampled_from([(), (1,), (5,), (2, 3)]), st.integers(1, 40), st.integers(1, 40), st.sampled_from(DTYPES),
       st.sampled_from(NAMES), st.booleans(), st.booleans(), st.floats(-1, 1))
def test_gate_fuzz_linear_act(monkeypatch, lead, k, n, dtype, act, bias, strided, slope):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    g = torch.Generator().manual_seed(k * 41 + n)
    x = (torch.randn(*lead, k, generator=g, dtype=torch.float64) * 2).to(dtype)
    w = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype)
    w = w.t().contiguous().t() if strided else w
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype) if bias else None
    with torch.no_grad():
        same_bits(fl.linear_act(x, w, b, act, slope), ACTIVATIONS[act].ref(F.linear(x, w, b), slope))
