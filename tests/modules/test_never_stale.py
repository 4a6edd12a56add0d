"""A FusedLinear (and so every Linear of a swapped model) always computes with the weight as it is
now, whoever wrote it: fused and foreach optimizers, `.data` writes, numpy views, raw storage
copies, another process writing shared memory, PEFT's merge. And a forward without grad gives the
bits of the same forward with grad (an evaluation and a training step of one model agree).

Sizes are those of the packed route (K >= 256 and M*K*N >= 2^20, backends/cpu/gemm.py), where a cached
copy of the weight used to be kept; no backend is forced (what users run)."""
import copy
import multiprocessing as mp

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from fastlayers import nn as flnn
from fastlayers.activations import ACTIVATIONS
from fastlayers.backends.cpu import gemm

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)


def _layer(dtype=torch.float32, act="gelu", k=512, n=512, **kw):
    torch.manual_seed(0)
    return fl.FusedLinear(k, n, activation=act, dtype=dtype, **kw)


def _eager(m, x):
    return ACTIVATIONS[m.activation].ref(F.linear(x, m.weight, m.bias), m.negative_slope)


def _check_current(m, x, what):
    """The no-grad output is the with-grad output bit for bit, and eager's values for the weight
    as it is now (a stale weight is off by O(1), far beyond any tolerance)."""
    with torch.no_grad():
        y = m(x)
        ref = _eager(m, x)
    y_grad = m(x).detach() if m.weight.requires_grad else y
    assert torch.equal(y, y_grad), f"{what}: no-grad and with-grad outputs differ"
    tol = 2e-2 if x.dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol, msg=lambda m_: f"{what}: {m_}")


