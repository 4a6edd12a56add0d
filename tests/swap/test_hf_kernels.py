"""fastlayers through Hugging Face's kernels mechanism (fastlayers/hf.py), the bare activation op
(fastlayers/ops/activation.py) and swap's standalone activation modules (swap/activations.py).

kernelize(model, mode=TRAINING / INFERENCE, device="cpu") with fastlayers.hf.kernel_mapping() on
tiny random Llama / Mistral / Qwen2 / GPT-2 / BERT models: logits, loss and every gradient equal
the original's at float32 tolerance, and every marked module ran fastlayers' op (counted). The
cpp backend is forced so its kernels run at these tiny sizes (unforced, tensors this small take
PyTorch's own ops: see _TORCH_MIN_NUMEL in fastlayers/ops/activation.py).
"""
import copy
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlayers as fl
from fastlayers.activations import ACTIVATIONS
from fastlayers.ops.activation import activation
from fastlayers.swap.activations import Activation as SwapActivation

kernels = pytest.importorskip("kernels", reason="the optional `kernels` package (pip install 'fastlayers[hf]')")
transformers = pytest.importorskip("transformers", reason="the optional `transformers` package")
import fastlayers.hf as flhf  # noqa: E402
from kernels import Mode, kernelize, use_kernel_forward_from_hub, use_kernel_mapping  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _quiet_kernels(caplog):
    # kernelize warns for every marked name without a mapping ("rotary_pos_emb")
    logging.getLogger("kernels").setLevel(logging.ERROR)


def _models():
    from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
    dec = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**dec)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**dec)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**dec)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0)),
        "bert": lambda: BertForMaskedLM(BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=128,
                                                   max_position_embeddings=64)),
    }


MODELS = _models()


def _marked(model):
    """The marked modules kernelize sees: submodules, and the function wrappers transformers attaches
    with use_kernelized_func (``_kernel_funcs``: apply_rotary_pos_emb's)."""
    found = []
    for n, m in model.named_modules():
        if getattr(type(m), "kernel_layer_name", None) in flhf.LAYER_NAMES:
            found.append((n, m))
        for fname, f in getattr(m, "_kernel_funcs", {}).items():
            if getattr(type(f), "kernel_layer_name", None) in flhf.LAYER_NAMES:
                found.append((f"{n}.{fname}", f))
    return found


class _Counter:
    """Counts the calls of fastlayers.hf's ops and checks each marked module made exactly one."""

    def __init__(self, monkeypatch, model):
        self.n = 0
        self.per_module = {}
        import fastlayers.ops.rotary as rotary_mod
        for owner, attr in ((flhf, "rms_norm"), (flhf, "activation"), (rotary_mod, "rotary")):
            orig = getattr(owner, attr)

            def counted(*a, _orig=orig, **k):
                self.n += 1
                return _orig(*a, **k)
            monkeypatch.setattr(owner, attr, counted)
        for name, m in _marked(model):
            m.register_forward_pre_hook(lambda mod, args, name=name: self.per_module.__setitem__(name, self.n))
            m.register_forward_hook(lambda mod, args, out, name=name: self._after(name))

    def _after(self, name):
        assert self.n == self.per_module[name] + 1, f"{name} did not run fastlayers' op exactly once"
        self.per_module[name] = "ran"


