"""Exactly PyTorch, or a clear error: inputs off the usual path (strided and expanded arguments,
sparse / fake / subclass tensors, torch.func, TorchScript, torch.export), swap on modules whose
forward reads Python state, special values across softmax chunks, memory that is given back,
and the C++ extension's own argument checks. Each test here failed (wrong values, a crash or a
torch-internal error) before the fix it guards."""
from __future__ import annotations

import gc
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlayers as fl
from fastlayers.activations import NAMES
from integration_helpers import backend_skip_reason

# ----------------------------------------------------------------------------- strided arguments
def test_strided_bias_is_read_with_its_stride(backend):
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    packed = torch.randn(5, 9)
    w, b = packed[:, :8], packed[:, 8]  # b has stride 9, w is a strided view
    for act in ("none", "relu", "gelu"):
        ref = fl.activations.ACTIVATIONS[act].ref(F.linear(x, w, b), 0.01)
        torch.testing.assert_close(fl.linear_act(x, w, b, act), ref)


def test_expanded_bias_and_weight(backend):
    x = torch.randn(3, 4)
    w = torch.randn(1, 4).expand(6, 4)     # stride (0, 1)
    b = torch.tensor(0.5).expand(6)         # stride (0,)
    torch.testing.assert_close(fl.linear_act(x, w, b, "none"), F.linear(x, w, b))
    xl, wl, bl = (t.clone().requires_grad_() for t in (x, torch.randn(6, 4), torch.randn(6)))
    bexp = bl[:1].expand(6)
    fl.linear_act(xl, wl, bexp, "silu").sum().backward()
    g_ours = bl.grad.clone()
    bl.grad = None
    F.silu(F.linear(xl, wl, bl[:1].expand(6))).sum().backward()
    torch.testing.assert_close(g_ours, bl.grad)


def test_huge_expanded_bias_does_not_read_out_of_bounds():
    # A stride-0 bias over 1M outputs: read as contiguous it walked 4 MB past its 4 bytes.
    n = 1 << 20
    y = fl.linear_act(torch.randn(2, 4), torch.zeros(n, 4), torch.tensor(1.0).expand(n), "none")
    assert torch.equal(y, torch.ones(2, n))


def test_strided_grad_output(backend):
    x = torch.randn(5, 6, requires_grad=True)
    w = torch.randn(7, 6, requires_grad=True)
    g = torch.randn(7, 5).t()  # non-contiguous dy
    fl.linear_act(x, w, None, "tanh").backward(g)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.tanh(F.linear(xr, wr)).backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)


# ----------------------------------------------------------------------------- layouts refused
@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_sparse_arguments_are_refused(backend, which):
    args = {"x": torch.randn(4, 8), "weight": torch.randn(5, 8), "bias": torch.randn(5)}
    args[which] = args[which].to_sparse()
    with pytest.raises(TypeError, match=f"fastlayers.linear_act: expected {which} to be a dense"):
        fl.linear_act(args["x"], args["weight"], args["bias"], "relu")


@pytest.mark.parametrize("convert", [lambda t: t.to_sparse(), lambda t: t.to_mkldnn(),
                                     lambda t: torch.nested.nested_tensor([t[0], t[1, :2]])],
                         ids=["sparse", "mkldnn", "nested"])
def test_softmax_layouts_are_refused(backend, convert):
    with pytest.raises(TypeError, match="fastlayers.softmax: expected x to be a dense"):
        fl.softmax(convert(torch.randn(3, 4)), -1)


def test_quantized_is_refused(backend):
    q = torch.quantize_per_tensor(torch.randn(3, 4), 0.1, 0, torch.qint8)
    with pytest.raises(TypeError, match="fastlayers.softmax: expected x to be a floating-point"):
        fl.softmax(q, -1)


# ----------------------------------------------------------------------------- fake tensors, export
def test_fake_tensor_mode_gives_shapes_without_touching_data():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.randn(4, 8)
        assert fl.softmax(x, -1).shape == (4, 8)
        assert fl.log_softmax(x, 0).shape == (4, 8)
        assert fl.linear_act(x, torch.randn(3, 8), torch.randn(3), "gelu").shape == (4, 3)
        m = fl.FusedLinear(8, 3, activation="silu")
        y = m(torch.randn(2, 5, 8, requires_grad=True))
        assert y.shape == (2, 5, 3)
        y.sum().backward()


