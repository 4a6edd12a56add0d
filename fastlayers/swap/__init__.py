"""fastlayers.swap(model): fuse an existing model's Linear -> activation pairs, gated MLPs and the
loss of its own head, in place.

What is fused, module by module (each module's own forward is read on its own):

* ``nn.Sequential`` (forward not overridden): a Linear child directly followed by an activation child.
* any other module whose forward torch.fx can trace with its submodules as leaves: a Linear child
  whose output goes *only* into an activation — a module child (``self.act(self.fc(x))``, the
  Hugging Face MLP-block pattern) or a functional call (``F.relu``, ``F.gelu(approximate=...)``,
  ``F.leaky_relu(x, slope)``, ``F.silu``, ``torch.sigmoid``, ``torch.tanh``, ``x.relu()``, ...).

Recognised activation modules: nn.ReLU, nn.LeakyReLU, nn.GELU (both approximations), nn.SiLU,
nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.ReLU6, nn.Mish (and F.hardswish,
F.hardsigmoid, F.relu6, F.mish), and any parameterless module of another library whose forward
traces to exactly one of the functional calls above (e.g. transformers' GELUActivation).

Gated MLPs (swap/gated.py), in a traced forward, before the pairs above: ``act(gate(x)) * up(x)``
(Hugging Face Llama / Mistral / Qwen, timm's SwiGLU) and ``a, b = proj(x).chunk(2, -1); a * act(b)``
(GeGLU) become one fastlayers.gated_linear call reading the same Parameters; the report lists them
under ``gated``.

The loss a model computes from its own head (swap/loss/; the report lists it under ``losses``):

* in a traced forward, ``F.cross_entropy(<view / reshape / flatten of> self.head(x), t, ...)`` or an
  ``nn.CrossEntropyLoss`` child's call (its options read live from the module) becomes one
  fastlayers.linear_cross_entropy call reading the head's own Parameters (tied weights stay tied)
  when the head is a plain nn.Linear child called once, without hooks, and its logits are used
  nowhere else but shape reads (``logits.size(-1)``), with no class weights; the views must end in
  (tokens, vocab), else (or for class-probability targets) the call computes the logits itself at
  run time. Where the logits are also returned or used, or the input is not a head, the call
  becomes fastlayers.cross_entropy with F.cross_entropy's signature, the reason in the report.
* Hugging Face models whose ``loss_function`` is transformers' ForCausalLMLoss (``*ForCausalLM``):
  it is set to an exact equivalent on fastlayers.cross_entropy (same float32 upcast, label shift,
  ignore_index, ``num_items_in_batch`` "sum" / else "mean"); the logits are returned, so they exist.
* a module with a Linear child whose forward fx cannot trace or may not rewrite (nanoGPT's
  ``forward(idx, targets=None)``): it gets a copy of its forward function whose globals resolve
  ``F.cross_entropy`` (F being torch.nn.functional) or a from-imported ``cross_entropy`` to
  fastlayers.cross_entropy -- only where the name is PyTorch's own function, only when the other
  globals it reads are code (a copy would freeze values), never ``torch.nn.functional.cross_entropy``
  spelt out; nothing global is patched. The logits are materialised there (the forward is not traced).

With ``skip_logits=True`` (swap/causal_lm.py), in training with labels / targets only: a Hugging
Face causal LM (transformers' ForCausalLMLoss, a forward passing ``self.lm_head(...)``'s logits
untouched to ``self.loss_function(logits, labels, ...)``) and a nanoGPT-style forward (``logits =
self.lm_head(x); loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ...)``)
compute the loss with fastlayers.linear_cross_entropy inside a call of the head module (hooks and
FSDP2's unshard run as for any call) and return ``logits=None`` / ``(None, loss)``. Eval mode and
calls without labels run the forward swap gives without the option. A forward that transforms the
logits before the loss (Gemma2's soft-capping, Cohere's / Granite's logit scaling) is left alone,
the statement quoted in the report.

The Linear becomes a FusedLinear holding the *same* Parameter objects (state_dict keys unchanged,
optimizers keep working); an activation module becomes nn.Identity. A functional activation can
only be removed by editing the forward: the module keeps its attributes and state and becomes an
instance of a generated subclass of its class whose ``forward`` is the rewritten fx graph's code (it
reads the module's live children; TorchScript, deepcopy and pickling work) -- only when the traced
forward read no runtime state, which a trace would freeze as constants: its own or a child's
instance attributes (``self.scale``, ``if self.drop.p > 0:``), plain class attributes (a later
instance assignment would be ignored), a Parameter's requires_grad / dtype / device read as a
Python value (``any(p.requires_grad for p in self.fc.parameters())``), grad / inference-mode /
autocast / scripting / compiling queries (``torch.is_grad_enabled()``, a ``with torch.no_grad():``
inside the forward), ``isinstance`` of a traced value (T5's ``isinstance(self.wo.weight,
torch.Tensor)`` dtype cast), global or closure values. Such a forward is left alone, the read
named in the report.

Changed after swap: a rewritten forward reads Parameters of children it no longer calls (a gated
product's gate / up Linears, a fused loss's head) and skips activation modules it inlined. At each
call (~1 us for three children, measured) it checks that those children are still the objects
swap saw, of the same class and without hooks or an instance-level forward, and that no global
module hook is set; if not (PEFT LoRA wrapped them, quantize_dynamic replaced them,
torch.nn.utils.parametrize re-parametrised them, a hook was added, accelerate set an offloading
forward), the original forward runs, calling the modules as it always did. Where a functional
activation was also fused into a Linear in that forward, the original cannot run on the swapped
children and the call raises instead (never a silent wrong result). TorchScript compiles the
rewritten code without the check.

A fused Linear (FusedLinear with an activation) returns the *activated* output: called alone
(``seq[:1](x)`` as a feature extractor) or seen by a forward hook registered on it after swap, it
gives act(x W^T + b). LoRA or other wrappers applied after swap to such a Linear wrap the fused
op (the low-rank update lands after the activation): apply them before swap. LoRA-wrapped
Linears are left unfused, with the reason (a gated product's LoRA update enters before the
activation, which fastlayers.gated_linear cannot add exactly).

quantize_dynamic matches modules by exact type: after swap, name FusedLinear in its spec
(``quantize_dynamic(model, {nn.Linear, fl.FusedLinear}, dtype=torch.qint8)``; swap/quant.py
registers it, keeping a fused activation), or swap with ``linears=False`` (plain Linears stay
nn.Linear; the default spec then quantizes them), or quantize first.

nn.Softmax / nn.LogSoftmax become fastlayers.Softmax / LogSoftmax with the same dim.

Attention (swap/sdpa.py): a module whose own forward calls PyTorch's
``scaled_dot_product_attention`` (nanoGPT's CausalSelfAttention, for one) gets a copy of that
forward, compiled from its source against its live globals, calling
fastlayers.scaled_dot_product_attention instead: PyTorch's signature, fused kernels where they take
the call (no mask, no dropout, small head dims on the CPU), PyTorch's own function otherwise. The
report lists these under ``attention``.

Standalone Hugging Face activation modules (swap/activations.py): a class marked with
``kernel_layer_name`` "NewGELU", "FastGELU", "QuickGELU" or "GeluTanh" that no fusion above took
(GPT-2's ``mlp.act`` after a Conv1D) becomes a swap.activations.Activation (one fastlayers pass each
way: 1.3-9x its eager forward, fwd+bwd on the CPU) once its forward is checked to compute that
activation (float16 / bfloat16 inputs of a formula that rounds every step keep its own forward);
"GeLU" / "SiLU" modules running F.gelu / F.silu are left alone (one ATen pass already, fastlayers
at parity), the reason in the report.

Plain Linears (``linears=True``, the default): every nn.Linear not fused above and without hooks
becomes a FusedLinear(activation="none") on the same Parameters (listed under ``linear`` with the
reason it has no activation); it calls F.linear except where fastlayers' GEMM is faster (the CPU
backend's oneDNN routes for large GEMMs, prepacked without grad).

Left alone, with the reason in the report: a Linear whose output is used anywhere else (or
returned), a Linear or activation that has hooks, is shared between modules, is called more than
once, or is a subclass (its forward may differ); modules fx cannot trace; forwards whose traced
graph would specialise to one path (optional arguments, ``*args``, a branch on ``self.training``).

The backend of each device the model is on is imported by swap itself, so a first call under
torch.compile (fullgraph too) meets no lazy import.

Package layout: patterns.py (what counts as an activation), tracing.py (fx tracing and the safety
checks), rewrite.py (the rewritten forward and its change check), gated.py (gated MLPs), loss/ (the
head's loss), causal_lm.py (skip_logits) and lm_source.py (the forward sources it recognises),
norms.py (LayerNorm / RMSNorm modules), activations.py (standalone activation modules), quant.py
(quantize_dynamic's mapping), swapper.py (the walk over the model), report.py (SwapReport).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..nn import LogSoftmax, Softmax
from .patterns import hooks
from .report import SwapReport
from . import quant as _quant  # noqa: F401  (registers FusedLinear with quantize_dynamic)
from .swapper import _Swapper
from .norms import swap_norms as _swap_norms
from .residual import swap_residual as _swap_residual
from .rotary import swap_rotary as _swap_rotary
from .attention import swap_attention as _swap_attention
from .activations import swap_activations as _swap_activations
from .sdpa import swap_sdpa as _swap_sdpa

__all__ = ["swap", "SwapReport"]

log = logging.getLogger("fastlayers.swap")


def _load_backends(model: nn.Module) -> None:
    """Import now the backend of each device the model's tensors are on: a first call under
    torch.compile must not meet the lazy import (dynamo refuses importlib: fullgraph fails, else
    the graph breaks). A backend that cannot load here fails later with its own error."""
    from .._errors import BackendUnavailableError
    from ..backends import select
    devices = {t.device.type for t in model.parameters()} | {t.device.type for t in model.buffers()}
    for dev in sorted(devices or {"cpu"}):
        try:
            select(torch.device(dev), "fastlayers.swap")
        except (BackendUnavailableError, RuntimeError):
            pass


def swap(model: nn.Module, verbose: bool = False, linears: bool = True, skip_logits: bool = False) -> nn.Module:
    """Fuse `model`'s Linear -> activation pairs, gated MLPs, head losses and softmax modules in
    place; returns `model`.

    With `linears` (the default), every other plain nn.Linear (no hooks, not read by a gated
    product or a fused loss) becomes a FusedLinear(activation="none") on the same Parameters: it runs F.linear
    except where fastlayers is faster (on the CPU: large GEMMs on oneDNN, with a prepacked weight
    when no gradient is needed, costing one more copy of each such weight). linears=False leaves
    them as they are.

    With `skip_logits`, Hugging Face ``*ForCausalLM`` models (transformers' ForCausalLMLoss) and
    nanoGPT-style ``forward(idx, targets)`` modules compute their loss in training with labels /
    targets by fastlayers.linear_cross_entropy on the head's own Parameters and return **no
    logits** (``logits=None``; nanoGPT ``(None, loss)``): the (tokens, vocab) logits, their
    log-probabilities and their gradient are never held (swap/causal_lm.py). In eval mode or
    without labels the original forward runs unchanged. The report lists these under ``losses``.

    Parameters stay the same objects (state_dict keys and optimizers unchanged); outputs and
    gradients match the original model up to floating-point rounding. The report of what was
    fused and what was left and why is printed when `verbose` and attached as
    ``model.fastlayers_swap_report`` (a :class:`SwapReport`). A model that *is* an nn.Softmax /
    nn.LogSoftmax is returned replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlayers.swap: expected an nn.Module, got {type(model).__name__}")
    if type(model) in (nn.Softmax, nn.LogSoftmax) and model.dim is not None and not hooks(model):
        new = (Softmax if type(model) is nn.Softmax else LogSoftmax)(model.dim)
        new.train(model.training)
        model, report = new, SwapReport(replaced=[("<model>", f"fastlayers.{type(new).__name__}")])
    else:
        swapper = _Swapper(model, linears, skip_logits)
        swapper.run()
        report = swapper.report
        _swap_norms(model, report)  # LayerNorm / RMSNorm modules (swap/norms.py)
        _swap_residual(model, report)  # the residual add before a (now fastlayers) norm (swap/residual.py)
        _swap_rotary(model, report)  # Hugging Face attention's apply_rotary_pos_emb (swap/rotary.py)
        _swap_attention(model, report)  # Hugging Face eager attention's score softmax (swap/attention.py)
        _swap_activations(model, report)  # standalone marked activation modules (swap/activations.py)
        _swap_sdpa(model, report)  # forwards calling PyTorch's scaled_dot_product_attention (swap/sdpa.py)
    _load_backends(model)
    model.fastlayers_swap_report = report
    log.info("%s", report)
    if verbose:
        print(report)
    return model