@pytest.mark.parametrize("mode", ["training", "inference"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_kernelize_equals_original(arch, mode, monkeypatch):
    torch.manual_seed(0)
    ref = MODELS[arch]().eval()
    model = copy.deepcopy(ref)
    with use_kernel_mapping(flhf.kernel_mapping()):
        kernelize(model, mode=Mode.TRAINING if mode == "training" else Mode.INFERENCE, device="cpu")
    marked = _marked(model)
    assert marked and all("forward" in m.__dict__ for _, m in marked)
    if arch in ("llama", "mistral", "qwen2"):
        assert sum(type(m).kernel_layer_name == "rotary_pos_emb" for _, m in marked) == 2
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad(), fl.use_backend("cpp"):
        model(ids)  # each marked module's first call checks it (probes call the ops too): not counted
    counter = _Counter(monkeypatch, model)
    with fl.use_backend("cpp"):
        if mode == "inference":
            with torch.no_grad():
                want, got = ref(ids).logits, model(ids).logits
            torch.testing.assert_close(got, want)
        else:
            want, got = ref(ids, labels=ids), model(ids, labels=ids)
            torch.testing.assert_close(got.logits, want.logits)
            torch.testing.assert_close(got.loss, want.loss)
            want.loss.backward()
            got.loss.backward()
            for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
                assert (p.grad is None) == (q.grad is None), n
                if p.grad is not None:
                    torch.testing.assert_close(q.grad, p.grad, msg=lambda m, n=n: f"{n}: {m}")
    assert counter.per_module == {n: "ran" for n, _ in marked}
    # None, or (GPT-2's NewGELU) fastlayers' op for float32 / float64 and its own rounding for 16-bit
    assert all(flhf.why_not(m) is None or "float32 / float64 run fastlayers'" in flhf.why_not(m) for _, m in marked)


def test_mapping_shape_and_arguments():
    mp = flhf.kernel_mapping()
    assert set(mp) == set(flhf.LAYER_NAMES)
    assert set(mp["RMSNorm"]) == {"cpu", "cuda"}
    assert set(mp["SiLU"]["cpu"]) == {Mode.TRAINING, Mode.INFERENCE}
    assert mp["GeLU"]["cuda"][Mode.INFERENCE].load() is flhf.GeLU
    assert flhf.Repository("NewGELU") == flhf.Repository("NewGELU")
    assert flhf.kernel_mapping(modes=[Mode.INFERENCE], devices=["cpu"], layers=["RMSNorm"]) == {
        "RMSNorm": {"cpu": {Mode.INFERENCE: flhf.Repository("RMSNorm")}}}
    with pytest.raises(ValueError, match="TORCH_COMPILE"):
        flhf.kernel_mapping(modes=[Mode.TRAINING | Mode.TORCH_COMPILE])
    with pytest.raises(ValueError, match="devices"):
        flhf.kernel_mapping(devices=["mps"])
    with pytest.raises(ValueError, match="RMSNormGated"):
        flhf.kernel_mapping(layers=["RMSNormGated"])


# A (1 + weight) RMSNorm marked "RMSNorm" with LlamaRMSNorm's attribute names (Gemma's formula;
# Qwen3.5's zero-centred norm), and a "GeLU"-marked module computing the tanh approximation.
@use_kernel_forward_from_hub("RMSNorm")
class OnePlusRMSNorm(nn.Module):
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n) * 0.1)
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1.0 + self.weight) * h.to(hidden_states.dtype)  # LlamaRMSNorm's dtypes, another formula


@use_kernel_forward_from_hub("GeLU")
class TanhMarkedGeLU(nn.Module):
    def forward(self, input):
        return F.gelu(input, approximate="tanh")


