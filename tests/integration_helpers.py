"""Shared by the integration tests (swap, compile, autocast, ddp, trust, fuzz): whether a backend can
run here, and fp32 tolerances for whole models. (The `backend` fixture is conftest.py's.)"""
from __future__ import annotations

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
