"""The activation modules fastlayers.swap replaces on their own: Hugging Face's marked activation
classes (``kernel_layer_name`` "GeLU", "GeluTanh", "NewGELU", "FastGELU", "QuickGELU", "SiLU") that
no Linear -> activation fusion took, e.g. GPT-2's ``mlp.act`` (NewGELU, after a Conv1D).

Each becomes an :class:`Activation` running fastlayers.ops.activation.activation (one pass each way)
where that is faster than the module's own forward, measured fwd+bwd at 4096 x 1024 on the CPU
(2026-12-07, AMD EPYC, 2 threads, fp32 / bf16, side by side):

    NewGELU (eager tanh formula, 8 ops)       9.1x / 9.9x
    QuickGELU (x * sigmoid(1.702 x), 3 ops)   4.3x / 4.1x
    GeluTanh (F.gelu(approximate="tanh"))     1.27x / 1.27x
    GeLU (F.gelu), SiLU (F.silu)              0.97x / 1.00x, 1.03x / 1.00x: left alone (ATen's own
                                              one-pass kernel; the reason is in the report)

FastGELU (the tanh formula with a rounded constant, 7 ops) is replaced as NewGELU is, and a GeLU
module running the erf formula (``use_gelu_python``) as the formula modules are. Modules whose eager
formula rounds every step in 16 bits (NewGELU, FastGELU, QuickGELU, the python formulas:
rounds_its_own_way) keep their own forward for float16 / bfloat16 inputs inside the Activation:
their rounding is the model's definition there; the speed-up is for float32 / float64.

"Computes that activation" is checked by behaviour, as the norms are (swap/norms.py): the module's
own forward on probe points in float64 and float32 must equal the activation table's formula at
those dtypes' tolerances (erf and tanh GELU differ by up to 4.7e-4: float64 tells them apart) and
return bfloat16 for bfloat16. Left alone: modules with hooks, and activation modules a rewritten
forward depends on (a gated product inlined them: replacing one would make that forward fall back).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Set

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import get
from ..ops.activation import activation
from .patterns import hooks, hooks_text, replace_modules
from .report import SwapReport
from .rewrite import GUARD

# kernel_layer_name -> the activation of fastlayers' table its classes compute
ACTIVATION_OF = {"GeLU": "gelu", "GeluTanh": "gelu_tanh", "NewGELU": "gelu_tanh", "FastGELU": "gelu_tanh",
                 "QuickGELU": "quick_gelu", "SiLU": "silu"}


def _probe_points(device: torch.device) -> Tensor:
    """float64 points where the GELU variants, SiLU and QuickGELU all differ from one another, and
    random ones (16-bit rounding differences show on a few percent of them)."""
    x = torch.linspace(-10.0, 10.0, 161, dtype=torch.float64)
    r = torch.randn(1024, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    return torch.cat([x, r, torch.tensor([0.0, -0.0, 1e-3, -1e-3, 30.0, -30.0], dtype=torch.float64)]).to(device)


_LOW = (torch.bfloat16, torch.float16)


def activation_problem(m: nn.Module, act_name: str, device: torch.device = torch.device("cpu")) -> Optional[str]:
    """None when the class forward of m computes fastlayers' activation `act_name` (see the module
    docstring), else why not. The class's forward: an instance-level one (kernels' kernelize sets
    one) is not what is checked."""
    name = type(m).__name__
    ref = get(act_name).ref
    x64 = _probe_points(device)
    with torch.no_grad():
        for dtype, rtol, atol in ((torch.float64, 1e-7, 1e-7), (torch.float32, 1.3e-6, 1e-5),
                                  (torch.bfloat16, None, None)):
            x = x64.to(dtype)
            try:
                got = type(m).forward(m, x)
            except Exception as e:  # noqa: BLE001 - any failure: not the plain activation
                return f"{name}: its forward failed on a probe input ({type(e).__name__})"
            if not isinstance(got, Tensor) or got.dtype != dtype or got.shape != x.shape:
                return f"{name}: its forward returns another dtype/shape than its {dtype} input"
            if rtol is not None and not torch.allclose(got, ref(x, 0.0), rtol=rtol, atol=atol, equal_nan=True):
                return f"{name}: its forward differs from fastlayers' {act_name!r} (another formula)"
    return None


def rounds_its_own_way(m: nn.Module, act_name: str, device: torch.device = torch.device("cpu")) -> bool:
    """Whether m's 16-bit results differ from fastlayers' by more than one rounding (bf16 / fp16
    closeness, assert_close's defaults): eager formulas that round every step (NewGELU, FastGELU,
    QuickGELU, the erf / tanh formulas) do, ATen's F.gelu / F.silu (float32 math, one rounding)
    do not. Such a module's 16-bit inputs keep its own forward: its rounding is the model's
    definition there (fastlayers' once-rounded result is closer to the exact value, but another)."""
    from ..backends import use_backend
    x64 = _probe_points(device)
    with torch.no_grad():
        for dtype, rtol in ((torch.bfloat16, 1.6e-2), (torch.float16, 1e-3)):
            x = x64.to(dtype)
            with use_backend("cpp") if device.type == "cpu" else nullcontext():  # its kernels at probe size
                ours = activation(x, act_name)
            theirs = type(m).forward(m, x)
            if not torch.allclose(ours.float(), theirs.float(), rtol=rtol, atol=1e-5, equal_nan=True):
                return True
    return False


class Activation(nn.Module):
    """``fastlayers.ops.activation.activation(x, name)`` as a module (no parameters): what swap puts
    in place of a standalone activation module. With `own_16bit` (the replaced module, see
    rounds_its_own_way), float16 / bfloat16 inputs run that module's forward instead."""

    def __init__(self, activation: str, own_16bit: Optional[nn.Module] = None):
        super().__init__()
        get(activation, "fastlayers.swap.activations.Activation")
        self.activation = activation
        self.__dict__["own_16bit"] = own_16bit  # not a child: no state, not walked by swap / named_modules

    def forward(self, x: Tensor) -> Tensor:
        own = self.__dict__["own_16bit"]
        if own is not None and x.dtype in _LOW:
            return own(x)
        return activation(x, self.activation)

    def extra_repr(self) -> str:
        return repr(self.activation) + (", 16-bit: its own forward" if self.__dict__["own_16bit"] is not None else "")


def _not_faster(m: nn.Module, layer_name: str) -> Optional[str]:
    """Why fastlayers' pass would not beat m's own forward (see the table above), else None."""
    if layer_name == "SiLU" or (layer_name == "GeLU" and getattr(m, "act", None) is F.gelu):
        fn = "F.silu" if layer_name == "SiLU" else "F.gelu"
        return (f"{type(m).__name__}: its forward is PyTorch's one-pass {fn}; fastlayers' activation pass "
                "measured at parity (0.97-1.03x fwd+bwd on the CPU), nothing to gain")
    return None


def _guarded_children(model: nn.Module) -> Set[int]:
    """ids of the children that a rewritten forward checks at each call (swap/rewrite.py)."""
    ids = set()
    for m in model.modules():
        guard = m.__dict__.get(GUARD)
        if guard:
            ids.update(id(child) for _, _, child, _ in guard[1])
    return ids


def swap_activations(model: nn.Module, report: SwapReport) -> None:
    """Replace model's standalone marked activation modules in place (see the module docstring);
    entries go to report.replaced and report.left."""
    guarded = _guarded_children(model)

    def replacement(child: nn.Module):
        layer = getattr(type(child), "kernel_layer_name", None)
        act = ACTIVATION_OF.get(layer) if isinstance(layer, str) else None
        if act is None or id(child) in guarded:
            return None, None
        if hooks(child):  # the first reason given
            return None, f"{type(child).__name__} {hooks_text(child)}"
        why = _not_faster(child, layer) or activation_problem(child, act)
        if why is not None:
            return None, why
        return Activation(act, child if rounds_its_own_way(child, act) else None), None

    replace_modules(model, report, replacement, lambda new: f"fastlayers.swap.activations.Activation({new.activation})")