@pytest.mark.parametrize("mode", [Mode.TRAINING, Mode.INFERENCE])
def test_other_formulas_are_not_mis_mapped(mode, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), OnePlusRMSNorm(64), TanhMarkedGeLU())
    ref = copy.deepcopy(model)
    with use_kernel_mapping(flhf.kernel_mapping()):
        kernelize(model, mode=mode, device="cpu")
    assert all("forward" in m.__dict__ for m in model[1:])  # kernelize did set fastlayers' forward
    calls = []
    monkeypatch.setattr(flhf, "rms_norm", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(flhf, "activation", lambda *a, **k: calls.append(1))
    x = torch.randn(8, 64, requires_grad=True)
    with fl.use_backend("cpp"):
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert not calls
    assert "another formula" in flhf.why_not(model[1]) and "another formula" in flhf.why_not(model[2])


def test_transformers_rmsnorm_classes():
    """transformers' own classes: LlamaRMSNorm is taken, a Qwen3.5 (1 + w) "RMSNormZeroCentered" is
    not a "RMSNorm", and Gemma's RMSNorm (unmarked, (1 + w), attribute eps) would be refused."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    llama = LlamaRMSNorm(32)
    with torch.no_grad():
        llama.weight.normal_()
    assert flhf._rmsnorm_problem(llama) is None
    assert "variance_epsilon" in flhf._rmsnorm_problem(GemmaRMSNorm(32))


@pytest.mark.parametrize("name", ["NewGELU", "QuickGELU", "FastGELU", "GeluTanh"])
def test_bf16_activations_within_twice_hf_error(name):
    """16-bit: fastlayers computes in float32 and rounds once; the eager HF formulas round each step.
    The project's rule: error against float64 at most 2x the module's own (+ a bf16 ulp)."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation, QuickGELUActivation
    mod = {"NewGELU": NewGELUActivation, "QuickGELU": QuickGELUActivation, "FastGELU": FastGELUActivation,
           "GeluTanh": GELUTanh}[name]()
    act = flhf._ACTIVATION_OF[name]
    torch.manual_seed(0)
    x = (torch.randn(256, 160) * 4).to(torch.bfloat16)
    exact = ACTIVATIONS[act].ref(x.double(), 0.0)
    with fl.use_backend("cpp"):
        ours = activation(x, act)
    theirs = mod(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    err, their_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    assert (err <= 2 * their_err + exact.abs() * 2 ** -8 + 1e-6).all()


# ----------------------------------------------------------------------------- the bare activation op
HF_ACTS = ["gelu", "gelu_tanh", "silu", "quick_gelu"]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("act", HF_ACTS)
def test_activation_op_values_and_gradcheck(act, backend):
    torch.manual_seed(0)
    ref = ACTIVATIONS[act].ref
    x = torch.randn(3, 50, 7) * 4
    x[0, 0, :4] = torch.tensor([float("nan"), 0.0, -0.0, 1e20])
    x0 = x.clone()
    xt = x.transpose(1, 2)  # non-contiguous
    with fl.use_backend(backend):
        torch.testing.assert_close(activation(xt, act), ref(xt, 0.0), equal_nan=True)
        x64 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: activation(t, act), (x64,))
        assert torch.autograd.gradgradcheck(lambda t: activation(t, act), (x64,))
        xg = x.clone().requires_grad_()
        xr = x.clone().requires_grad_()
        dy = torch.randn_like(x)
        activation(xg, act).backward(dy)
        ref(xr, 0.0).backward(dy)
        torch.testing.assert_close(xg.grad, xr.grad, equal_nan=True)
    torch.testing.assert_close(x, x0, rtol=0, atol=0, equal_nan=True)  # inputs are never modified


def test_activation_op_edges():
    e = torch.empty(0, 5)
    assert activation(e, "silu").shape == (0, 5)
    with pytest.raises(ValueError, match="fastlayers.activation: unknown activation"):
        activation(torch.randn(3), "swish")
    with pytest.raises(fl.DTypeError, match="fastlayers.activation"):
        activation(torch.ones(3, dtype=torch.int64), "gelu")
    with fl.use_backend("cpp"):
        x = torch.randn(7, 9, dtype=torch.bfloat16)
        y = activation(x, "gelu_tanh")
        assert y.dtype == torch.bfloat16 and y.shape == x.shape


# ----------------------------------------------------------------------------- swap's standalone activations
def test_swap_replaces_gpt2_activation_and_keeps_results():
    torch.manual_seed(0)
    ref = MODELS["gpt2"]().eval()
    model = copy.deepcopy(ref)
    fl.swap(model)
    rep = model.fastlayers_swap_report
    acts = [p for p, new in rep.replaced if "Activation" in new]
    assert acts == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    ids = torch.randint(0, 96, (2, 12))
    with fl.use_backend("cpp"):
        want, got = ref(ids, labels=ids), model(ids, labels=ids)
        torch.testing.assert_close(got.logits, want.logits)
        want.loss.backward()
        got.loss.backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, n=n: f"{n}: {m}")


def test_swap_standalone_activations_left_alone_or_replaced():
    from transformers.activations import GELUActivation, QuickGELUActivation, SiLUActivation

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = GELUActivation(), SiLUActivation(), QuickGELUActivation()
            self.d = TanhMarkedGeLU()

        def forward(self, x):
            return self.d(self.c(self.b(self.a(x * 2))))

    model = Block()
    x = torch.randn(4, 8)
    want = model(x)
    fl.swap(model)
    rep = model.fastlayers_swap_report
    left = dict(rep.left)
    assert "parity" in left["a"] and "parity" in left["b"] and "another formula" in left["d"]
    assert isinstance(model.c, SwapActivation) and model.c.activation == "quick_gelu"
    torch.testing.assert_close(model(x), want)


