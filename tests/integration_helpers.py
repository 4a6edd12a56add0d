"""Shared by the integration tests (swap, compile, autocast, ddp, trust, fuzz): whether a backend can
run here, fp32 tolerances for whole models, small models, one rank of a gloo process group. (The
`backend` fixture is conftest.py's.)"""
from __future__ import annotations

import os
import sys
from typing import Callable

import pytest
import torch

from conftest import assert_close_fp32

from fastlayers._errors import BackendUnavailableError
from fastlayers.backends import load


def backend_skip_reason(name: str, device: str = "cpu") -> str | None:
    try:
        mod = load(name)
    except BackendUnavailableError as e:
        return str(e)
    return mod.unavailable_reason(torch.device(device))


def assert_close_gemm(actual: torch.Tensor, expected: torch.Tensor, k: int) -> None:
    """Whole-model fp32 results against the original model's: conftest's rule for two fp32 results."""
    assert_close_fp32(actual, expected, red=k)


def hf_causal_lm(name: str):
    """A small Hugging Face causal LM (random weights, no download), or a skip if transformers is missing."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    kw = dict(vocab_size=101, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[name]
    torch.manual_seed(0)
    return cls[1](cls[0](**kw))


def assert_same_grads(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Each Parameter of model has the gradient of ref's Parameter of the same name (rtol 1e-4, atol
    1e-5: fp32 through a few layers), or none where ref's has none."""
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if p.grad is None:
            assert ref_params[n].grad is None, n
            continue
        torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-4, atol=1e-5, msg=n)


def small_model(name: str):
    """A small model with every dropout at 0 (random weights, no download): Hugging Face's "llama",
    "mistral", "qwen2", "gpt2" (LM heads), "bert" (masked LM), or "nanogpt" (tests/nanogpt_model.py);
    a skip if transformers is missing."""
    if name == "nanogpt":
        import nanogpt_model
        return nanogpt_model.GPT(nanogpt_model.GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2,
                                                         n_embd=64, dropout=0.0))
    T = pytest.importorskip("transformers", reason="transformers is not installed")
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**common))
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**common))
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**common))
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                              bos_token_id=0, eos_token_id=0))
    if name == "bert":
        return T.BertForMaskedLM(T.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=128,
                                              max_position_embeddings=64, hidden_dropout_prob=0.0,
                                              attention_probs_dropout_prob=0.0))
    raise KeyError(name)


def run_gloo_rank(rank: int, world: int, store: str, backend: str, body: Callable[[], None]) -> None:
    """One process of a `world`-process gloo group (started by mp.spawn): fastlayers' backend forced
    to `backend` (as in the parent test), one thread, a file rendezvous at `store` (no TCP port to
    pick, so no race with other processes for a free port); runs body() in the group, then leaves
    the process at once."""
    import torch.distributed as dist
    os.environ["FASTLAYERS_BACKEND"] = backend
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        body()
        # Every rank done before any tears down: a rank destroying its gloo group while another
        # still has work in flight aborted once ("terminate called without an active exception"
        # from gloo's threads, 1 run in ~20 on the loaded 2-core machine).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # ... and it aborted again once after the barrier (make test, 2026-12-02, loaded machine): the
    # abort can come from gloo's threads meeting the interpreter's exit. Nothing is left to do
    # here (what rank 0 saved is closed), so leave without running exit-time destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
