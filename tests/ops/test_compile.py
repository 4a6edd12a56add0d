"""torch.compile: fastlayers models compile with fullgraph=True and zero graph
breaks, give eager's results forward and backward; every registered op passes opcheck; eager
calls do not go through the registered ops."""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import fastlayers as fl
from fastlayers.ops import linear_act as _la_op
from fastlayers.ops import softmax as _sm_op
from fastlayers.activations import NAMES
from integration_helpers import assert_close_gemm, backend_skip_reason

H = 16


def _mlp(device="cpu"):
    layers = [fl.FusedLinear(8, H, activation=NAMES[0])]
    for i, act in enumerate(NAMES[1:]):
        layers.append(fl.FusedLinear(H, H, activation=act, negative_slope=0.1 * i - 0.2,
                                     bias=i % 2 == 0))
    return nn.Sequential(*layers, fl.Softmax(dim=0), fl.FusedLinear(H, 5), fl.LogSoftmax(dim=-1)).to(device)


def _compare_compiled(model: nn.Module, x: torch.Tensor, **compile_kw) -> None:
    """Compiled vs eager copy: outputs, input and parameter gradients; no graph break."""
    torch._dynamo.reset()
    counters.clear()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, **compile_kw)
    xc, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, exp = compiled(xc), ref(xr)
    assert_close_gemm(out, exp, H)
    g = torch.randn_like(exp)
    out.backward(g)
    exp.backward(g)
    assert_close_gemm(xc.grad, xr.grad, H)
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert_close_gemm(got[name].grad, p.grad, H)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile


def test_compile_fullgraph_forward_backward(backend):
    torch.manual_seed(0)
    _compare_compiled(_mlp(), torch.randn(2, 3, 8))


def test_compile_dynamic_shapes(backend):
    torch.manual_seed(0)
    model = nn.Sequential(fl.FusedLinear(8, H, activation="gelu"), fl.Softmax(-1))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for n in (3, 5, 9):
        x = torch.randn(n, 8)
        torch.testing.assert_close(compiled(x), model(x))


def test_explain_reports_no_graph_break(backend):
    torch._dynamo.reset()
    model = _mlp()
    explanation = torch._dynamo.explain(model)(torch.randn(4, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.fc3 = nn.Linear(8, H), nn.GELU(), nn.Linear(H, H), nn.Linear(H, 4)
        self.sm = nn.LogSoftmax(-1)

    def forward(self, x):
        return self.sm(self.fc3(F.silu(self.fc2(self.act(self.fc1(x))))))


def test_compile_swapped_model(backend):
    """A swap()-ed model, including a forward swap rewrote, compiles without graph breaks."""
    torch.manual_seed(0)
    model = fl.swap(Functional())
    assert model.fastlayers_swap_report.rewritten == ["<model>"]
    _compare_compiled(model, torch.randn(4, 8))


def test_functional_api_compiles(backend):
    torch.manual_seed(0)
    w, b = torch.randn(H, 8, requires_grad=True), torch.randn(H, requires_grad=True)

    def f(x):
        return fl.log_softmax(fl.linear_act(x, w, b, "leaky_relu", 0.3), dim=0).sum()

    torch._dynamo.reset()
    x = torch.randn(4, 8)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))
    with torch.no_grad():  # the inference path compiles too
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


# ----------------------------------------------------------------------------- opcheck
def _linear_cases():
    torch.manual_seed(0)
    for act in NAMES:
        for bias in (True, False):
            slope = -0.2 if act == "leaky_relu" and bias else 0.01
            yield (torch.randn(2, 3, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True),
                   torch.randn(5, requires_grad=True) if bias else None, act, slope)
    # a transposed (non-contiguous) weight, and x not needing a gradient
    yield torch.randn(4, 8), torch.randn(8, 5, requires_grad=True).t(), torch.randn(5), "gelu", 0.01


def test_opcheck_linear_act(backend):
    for args in _linear_cases():
        torch.library.opcheck(torch.ops.fastlayers.linear_act.default, args)


def test_opcheck_linear_act_backward(backend):
    torch.manual_seed(0)
    for act in NAMES:
        x, w = torch.randn(3, 8), torch.randn(5, 8)
        b = torch.randn(5)
        y, z = _la_op.LINEAR_ACT.library(x, w, b, act, 0.01)
        kind = fl.activations.get(act).saves(0.01)
        saved = y if kind == "output" else z if kind == "input" else None
        for needs in ((True, True, True), (False, True, False), (True, False, True)):
            torch.library.opcheck(torch.ops.fastlayers.linear_act_backward.default,
                                  ([torch.randn(3, 5)], [x, w, b, saved], list(needs), act, 0.01))