def test_swap_keeps_llama_gated_activation():
    """Llama's act_fn is inlined into gated_linear by a rewritten forward: swapping it would make
    that forward fall back, so it stays (and is not reported as replaced)."""
    model = MODELS["llama"]()
    fl.swap(model)
    rep = model.fastlayers_swap_report
    assert len(rep.gated) == 2
    assert not [p for p, new in rep.replaced if "Activation" in new]
    assert type(model.model.layers[0].mlp.act_fn).__name__ == "SiLUActivation"


def test_swap_after_kernelize_leaves_kernelized_children_alone():
    """kernelize sets an instance-level forward on Llama's act_fn: swap must not inline it into a
    gated rewrite that would then never run (it used to report the MLP fused while every call fell
    back); the MLP is left alone with the reason, results equal the kernelized model's."""
    torch.manual_seed(0)
    model = MODELS["llama"]()
    with use_kernel_mapping(flhf.kernel_mapping()):
        kernelize(model, mode=Mode.TRAINING, device="cpu")
    ref = copy.deepcopy(model)
    fl.swap(model)
    rep = model.fastlayers_swap_report
    assert not rep.gated, rep
    assert any("instance-level forward" in why for _, why in rep.left), rep.left
    ids = torch.randint(0, 96, (2, 12))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)