def test_torch_export_of_fused_modules():
    model = nn.Sequential(fl.FusedLinear(8, 16, activation="gelu"), fl.FusedLinear(16, 4), fl.LogSoftmax(-1))
    x = torch.randn(3, 8)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), model(x))


# ----------------------------------------------------------------------------- torch.func
def _fn(x, w, b):
    return fl.linear_act(x, w, b, "gelu")


def _ref(x, w, b):
    return F.gelu(F.linear(x, w, b))


def test_vmap_over_an_extra_batch_dim(backend):
    xs, w, b = torch.randn(3, 4, 5), torch.randn(6, 5), torch.randn(6)
    torch.testing.assert_close(torch.func.vmap(_fn, (0, None, None))(xs, w, b), _ref(xs, w, b))
    ws = torch.randn(3, 6, 5)  # a batch of weights
    torch.testing.assert_close(torch.func.vmap(_fn, (None, 0, None))(xs[0], ws, b),
                               torch.stack([_ref(xs[0], wi, b) for wi in ws]))
    torch.testing.assert_close(torch.func.vmap(lambda t: fl.softmax(t, -1))(xs), torch.softmax(xs, -1))


def test_grad_and_jacrev(backend):
    x, w, b = (torch.randn(*s, dtype=torch.float64) for s in ((2, 5), (3, 5), (3,)))
    g = torch.func.grad(lambda w: _fn(x, w, b).sum())(w)
    torch.testing.assert_close(g, torch.func.grad(lambda w: _ref(x, w, b).sum())(w))
    j = torch.func.jacrev(lambda x: fl.log_softmax(x, -1))(x)
    torch.testing.assert_close(j, torch.func.jacrev(lambda x: torch.log_softmax(x, -1))(x))


def test_functional_call_with_a_swapped_model(backend):
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    fl.swap(model)
    params = {k: torch.randn_like(v) for k, v in model.named_parameters()}
    x = torch.randn(4, 5)
    out = torch.func.functional_call(model, params, (x,))
    ref = F.linear(F.relu(F.linear(x, params["0.weight"], params["0.bias"])), params["2.weight"], params["2.bias"])
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------- TorchScript, module API
def test_modules_take_input_by_keyword():
    x = torch.randn(2, 10)
    m = fl.FusedLinear(10, 8)
    torch.testing.assert_close(m(input=x), m(x))
    torch.testing.assert_close(fl.Softmax(-1)(input=x), torch.softmax(x, -1))
    torch.testing.assert_close(fl.LogSoftmax(-1)(input=x), torch.log_softmax(x, -1))


@pytest.mark.parametrize("make", [lambda: fl.FusedLinear(8, 5, activation="gelu"),
                                  lambda: fl.FusedLinear(8, 5, bias=False, activation="leaky_relu",
                                                         negative_slope=-0.3),
                                  lambda: fl.Softmax(-1), lambda: fl.LogSoftmax(1), lambda: fl.Softmax()],
                         ids=["fused", "fused-nobias", "softmax", "log_softmax", "softmax-implicit"])
def test_torch_jit_script(backend, make):
    m = make()
    s = torch.jit.script(m)
    torch.jit.script(make())  # a second module of the same class scripts too
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.warns(UserWarning) if getattr(m, "dim", 0) is None else _nullcontext():
        expected = m(x)
    torch.testing.assert_close(s(x), expected)
    s(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_scriptable_model_stays_scriptable_after_swap(backend):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)
            self.norm = nn.LogSoftmax(dim=-1)

        def forward(self, x):
            return self.norm(self.out(self.act(self.fc(x))))

    net = Net()
    x = torch.randn(4, 8)
    ref = torch.jit.script(net)(x)
    fl.swap(net)
    assert isinstance(net.fc, fl.FusedLinear) and isinstance(net.norm, fl.LogSoftmax)
    torch.testing.assert_close(torch.jit.script(net)(x), ref)


