"""fastlayers.swap on models that are changed after the swap ("never stale, never frozen"):
PEFT LoRA, hooks, quantize_dynamic, re-parametrisation and replaced modules after
swap; forwards whose trace evaluated runtime state; TorchScript of rewritten gated forwards;
torch.compile(fullgraph=True) of a freshly swapped model in a fresh process."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlayers as fl

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def _llama_mlp(hidden=32, inter=48):
    from transformers.models.llama.modeling_llama import LlamaMLP
    torch.manual_seed(0)
    return LlamaMLP(transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu"))


class _Block(nn.Module):
    """A gated MLP inside a parent, the shape PEFT's target_modules expect."""

    def __init__(self):
        super().__init__()
        self.mlp = _llama_mlp()

    def forward(self, x):
        return self.mlp(x)


def _gated(model):
    return [g for g, *_ in model.fastlayers_swap_report.gated]


class _Fc(nn.Module):
    """A Linear(8, 8) child `fc`: the small test modules below differ only in their forwards."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)


def _with_lora(peft, cfg, *models):
    """Each model wrapped by PEFT with the same LoRA weights (cfg(): a fresh LoraConfig)."""
    wrapped = []
    for m in models:
        torch.manual_seed(1)
        wrapped.append(peft.get_peft_model(m, cfg()))
    return wrapped


def _same_grads(model, ref, out, exp, rtol):
    """Backward of out.sum() and exp.sum(): every trainable Parameter of ref has model's gradient."""
    out.sum().backward()
    exp.sum().backward()
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            assert got[name].grad is not None, name
            torch.testing.assert_close(got[name].grad, p.grad, rtol=rtol, atol=1e-5)


# ----------------------------------------------------------------------------- changed after swap
def test_lora_after_swap_trains_the_gated_projections():
    peft = pytest.importorskip("peft")
    ref, model = _Block(), _Block()
    model.load_state_dict(ref.state_dict())
    fl.swap(model)
    assert _gated(model) == ["mlp.gate_proj + mlp.up_proj"]
    targets = ["gate_proj", "up_proj", "down_proj"]
    cfg = lambda: peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False)  # noqa: E731
    model, ref = _with_lora(peft, cfg, model, ref)
    x = torch.randn(3, 5, 32)
    out, exp = model(x), ref(x)
    torch.testing.assert_close(out, exp)
    _same_grads(model, ref, out, exp, rtol=1e-4)


def test_lora_after_swap_llama_causal_lm():
    """The user's flow: swap a (tiny) LlamaForCausalLM, then PEFT on the MLP and q_proj."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    ref = transformers.LlamaForCausalLM(cfg)
    model = fl.swap(copy.deepcopy(ref))
    assert model.fastlayers_swap_report.gated
    lora = lambda: peft.LoraConfig(target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"],  # noqa: E731
                                   init_lora_weights=False)
    model, ref = _with_lora(peft, lora, model, ref)
    ids = torch.randint(0, 128, (2, 6))
    out, exp = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-5)
    _same_grads(model, ref, out, exp, rtol=1e-3)


def test_hooks_after_swap_fire():
    mlp = _llama_mlp()
    ref = copy.deepcopy(mlp)
    fl.swap(mlp)
    x = torch.randn(4, 32)
    seen = []
    h = mlp.gate_proj.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    torch.testing.assert_close(mlp(x), ref(x))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], ref.gate_proj(x))
    h.remove()
    # a hook that changes the output
    mlp.up_proj.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    ref.up_proj.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    torch.testing.assert_close(mlp(x), ref(x))


def test_global_hook_after_swap_fires():
    mlp = _llama_mlp()
    fl.swap(mlp)
    seen = []
    h = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        mlp(torch.randn(2, 32))
    finally:
        h.remove()
    assert "Linear" in seen or "FusedLinear" in seen
    assert seen.count("Linear") + seen.count("FusedLinear") == 3


def test_instance_forward_after_swap_is_called():
    """accelerate's offloading hooks replace a module's forward on the instance."""
    mlp = _llama_mlp()
    ref = copy.deepcopy(mlp)
    fl.swap(mlp)
    x = torch.randn(4, 32)
    for m in (mlp, ref):
        inner = m.gate_proj.forward
        m.gate_proj.forward = lambda t, inner=inner: inner(t) + 1
    torch.testing.assert_close(mlp(x), ref(x))


def test_replaced_activation_and_parametrized_weight_after_swap():
    mlp = _llama_mlp()
    ref = copy.deepcopy(mlp)
    fl.swap(mlp)
    x = torch.randn(4, 32)
    mlp.act_fn, ref.act_fn = nn.GELU(), nn.GELU()
    torch.testing.assert_close(mlp(x), ref(x))

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w
    torch.nn.utils.parametrize.register_parametrization(mlp.gate_proj, "weight", Double())
    torch.nn.utils.parametrize.register_parametrization(ref.gate_proj, "weight", Double())
    torch.testing.assert_close(mlp(x), ref(x))


class _GatedAndFunctional(nn.Module):
    """A gated product and a functional activation fused into a Linear in one forward."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.fc = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return F.silu(self.gate(x)) * self.up(x) + F.relu(self.fc(x))