# ----------------------------------------------------------------------------- the docs' snippet
def test_docs_snippet_runs():
    text = (ROOT / "docs" / "hf.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    exec(compile(blocks[0], "docs/hf.md", "exec"), {})


# ----------------------------------------------------------------------------- 16-bit rounding
def test_16bit_formula_modules_keep_their_rounding(monkeypatch):
    """NewGELU / QuickGELU round every step in bf16: kernelized or swapped, bf16 inputs give the
    module's own bits, fp32 inputs run fastlayers'; GELUTanh (ATen, one rounding) runs fastlayers'."""
    from transformers.activations import GELUTanh, NewGELUActivation, QuickGELUActivation
    x16 = (torch.randn(64, 300) * 3).to(torch.bfloat16)
    for cls, fastlayers_in_16bit in ((NewGELUActivation, False), (QuickGELUActivation, False), (GELUTanh, True)):
        ref, mod = cls(), cls()
        with use_kernel_mapping(flhf.kernel_mapping()):
            kernelize(mod, mode=Mode.INFERENCE, device="cpu")
        calls = []
        monkeypatch.setattr(flhf, "activation", lambda *a, _c=calls, **k: _c.append(1) or activation(*a, **k))
        with fl.use_backend("cpp"):
            got = mod(x16)
            if not fastlayers_in_16bit:
                assert torch.equal(got, ref(x16)) and not calls
                assert "bfloat16 inputs run its own forward" in flhf.why_not(mod)
            else:
                assert calls and flhf.why_not(mod) is None
            calls.clear()
            torch.testing.assert_close(mod(x16.float()), ref(x16.float()))
            assert calls
        swapped = nn.Sequential(cls())
        fl.swap(swapped)
        assert isinstance(swapped[0], SwapActivation)
        with fl.use_backend("cpp"):
            if not fastlayers_in_16bit:
                assert torch.equal(swapped(x16), ref(x16))
            torch.testing.assert_close(swapped(x16.float()), ref(x16.float()))


# ----------------------------------------------------------------------------- rotary_pos_emb
def _rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


@use_kernel_forward_from_hub("rotary_pos_emb")
def interleaved_rope(q, k, cos, sin, unsqueeze_dim=1):
    """GPT-J's layout marked with Llama's name: not fastlayers.rotary's default."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_every_two(q) * sin, k * cos + _rotate_every_two(k) * sin


def _kernelized_rope(fn, mode):
    """A module whose forward calls the hub-marked rotary function `fn` (use_kernelized_func),
    kernelized with fastlayers' mapping; and the wrapper kernelize gave it for fn."""
    from kernels import use_kernelized_func

    @use_kernelized_func(fn)
    class Attn(nn.Module):
        def forward(self, q, k, cos, sin):
            return fn(q, k, cos, sin)

    attn = Attn()
    with use_kernel_mapping(flhf.kernel_mapping()):
        kernelize(attn, mode=mode, device="cpu")
    return attn, attn._kernel_funcs["rotary_pos_emb"]


def test_rotary_other_layout_is_not_mis_mapped(monkeypatch):
    attn, wrapper = _kernelized_rope(interleaved_rope, Mode.TRAINING)
    assert "forward" in wrapper.__dict__
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    cos, sin = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    want = interleaved_rope.forward.__func__(interleaved_rope, q, k, cos, sin)  # the function itself
    with fl.use_backend("cpp"):
        got = attn(q, k, cos, sin)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "another layout" in flhf.why_not(wrapper)


def test_rotary_16bit_inputs_run_fastlayers_with_eager_bits(monkeypatch):
    """Llama's apply_rotary_pos_emb kernelized: bf16 / fp16 inputs take fastlayers.rotary (its bits are
    eager's: each product and the sum rounded to the dtype), forward and backward."""
    from transformers.models.llama import modeling_llama as L
    import fastlayers.ops.rotary as rotary_mod

    calls = []
    orig = rotary_mod.rotary
    monkeypatch.setattr(rotary_mod, "rotary", lambda *a, **k: calls.append(1) or orig(*a, **k))
    for dtype in (torch.bfloat16, torch.float16):
        attn, wrapper = _kernelized_rope(L.apply_rotary_pos_emb, Mode.TRAINING)
        gen = torch.Generator().manual_seed(3)
        q = (torch.randn(2, 6, 4, 32, generator=gen) * 8).to(dtype).transpose(1, 2)
        k = (torch.randn(2, 6, 2, 32, generator=gen) * 8).to(dtype).transpose(1, 2)
        cos, sin = (torch.randn(2, 6, 32, generator=gen).to(dtype) for _ in range(2))
        g = [torch.randn(2, h, 6, 32, generator=gen).to(dtype) for h in (4, 2)]
        qr, kr = q.detach().requires_grad_(), k.detach().requires_grad_()
        want = type(wrapper).forward(wrapper, qr, kr, cos, sin)  # the function itself
        torch.autograd.backward(want, g)
        qs, ks = q.detach().requires_grad_(), k.detach().requires_grad_()
        calls.clear()
        with fl.use_backend("cpp"):
            got = attn(qs, ks, cos, sin)
        torch.autograd.backward(got, g)
        assert calls and flhf.why_not(wrapper) is None, flhf.why_not(wrapper)
        for a, b in zip((*got, qs.grad, ks.grad), (*want, qr.grad, kr.grad)):
            assert torch.equal(a.detach(), b.detach())


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@use_kernel_forward_from_hub("rotary_pos_emb")
def once_rounded_rope(q, k, cos, sin, unsqueeze_dim=1):
    """Llama's formula computed in float32 and rounded once: another 16-bit rounding than eager's."""
    cd = torch.promote_types(q.dtype, torch.float32)
    cos, sin = cos.unsqueeze(unsqueeze_dim).to(cd), sin.unsqueeze(unsqueeze_dim).to(cd)
    return tuple((x.to(cd) * cos + _rotate_half(x.to(cd)) * sin).to(x.dtype) for x in (q, k))


def test_rotary_other_16bit_rounding_keeps_its_own_16bit_forward():
    attn, wrapper = _kernelized_rope(once_rounded_rope, Mode.INFERENCE)
    q, k = torch.randn(2, 4, 6, 16).bfloat16(), torch.randn(2, 2, 6, 16).bfloat16()
    cos, sin = torch.randn(2, 6, 16).bfloat16(), torch.randn(2, 6, 16).bfloat16()
    with fl.use_backend("cpp"):
        got = attn(q, k, cos, sin)
    want = type(wrapper).forward(wrapper, q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert "bfloat16 inputs run its own forward" in flhf.why_not(wrapper)