def test_rewritten_forward_stays_scriptable(backend):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(F.silu(self.fc(x)))

    net = Net()
    x = torch.randn(4, 8)
    ref = torch.jit.script(net)(x)
    fl.swap(net)
    assert net.fastlayers_swap_report.rewritten == ["<model>"] and net.fc.activation == "silu"
    torch.testing.assert_close(torch.jit.script(net)(x), ref)


@pytest.mark.parametrize("slope", ["0.5", True, None, torch.tensor(0.5, requires_grad=True), [0.1]])
def test_negative_slope_must_be_a_number(backend, slope):
    with pytest.raises(TypeError, match="fastlayers.linear_act: expected negative_slope to be a real number"):
        fl.linear_act(torch.randn(2, 3), torch.randn(4, 3), None, "leaky_relu", slope)
    with pytest.raises(TypeError, match="fastlayers.FusedLinear: expected negative_slope"):
        fl.FusedLinear(3, 4, activation="leaky_relu", negative_slope=slope)


def test_negative_slope_numpy_and_int(backend):
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    for slope in (np.float32(0.25), np.float64(-0.5), 2):
        torch.testing.assert_close(fl.linear_act(x, w, None, "leaky_relu", slope),
                                   F.leaky_relu(F.linear(x, w), float(slope)))


@pytest.mark.parametrize("dim", [np.int64(1), np.int32(-1), torch.tensor(1), torch.tensor(-2)])
def test_softmax_dim_int_likes(backend, dim):
    x = torch.randn(3, 4)
    torch.testing.assert_close(fl.softmax(x, dim), torch.softmax(x, dim))
    torch.testing.assert_close(fl.log_softmax(x, dim), torch.log_softmax(x, dim))


@pytest.mark.parametrize("dim", [True, 1.0, torch.tensor(1.0), "1"])
def test_softmax_dim_not_int(backend, dim):
    with pytest.raises(TypeError, match="fastlayers.softmax: expected dim to be an int"):
        fl.softmax(torch.randn(3, 4), dim)


# ----------------------------------------------------------------------------- swap keeps behaviour
class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.t = 1.0

    def forward(self, x):
        return F.relu(self.fc(x)) / self.t


class _Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.flag = False

    def forward(self, x):
        h = F.gelu(self.fc(x))
        if self.flag:
            h = h * 2
        return h


_SCALE = 1.0


class _Global(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.fc(x)) * _SCALE


class _PlainTensorAttr(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.offset = torch.zeros(4)  # not a buffer: a trace would bake it in

    def forward(self, x):
        return F.silu(self.fc(x)) + self.offset


def _mutate(m):
    global _SCALE
    if isinstance(m, _Scaled):
        m.t = 10.0
    elif isinstance(m, _Flagged):
        m.flag = True
    elif isinstance(m, _Global):
        _SCALE = 3.0
    else:
        m.offset = torch.ones(4)


@pytest.mark.parametrize("cls", [_Scaled, _Flagged, _Global, _PlainTensorAttr])
def test_swap_never_freezes_python_state(backend, cls):
    global _SCALE
    _SCALE = 1.0
    torch.manual_seed(0)
    m, ref = cls(), cls()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 4)
    fl.swap(m)
    assert "freeze" in m.fastlayers_swap_report.why_not_fused()["fc"]
    try:
        _mutate(m)
        _mutate(ref)
        torch.testing.assert_close(m(x), ref(x))
    finally:
        _SCALE = 1.0


def test_swap_still_rewrites_stateless_forwards(backend):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.relu(self.fc(x))

    m = fl.swap(Plain())
    assert m.fastlayers_swap_report.rewritten == ["<model>"]
    assert isinstance(m.fc, fl.FusedLinear) and m.fc.activation == "relu"


# ----------------------------------------------------------------------------- softmax special values
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("op", [fl.softmax, fl.log_softmax])
def test_softmax_nan_reaches_all_inf_chunks(backend, bad, op):
    """A NaN or +inf anywhere in a long row makes every output NaN, also in the 2048-element
    chunks that hold only -inf (attention masks make those common)."""
    x = torch.full((2, 5000), -math.inf)
    x[:, :16] = 1.0
    x[0, 5] = bad
    ours, ref = op(x, -1), getattr(torch, op.__name__)(x, -1)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    assert ours[0].isnan().all()