def test_change_that_the_original_forward_cannot_follow_raises():
    """The original forward would apply relu again after the fused FusedLinear(relu): a change
    to the gated Linears raises rather than computing something else."""
    model = _GatedAndFunctional()
    ref = copy.deepcopy(model)
    fl.swap(model)
    x = torch.randn(2, 8)
    torch.testing.assert_close(model(x), ref(x))
    h = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        with pytest.raises(RuntimeError, match="changed since swap"):
            model(x)
    finally:
        h.remove()
    model.gate.register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="changed since swap"):
        model(x)


def test_functional_only_rewrite_ignores_global_hooks():
    class Functional(_Fc):
        def forward(self, x):
            return F.relu(self.fc(x))
    model = Functional()
    ref = copy.deepcopy(model)
    fl.swap(model)
    assert model.fastlayers_swap_report.rewritten
    h = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        x = torch.randn(2, 8)
        torch.testing.assert_close(model(x), ref(x))
    finally:
        h.remove()


def test_lora_before_swap_is_reported():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = _Block()
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["gate_proj", "up_proj", "q_proj"],
                                                      r=4, init_lora_weights=False))
    ref = copy.deepcopy(model)
    fl.swap(model)
    why = model.fastlayers_swap_report.why_not_fused()
    reason = why["base_model.model.mlp.gate_proj.base_layer"]
    assert "LoRA" in reason and "merge_and_unload" in reason
    x = torch.randn(2, 32)
    torch.testing.assert_close(model(x), ref(x))


def test_quantize_dynamic_after_swap():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    model = GPTNeoXForCausalLM(cfg).eval()
    ref = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    fl.swap(model)
    assert model.fastlayers_swap_report.fused  # FusedLinear(gelu): quantized with its activation
    # exact-type matching: a swapped model names FusedLinear too (swap/quant.py)
    qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear, fl.FusedLinear}, dtype=torch.qint8)
    count = lambda m: sum(isinstance(x, torch.ao.nn.quantized.dynamic.Linear) for x in m.modules())  # noqa: E731
    assert count(ref) > 0
    assert count(qmodel) == count(ref)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_quantize_dynamic_after_swap_gated():
    mlp = _llama_mlp().eval()
    ref = torch.ao.quantization.quantize_dynamic(copy.deepcopy(mlp), {nn.Linear}, dtype=torch.qint8)
    fl.swap(mlp)
    q = torch.ao.quantization.quantize_dynamic(mlp, {nn.Linear, fl.FusedLinear}, dtype=torch.qint8)
    count = lambda m: sum(isinstance(x, torch.ao.nn.quantized.dynamic.Linear) for x in m.modules())  # noqa: E731
    assert count(q) == count(ref) == 3
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref(x), rtol=1e-4, atol=1e-4)