@pytest.mark.parametrize("shape,dim", [((3, 4, 5), 1), ((3, 4, 5), 2), ((6,), 0), ((), 0),
                                       ((0, 4), 1)])
@pytest.mark.parametrize("log", [False, True])
def test_opcheck_softmax(backend, shape, dim, log):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlayers.softmax.default, (x, dim, log))
    y = _sm_op.SOFTMAX.library(x.detach(), dim, log)
    torch.library.opcheck(torch.ops.fastlayers.softmax_backward.default,
                          ([torch.randn(shape)], [y], [True], dim, log))


# ----------------------------------------------------------------------------- eager cost
def test_eager_does_not_use_registered_ops(backend, monkeypatch):
    """Eager stays on the autograd.Functions: no dispatcher round trip (~2x the per-call cost of
    a tiny layer, measured in bench/). Poison the op entry points and run eager."""
    def boom(*a, **k):
        raise AssertionError("eager call went through the torch.library op")

    monkeypatch.setattr(_la_op.LINEAR_ACT, "library", boom)
    monkeypatch.setattr(_sm_op.SOFTMAX, "library", boom)
    x = torch.randn(3, 8, requires_grad=True)
    _mlp()(x).sum().backward()


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["triton", "reference"])
def test_compile_cuda(name):
    why = backend_skip_reason(name, "cuda")
    if why is not None:
        pytest.skip(f"backend {name!r} unavailable on cuda: {why}")
    torch.manual_seed(0)
    with fl.use_backend(name):
        _compare_compiled(_mlp("cuda"), torch.randn(4, 8, device="cuda"))
        for args in _linear_cases():
            args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                         else a for a in args)
            torch.library.opcheck(torch.ops.fastlayers.linear_act.default, args)


# ----------------------------------------------------------------------------- every definition
def _op_samples():
    """Per op defined on fastlayers/ops/_autograd.py: the registered forward's arguments (small)."""
    g = torch.Generator().manual_seed(5)
    r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x, w, b = r(3, 8), r(5, 8), r(5)
    q, k = r(1, 2, 4, 8).transpose(1, 2), r(1, 2, 4, 8).transpose(1, 2)  # (B, S, H, D) views
    cos, sin = r(1, 4, 1, 8), r(1, 4, 1, 8)
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[:, 0] = True
    return {
        "softmax": (r(3, 4, 5), 1, False),
        "linear_act": (x, w, b, "gelu", 0.01),
        "gated_linear": (x, w, w.clone(), b, None, "silu", 0.01),
        "norm": (r(4, 16), r(16), r(16), r(4, 16), 1e-5, "layer", 1),
        "cross_entropy": (r(5, 7), torch.randint(0, 7, (5,), generator=g), None, -100, 0.1, "mean", False),
        "linear_cross_entropy": (r(4, 8), r(7, 8), r(7), torch.randint(0, 7, (4,), generator=g), -100, 0.0,
                                 "mean", torch.float32, True, True, True),
        "rotary": (q, k, cos, sin, False),
        "attention_softmax": (r(1, 2, 4, 6), mask, 0.5, True, torch.float32, torch.float32),
        "scaled_dot_product_attention": (q, k, r(1, 2, 4, 8).transpose(1, 2), 0.3, True),
    }


def test_every_definition_has_a_sample():
    """New ops built on FusedOp get their registered backward checked below: add a sample there."""
    from fastlayers.ops._autograd import DEFINED
    with_library = {name for name, spec in DEFINED.items() if spec.library is not None}
    assert with_library == set(_op_samples())


@pytest.mark.parametrize("name", sorted(_op_samples()))
def test_opcheck_backward_of_every_definition(backend, name):
    """The registered backward op of each definition (generated from the op's one backward): schema,
    fake kernel and real kernel agree, for every subset of the gradients asked for."""
    from fastlayers.ops._autograd import DEFINED
    spec, args = DEFINED[name], _op_samples()[name]
    inputs, params = args[:spec.n_inputs], args[spec.n_inputs:]
    out = spec.library(*args)
    out = out if isinstance(out, tuple) else (out,)
    outs, extras = out[:spec.n_outputs], out[spec.n_outputs:]
    saved = list(spec.save(tuple(inputs), tuple(outs), tuple(extras), tuple(params)))
    grads = [torch.randn(o.shape, dtype=o.dtype) for o in outs]
    float_in = [i for i, t in enumerate(inputs) if t is not None and t.is_floating_point()]
    for drop in [None] + float_in:
        needs = [i in float_in and i != drop for i in range(spec.n_inputs)]
        torch.library.opcheck(spec.library_backward, (grads, saved, needs, *params),
                              test_utils=("test_schema", "test_faketensor"))
