"""fastlayers.swap routes Hugging Face attention's apply_rotary_pos_emb to fastlayers.rotary, for the
swapped model only: whole models keep their outputs, loss and gradients; another model in the same
process keeps Hugging Face's function."""
import copy

import pytest
import torch

import fastlayers as fl
from fastlayers.swap import rotary as swap_rotary_mod

transformers = pytest.importorskip("transformers")
pytest.importorskip("kernels", reason="transformers routes apply_rotary_pos_emb per model only with `kernels`")

from conftest import assert_close_fp32  # noqa: E402


def _small(name):
    T = transformers
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return {"llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**common)),
            "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**common)),
            "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**common)),
            # partial rotary (half the head dim), applied by Phi to q[..., :R] slices
            "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**{**common, "num_key_value_heads": 4}))}[name]()


@pytest.fixture
def count_rotary(monkeypatch):
    """Calls of fastlayers.rotary made by swapped attention modules; always the cpp kernels (the
    inputs here are below the small-size gate, which would hand them to PyTorch's ops)."""
    calls = []
    real = swap_rotary_mod.rotary

    def counted(*a, **kw):
        calls.append(1)
        with fl.use_backend("cpp"):
            return real(*a, **kw)
    monkeypatch.setattr(swap_rotary_mod, "rotary", counted)
    return calls


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "phi"])
def test_models_rotary_swapped_same_results(name, count_rotary):
    torch.manual_seed(0)
    model = _small(name).float().eval()
    ref = copy.deepcopy(model)
    fl.swap(model)
    report = model.fastlayers_swap_report
    rot = [p for p, new in report.replaced if new == "fastlayers.rotary"]
    assert rot == [f"model.layers.{i}.self_attn.rotary_pos_emb" for i in range(2)], (rot, report.left)

    ids = torch.randint(0, 128, (2, 12))
    out = model(ids, labels=ids)
    assert len(count_rotary) == 2, "the fused rotary was not called once per layer"
    out_ref = ref(ids, labels=ids)
    assert_close_fp32(out.logits, out_ref.logits, red=64, what="logits")
    assert_close_fp32(out.loss, out_ref.loss, red=64, what="loss")
    out.loss.backward()
    out_ref.loss.backward()
    for (n, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters()):
        assert_close_fp32(p.grad, pr.grad, red=64, what=f"grad {n}")

    # Another model in the same process (and the unswapped copy) keeps Hugging Face's function.
    count_rotary.clear()
    other = _small(name).float().eval()
    other(ids)
    ref(ids)
    assert not count_rotary


def test_swap_twice_and_deepcopy(count_rotary):
    model = _small("llama").eval()
    fl.swap(model)
    fl.swap(model)
    assert sum(new == "fastlayers.rotary" for _, new in model.fastlayers_swap_report.replaced) == 2
    clone = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 6))
    count_rotary.clear()
    clone(ids)
    assert len(count_rotary) == 2


def test_other_formula_left_alone(monkeypatch, count_rotary):
    """A rotary function of another formula (here: rotate_half with the wrong sign) is probed and left
    alone with the reason."""
    from kernels import use_kernel_forward_from_hub, use_kernelized_func

    @use_kernel_forward_from_hub("rotary_pos_emb")
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        h = q.shape[-1] // 2
        rot = lambda x: torch.cat((x[..., h:], -x[..., :h]), -1)  # noqa: E731
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    @use_kernelized_func(apply_rotary_pos_emb)
    class Attn(torch.nn.Module):
        def forward(self, q, k, cos, sin):
            return apply_rotary_pos_emb(q, k, cos, sin)

    model = torch.nn.Sequential(Attn())
    fl.swap(model)
    left = dict(model.fastlayers_swap_report.left)
    assert "another formula" in left["0.rotary_pos_emb"], left
    q = torch.randn(1, 2, 3, 8)
    model[0](q, q, torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    assert not count_rotary


def test_compiled_swapped_model_records_the_op():
    """Under torch.compile Hugging Face calls the wrapper's forward function directly: the graph
    holds fastlayers' registered rotary op, and the outputs are the original model's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _small("llama").eval()
    ref = copy.deepcopy(model)
    fl.swap(model)
    ops = []

    def backend(gm, inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward
    ids = torch.randint(0, 128, (2, 64))  # past the small-size gate: the kernels run
    out = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
    assert sum("fastlayers.rotary" in o for o in ops) == 2, ops
    assert_close_fp32(out, ref(ids).logits, red=64, what="compiled logits")


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """A plain module-level function, as transformers leaves it without the kernels package."""
    raise AssertionError("not called")


class PlainAttn(torch.nn.Module):
    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)


def test_plain_global_function_left_alone():
    model = torch.nn.Sequential(PlainAttn())
    fl.swap(model)
    left = dict(model.fastlayers_swap_report.left)
    assert "plain module-level function" in left["0"], left
    if hasattr(transformers, "GPTNeoXForCausalLM"):  # a family that does not mark it
        neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4))
        fl.swap(neox)
        assert "plain module-level function" in dict(neox.fastlayers_swap_report.left)["gpt_neox.layers.0.attention"]
    assert apply_rotary_pos_emb.__module__ == __name__  # nothing global was patched