def test_quantize_dynamic_default_spec_after_swap_without_plain_linears():
    """quantize_dynamic's default spec names nn.Linear only: swap(linears=False) keeps the plain
    Linears plain, and the gated product falls back to its original forward once quantized."""
    mlp = _llama_mlp().eval()
    ref = torch.ao.quantization.quantize_dynamic(copy.deepcopy(mlp), dtype=torch.qint8)
    fl.swap(mlp, linears=False)
    assert _gated(mlp)
    q = torch.ao.quantization.quantize_dynamic(mlp, dtype=torch.qint8)
    assert sum(isinstance(x, torch.ao.nn.quantized.dynamic.Linear) for x in q.modules()) == 3
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- frozen branches
class _ChildAttr(_Fc):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        y = F.gelu(self.fc(x))
        if self.drop.p > 0:
            y = y * 2
        return y


class _GradMode(_Fc):
    def forward(self, x):
        y = F.gelu(self.fc(x))
        if torch.is_grad_enabled():
            y = y * 2
        return y


class _Autocast(_Fc):
    def forward(self, x):
        y = F.gelu(self.fc(x))
        if torch.is_autocast_enabled("cpu"):
            y = y * 2
        return y


class _ClassAttr(_Fc):
    scale_up = False

    def forward(self, x):
        y = F.gelu(self.fc(x))
        if self.scale_up:
            y = y * 2
        return y


class _RequiresGrad(_Fc):
    def forward(self, x):
        y = F.gelu(self.fc(x))
        if any(p.requires_grad for p in self.fc.parameters()):  # the real Parameters, not Proxies
            y = y * 2
        return y


def _change_child(m):
    m.drop.p = 0.5
    m.eval()  # dropout off: the branch alone differs


def _change_class_attr(m):
    m.scale_up = True


def _freeze(m):
    m.fc.requires_grad_(False)


_FROZEN = [
    (_ChildAttr, _change_child, None),
    (_GradMode, None, torch.no_grad),
    (_Autocast, None, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    (_ClassAttr, _change_class_attr, None),
    (_RequiresGrad, _freeze, None),
]


@pytest.mark.parametrize("cls,change,ctx", _FROZEN, ids=[c.__name__ for c, _, _ in _FROZEN])
def test_runtime_branches_are_not_frozen(cls, change, ctx):
    torch.manual_seed(0)
    model = cls()
    ref = copy.deepcopy(model)
    fl.swap(model)
    for m in (model, ref):
        if change is not None:
            change(m)
    x = torch.randn(4, 8)
    if ctx is None:
        out, exp = model(x), ref(x)
    else:
        with ctx():
            out, exp = model(x), ref(x)
    torch.testing.assert_close(out.float(), exp.float(), rtol=2e-2, atol=2e-2)
    assert not model.fastlayers_swap_report.rewritten
    assert "reads Python state" in model.fastlayers_swap_report.why_not_fused()["fc"]


@pytest.mark.parametrize("proj", ["gated-gelu", "gated-silu", "gated-relu"])
def test_t5_gated_bf16_with_fp32_wo(proj):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense
    torch.manual_seed(0)
    cfg = T5Config(d_model=32, d_ff=64, feed_forward_proj=proj, dropout_rate=0.0)
    ff = T5DenseGatedActDense(cfg).eval()
    ff.to(torch.bfloat16)
    ff.wo.float()  # _keep_in_fp32_modules = ["wo"]
    ref = copy.deepcopy(ff)
    fl.swap(ff)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(ff(x), ref(x))


# ----------------------------------------------------------------------------- TorchScript
def _phi3_mlp():
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3MLP
    torch.manual_seed(0)
    return Phi3MLP(Phi3Config(hidden_size=32, intermediate_size=48, hidden_act="silu"))


@pytest.mark.parametrize("make", [_llama_mlp, _phi3_mlp], ids=["llama", "phi3"])
def test_jit_script_gated_mlp(make):
    mlp = make().eval()
    ref = copy.deepcopy(mlp)
    fl.swap(mlp)
    assert _gated(mlp)
    s = torch.jit.script(mlp)
    x = torch.randn(3, 32)
    torch.testing.assert_close(s(x), ref(x), rtol=1e-5, atol=1e-5)


class _GeGLU(nn.Module):
    """diffusers' GEGLU: one projection chunked, the second half through gelu."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 2 * 24)

    def forward(self, x):
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


def test_jit_script_chunked_geglu_trains():
    torch.manual_seed(0)
    model = _GeGLU()
    ref = copy.deepcopy(model)
    fl.swap(model)
    assert _gated(model) == ["proj"]
    s = torch.jit.script(model)
    x = torch.randn(3, 16)
    out, exp = s(x), ref(x)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    exp.sum().backward()
    torch.testing.assert_close(model.proj.weight.grad, ref.proj.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.proj.bias.grad, ref.proj.bias.grad, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- report
def test_report_says_what_a_fused_linear_returns():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    fl.swap(model)
    text = str(model.fastlayers_swap_report)
    assert "activated output" in text and "hooks" in text


# ----------------------------------------------------------------------------- torch.compile, cold
_COLD = textwrap.dedent("""
    import torch, transformers, fastlayers as fl, copy
    from torch._dynamo.testing import CompileCounter
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    plain = transformers.LlamaForCausalLM(cfg).eval()
    model = fl.swap(copy.deepcopy(plain))
    ids = torch.randint(0, 128, (1, 6))
    counts = []
    for m in (model, plain):
        torch._dynamo.reset()
        cnt = CompileCounter()
        with torch.no_grad():
            out = torch.compile(m, backend=cnt, fullgraph=FULL)(ids).logits
        counts.append(cnt.frame_count)
    with torch.no_grad():
        torch.testing.assert_close(out, plain(ids).logits, rtol=1e-4, atol=1e-4)
    print("GRAPHS", *counts)
""")


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compile_cold_process(fullgraph):
    """The swapped model is compiled first in a fresh process: no eager call warmed it up."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", f"FULL = {fullgraph}\n" + _COLD], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("GRAPHS")][0]
    swapped, plain = map(int, line.split()[1:])
    assert swapped <= plain