# ----------------------------------------------------------------------------- memory
def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux only)")
def test_softmax_scratch_is_released_after_a_huge_row():
    code = (
        "import os, torch, fastlayers as fl\n"
        "def rss():\n"
        "    return int(open(f'/proc/{os.getpid()}/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20\n"
        "fl.softmax(torch.randn(2, 64), -1)\n"
        "base = rss()\n"
        "x = torch.randn(2, 2 ** 23)\n"
        "y = fl.softmax(x, -1)\n"
        "del x, y\n"
        "fl.empty_cache()\n"  # (the 64 MB output itself is kept for reuse by design: not what this measures)
        "print(rss() - base)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    grown = float(out.stdout.strip().splitlines()[-1])
    # before the fix each thread kept its 32 MiB fp32 scratch row for the life of the process
    assert grown < 16, f"RSS grew by {grown:.1f} MB after one huge row"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux only)")
@pytest.mark.parametrize("name", ["cpp", "reference"])  # host memory: the Triton kernels hold none
def test_rss_flat_over_many_calls(name):
    x, w, b = torch.randn(8, 64), torch.randn(32, 64), torch.randn(32)
    xg = x.clone().requires_grad_()

    def step():
        fl.linear_act(x, w, b, "gelu")
        fl.softmax(x, -1)
        fl.log_softmax(x, 0)
        fl.linear_act(xg, w, b, "relu").sum().backward()
        fl.softmax(xg, -1).sum().backward()

    with fl.use_backend(name):
        for _ in range(500):
            step()
        gc.collect()
        base = _rss_mb()
        for _ in range(20000 // 5):
            step()
        gc.collect()
    assert _rss_mb() - base < 8, "memory grows with the number of calls"


# ----------------------------------------------------------------------------- the C++ boundary
@pytest.mark.skipif(backend_skip_reason("cpp") is not None, reason="the C++ extension is not built")
def test_extension_checks_its_buffers():
    from fastlayers import _C
    from fastlayers.backends.cpu._ext import _buf
    z, y = torch.randn(4, 5), torch.empty(4, 5)
    with pytest.raises(ValueError, match=r"bias_act_forward: argument 'b' has shape \(4,\), expected \(5,\)"):
        _C.bias_act_forward(_buf(z), _buf(torch.randn(4)), _buf(y), 1, 0.0, 1)
    with pytest.raises(ValueError, match="argument 'b' is not contiguous"):
        _C.bias_act_forward(_buf(z), _buf(torch.randn(5, 2)[:, 0]), _buf(y), 1, 0.0, 1)
    with pytest.raises(ValueError, match="argument 'y' has dtype code 1, expected 0"):
        _C.bias_act_forward(_buf(z), None, _buf(y.double()), 1, 0.0, 1)
    with pytest.raises(ValueError, match="unknown activation code 99"):
        _C.bias_act_forward(_buf(z), None, _buf(y), 99, 0.0, 1)
    with pytest.raises(ValueError, match="argument 'z' has unknown dtype code 7"):
        _C.bias_act_forward((z.data_ptr(), 7, z.shape, z.stride()), None, _buf(y), 1, 0.0, 1)
    with pytest.raises(ValueError, match="argument 'x' is a null pointer"):
        _C.softmax_forward((0, 0, (1, 4, 1), (4, 1, 1)), _buf(torch.empty(1, 4, 1)), False, 1)
    with pytest.raises(ValueError, match=r"softmax_backward: argument 'dx' has shape \(1, 4, 2\)"):
        t = torch.randn(1, 4, 1)
        _C.softmax_backward(_buf(t), _buf(t), _buf(torch.empty(1, 4, 2)), False, 1)
    with pytest.raises(ValueError, match="'saved' and 'dz' are required"):
        _C.act_grad(_buf(z), None, None, None, 3, 0.0, 1)


@pytest.mark.skipif(backend_skip_reason("cpp") is not None, reason="the C++ extension is not built")
def test_extension_codes_match_the_python_tables():
    from fastlayers import _C
    assert dict(_C.ACTIVATION_CODES) == {n: fl.activations.ACTIVATIONS[n].code for n in NAMES}
    assert dict(_C.DTYPE_CODES) == {"float32": 0, "float64": 1, "bfloat16": 2, "float16": 3}
