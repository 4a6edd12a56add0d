"""CPU benchmarks: whole small models, eager vs fl.swap(model) vs torch.compile(model).

Three models in plain PyTorch with random weights (layer counts kept small for a 2-core CPU):
  bert   a BERT-base-like encoder: hidden 768, 12 heads, intermediate 3072 (GELU), post-LN,
         2 layers; batch 8, seq 128.
  gpt2   a GPT-2-small-like block stack: hidden 768, 12 heads, MLP 3072 (tanh GELU), pre-LN,
         causal attention, 2 layers; batch 4, seq 128.
  vit    a ViT-S-like MLP stack: hidden 384, MLP 1536 (GELU), pre-LN residual MLP blocks,
         4 blocks; batch 8, 197 tokens.
Passes: inference without grad in float32 and bfloat16, one float32 training step (forward,
backward, SGD update). Throughput in tokens/s (images/s for vit) goes to extra_info["throughput"].
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlayers as fl
from harness import QUICK, dtype_name


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.heads, self.causal = heads, causal

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, T, D/H)
        return self.proj(o.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """The Hugging Face MLP-block pattern: fc1 -> activation module -> fc2."""

    def __init__(self, d: int, hidden: int, approximate: str = "none"):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(approximate=approximate), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class BertLayer(nn.Module):  # post-LN
    def __init__(self, d=768, heads=12, hidden=3072):
        super().__init__()
        self.attn, self.ln1 = Attention(d, heads, causal=False), nn.LayerNorm(d)
        self.mlp, self.ln2 = Mlp(d, hidden), nn.LayerNorm(d)

    def forward(self, x):
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class GptBlock(nn.Module):  # pre-LN, causal
    def __init__(self, d=768, heads=12, hidden=3072):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads, causal=True)
        self.ln2, self.mlp = nn.LayerNorm(d), Mlp(d, hidden, approximate="tanh")

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class VitMlpBlock(nn.Module):  # pre-LN residual MLP
    def __init__(self, d=384, hidden=1536):
        super().__init__()
        self.ln, self.mlp = nn.LayerNorm(d), Mlp(d, hidden)

    def forward(self, x):
        return x + self.mlp(self.ln(x))


def _stack(block, n):
    return nn.Sequential(*[block() for _ in range(n)])


# name -> (model factory, input shape (B, T, D), throughput unit, items per batch)
if QUICK:
    MODELS = {
        "bert": (lambda: _stack(lambda: BertLayer(128, 4, 512), 1), (2, 32, 128), "tokens/s"),
        "gpt2": (lambda: _stack(lambda: GptBlock(128, 4, 512), 1), (2, 32, 128), "tokens/s"),
        "vit": (lambda: _stack(lambda: VitMlpBlock(64, 256), 2), (2, 50, 64), "images/s"),
    }
else:
    MODELS = {
        "bert": (lambda: _stack(BertLayer, 2), (8, 128, 768), "tokens/s"),
        "gpt2": (lambda: _stack(GptBlock, 2), (4, 128, 768), "tokens/s"),
        "vit": (lambda: _stack(VitMlpBlock, 4), (8, 197, 384), "images/s"),
    }
CASES = [("inference", torch.float32), ("inference", torch.bfloat16), ("train", torch.float32)]


@pytest.mark.parametrize("pass_,dtype", CASES, ids=lambda v: v if isinstance(v, str) else dtype_name(v))
@pytest.mark.parametrize("name", list(MODELS))
def test_model(benchmark, compare, cpu_backend, name, pass_, dtype):
    factory, shape, unit = MODELS[name]
    torch.manual_seed(0)
    eager = factory().to(dtype)
    swapped = fl.swap(copy.deepcopy(eager))
    compiled = torch.compile(copy.deepcopy(eager), dynamic=False)
    x = torch.randn(*shape, dtype=dtype)
    items = shape[0] if unit == "images/s" else shape[0] * shape[1]
    info = {"suite": "cpu", "op": f"model_{name}", "shape": "x".join(map(str, shape)),
            "dtype": dtype_name(dtype), "pass": pass_, "backend": cpu_backend, "unit": unit,
            "fused": len(swapped.fastlayers_swap_report.fused)}

    if pass_ == "inference":
        for m in (eager, swapped, compiled):
            m.eval()

        def run(m):
            def f():
                with torch.no_grad():
                    return m(x)
            return f
        contenders = {"fastlayers": run(swapped), "eager": run(eager), "compile": run(compiled)}
    else:
        dy = torch.randn(*shape, dtype=dtype)

        def run(m):
            opt = torch.optim.SGD(m.parameters(), lr=1e-6)

            def f():
                opt.zero_grad(set_to_none=True)
                m(x).backward(dy)
                opt.step()
            return f
        contenders = {"fastlayers": run(swapped), "eager": run(eager), "compile": run(compiled)}
    extra = compare(contenders, info=info, warmup=2, rounds=3 if QUICK else None)
    # items per second per contender, from the median times
    benchmark.extra_info["throughput"] = {n: items / (ms / 1e3) for n, ms in extra["median_ms"].items()}