def test_lora_after_swap_on_a_fused_pair_raises_instead_of_a_wrong_result():
    """A Linear fused with its activation returns act(x W^T + b); PEFT wrapping it after swap calls
    it as a plain Linear and adds B(A(x)) after the activation. Never a silent wrong result: the
    call raises and says what to do; the unwrapped model, its deepcopy and pickle still work."""
    peft = pytest.importorskip("peft")
    import io
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    fl.swap(model)
    assert isinstance(model[0], fl.FusedLinear) and model[0].activation == "gelu"
    x = torch.randn(4, 16)
    expected = model[2](F.gelu(F.linear(x, model[0].weight, model[0].bias)))
    torch.testing.assert_close(model(x), expected)
    for clone in (copy.deepcopy(model), torch.load(io.BytesIO(_pickled(model)), weights_only=False)):
        torch.testing.assert_close(clone(x), expected)
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["0"], r=4, init_lora_weights=False))
    with pytest.raises(RuntimeError, match="fused with its activation .*PEFT LoRA"):
        lora(x)


def _pickled(model):
    import io
    buf = io.BytesIO()
    torch.save(model, buf)
    return buf.getvalue()


_COLD_MODULES = textwrap.dedent("""
    import torch, fastlayers as fl
    torch.manual_seed(0)
    m = torch.nn.Sequential(fl.FusedLinear(64, 64, activation="gelu"), fl.FusedLinear(64, 64, activation="none"),
                            fl.LogSoftmax(dim=-1))
    x = torch.randn(8, 64)
    out = torch.compile(m, fullgraph=True)(x)   # the first call of anything fastlayers in this process
    torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-5)
    print("OK")
""")


def test_compile_cold_process_fastlayers_modules():
    """FusedLinear (with and without an activation) and LogSoftmax built directly, not by swap,
    compiled with fullgraph=True in a fresh process: no backend import while Dynamo traces."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _COLD_MODULES], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