def _train_step(m, x, opt):
    m(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("writer", ["adamw_fused", "adamw_foreach", "sgd_fused", "adagrad_fused", "data_mul",
                                    "data_copy", "numpy", "untyped_storage", "load_state_dict", "no_grad_copy",
                                    "ema", "to_and_back"])
def test_no_grad_forward_sees_every_writer(dtype, writer):
    m = _layer(dtype)
    x = torch.randn(64, 512, dtype=dtype)
    _check_current(m, x, "before")  # a first no-grad call (it used to build a packed copy)
    if writer.startswith(("adamw", "sgd", "adagrad")):
        name, mode = writer.split("_")
        cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[name]
        if dtype == torch.bfloat16 and name == "adagrad":
            pytest.skip("torch's fused Adagrad takes float32 parameters only")
        opt = cls(m.parameters(), lr=0.1, **{mode: True})
        _train_step(m, x, opt)
    elif writer == "data_mul":
        m.weight.data.mul_(0.5)
    elif writer == "data_copy":
        m.weight.data.copy_(torch.randn_like(m.weight))
    elif writer == "numpy":
        if dtype == torch.bfloat16:
            pytest.skip("numpy has no bfloat16: a numpy view of a bf16 weight cannot be made")
        m.weight.detach().numpy()[:] *= 0.5
    elif writer == "untyped_storage":
        m.weight.untyped_storage().copy_(torch.randn_like(m.weight).untyped_storage())
    elif writer == "load_state_dict":
        m.load_state_dict({k: torch.randn_like(v) for k, v in m.state_dict().items()})
    elif writer == "ema":  # an exponential moving average written into the live weights
        m.weight.data.mul_(0.9).add_(torch.randn_like(m.weight), alpha=0.1)
    elif writer == "to_and_back":  # a round trip through another dtype: new storage, old values
        other = torch.float64 if dtype == torch.float32 else torch.float32
        m.to(other)
        with torch.no_grad():
            m.weight.mul_(0.5)
        m.to(dtype)
    else:
        with torch.no_grad():
            m.weight.copy_(torch.randn_like(m.weight))
    _check_current(m, x, writer)


def _hogwild_worker(layer):
    """A Hogwild-style worker: scales the shared weight in place (its own Parameter object: the
    parent's version counter cannot see it)."""
    with torch.no_grad():
        layer.weight.mul_(0.5)
        layer.bias.add_(1.0)


def test_no_grad_forward_sees_another_process_writing_shared_memory():
    m = _layer()
    m.share_memory()
    x = torch.randn(64, 512)
    _check_current(m, x, "before")
    before = m.weight.detach().clone()
    proc = mp.get_context("spawn").Process(target=_hogwild_worker, args=(m,))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    assert torch.equal(m.weight.detach(), before * 0.5), "the worker did not write the shared weight"
    _check_current(m, x, "after the worker's write")


def test_swapped_llama_evaluates_current_weights_after_fused_adamw():
    """HF Trainer's default optimizer (adamw_torch_fused) between two evaluations of a swapped model."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(cfg)
    swapped = fl.swap(copy.deepcopy(plain))
    ids = torch.randint(0, 1000, (4, 32))

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            return model(ids, labels=ids).loss

    def step(model):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        model(ids, labels=ids).loss.backward()
        opt.step()

    torch.testing.assert_close(evaluate(swapped), evaluate(plain), rtol=1e-5, atol=1e-5)
    step(plain)
    step(swapped)
    torch.testing.assert_close(evaluate(swapped), evaluate(plain), rtol=1e-4, atol=1e-4)


def test_peft_merge_and_unload_after_swap_uses_merged_weights():
    """PEFT's merge_and_unload writes the LoRA delta into the base weight through `.data`."""
    peft = pytest.importorskip("peft", reason="peft is not installed")

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(512, 512), torch.nn.Linear(512, 512)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    model = fl.swap(MLP())
    x = torch.randn(64, 512)
    with torch.no_grad():
        model(x)  # a first no-grad forward (it used to cache packed weights)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["fc2"], init_lora_weights=False))
    with torch.no_grad():
        with_adapter = lora(x)
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged(x), with_adapter, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- opt-in prepacking
needs_onednn = pytest.mark.skipif(not gemm._probe_onednn(torch.float32),
                                  reason="this torch has no usable oneDNN fused linear: nothing is prepacked")


def _packed_used(m):
    return m._packed is not None and m._packed[1] is not None


def test_prepacking_is_off_by_default():
    m = _layer()
    m.requires_grad_(False)
    with torch.no_grad():
        m(torch.randn(8, 512))
    assert not m.prepack and not _packed_used(m)


@needs_onednn
def test_prepack_opt_in_packs_frozen_weights_only():
    m = _layer()
    x = torch.randn(8, 512)
    assert fl.prepack(m) == 1
    with torch.no_grad():
        m(x)
    assert not _packed_used(m), "a trainable weight was packed"
    m.requires_grad_(False)
    with torch.no_grad():
        y = m(x)
    assert _packed_used(m)
    torch.testing.assert_close(y, _eager(m, x), rtol=1e-4, atol=1e-4)
    fl.prepack(m, enabled=False)
    with torch.no_grad():
        m(x)
    assert not _packed_used(m)


@needs_onednn
def test_prepacked_copy_refreshed_by_optimizer_steps_and_prepack_again():
    m = _layer()
    x = torch.randn(8, 512)
    fl.prepack(m)
    m.requires_grad_(False)
    _check_current(m, x, "packed")
    m.requires_grad_(True)  # unfreeze, train with a fused optimizer (no version bump), freeze again
    _train_step(m, x, torch.optim.AdamW(m.parameters(), lr=0.1, fused=True))
    m.requires_grad_(False)
    _check_current(m, x, "after a fused AdamW step")
    with torch.no_grad():
        m.weight.mul_(0.5)  # moves the version counter
    _check_current(m, x, "after an in-place write")
    m.weight.data.mul_(0.5)  # unseen by design: the caller promised to call prepack again
    fl.prepack(m)
    _check_current(m, x, "after .data and prepack(model)")


def test_prepack_env_switch_and_pickling(monkeypatch):
    m = _layer(prepack=True)
    m.requires_grad_(False)
    monkeypatch.setattr(flnn, "PREPACK", False)
    with torch.no_grad():
        m(torch.randn(8, 512))
    assert not _packed_used(m)
    clone = copy.deepcopy(m)
    assert clone.prepack and clone._packed is None


# ----------------------------------------------------------------------------- same bits with and without grad
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu", "sigmoid", "tanh", "leaky_relu", "none",
                                 "quick_gelu", "hardswish", "mish"])
@pytest.mark.parametrize("shape", [(4, 16, 16), (128, 48, 40), (64, 512, 512), (256, 256, 1024)], ids=str)
def test_no_grad_gives_the_with_grad_bits(dtype, act, shape):
    """Tiny (PyTorch's ops), the MKL route and the oneDNN routes: FusedLinear and fl.linear_act
    without grad give exactly the bits of the same call with grad (bf16 GELU included)."""
    m_, k, n = shape
    torch.manual_seed(1)
    layer = fl.FusedLinear(k, n, activation=act, dtype=dtype)
    x = torch.randn(m_, k, dtype=dtype)
    with_grad = layer(x).detach()
    fn_grad = fl.linear_act(x, layer.weight, layer.bias, act).detach()
    with torch.no_grad():
        no_grad = layer(x)
        fn_no_grad = fl.linear_act(x, layer.weight, layer.bias, act)
    with torch.inference_mode():
        inference = layer(x)
    assert torch.equal(no_grad, with_grad), "FusedLinear"
    assert torch.equal(inference, with_grad), "FusedLinear under inference_mode"
    assert torch.equal(fn_no_grad, fn_grad), "fl.linear_act"
    if act != "none":  # (FusedLinear("none") is nn.Linear's F.linear where that is faster)
        assert torch.equal(fn_grad, with_grad), "FusedLinear vs fl.linear_act"
