"""fastlayers through Hugging Face's own mechanism: a kernel mapping for the ``kernels`` package.

    from kernels import Mode, kernelize, use_kernel_mapping
    import fastlayers.hf

    with use_kernel_mapping(fastlayers.hf.kernel_mapping()):
        model = kernelize(model, mode=Mode.TRAINING, device="cpu")   # or Mode.INFERENCE, "cuda"

``transformers`` marks its replaceable layers with a ``kernel_layer_name`` (the decorator
``use_kernel_forward_from_hub``); ``kernelize`` sets, on every marked module of the model, the
forward of the layer class that the mapping's repository loads for that name, device and mode.
Here the repositories are fastlayers' own (``Repository``: ``load()`` returns one of the layer
classes below, nothing is downloaded), and the forwards call fastlayers' ops:

    "RMSNorm"                                -> fastlayers.rms_norm(x, weight, eps, mode="hf")
    "rotary_pos_emb"                         -> fastlayers.rotary(q, k, cos, sin, unsqueeze_dim)
    "GeLU"                                   -> fastlayers.ops.activation.activation(x, "gelu")
    "GeluTanh", "NewGELU", "FastGELU"        -> ... "gelu_tanh"  (the same function: tanh-GELU)
    "QuickGELU"                              -> ... "quick_gelu" (x * sigmoid(1.702 x))
    "SiLU"                                   -> ... "silu"

A name covers every class marked with it, so each module is checked once, at its first call,
before fastlayers computes its forward: its structure (RMSNorm: LlamaRMSNorm's 1-D ``weight`` and
float ``variance_epsilon``, nothing else) and its behaviour -- its own forward on probe inputs in
float64 and float32 must equal fastlayers' formula at those dtypes' tolerances (RMSNorm also in
bfloat16, bit for bit, which tells the cast-then-weight rounding and ``(1 + weight)`` variants
apart), and keep bfloat16 in bfloat16. A module that fails runs its own forward unchanged (the
reason is kept in ``fastlayers.hf.why_not(module)``): a differently defined layer is never given
another formula.

"rotary_pos_emb" marks a function, ``apply_rotary_pos_emb``: transformers attaches a wrapper of it
to each attention module (``use_kernelized_func``), kernelize sets fastlayers' forward on that
wrapper, and the function's own result on probe inputs of the call's layout is checked as above,
and in bfloat16 / float16 bit for bit (an interleaved / GPT-J layout marked with the name keeps its
own forward; a function whose 16-bit rounding is another keeps its own for 16-bit inputs).

Not covered, of the names transformers 5.25 marks: "RMSNormGated" (norm(x) * silu(gate): a second
input), "RMSNormZeroCentered" ((1 + w) scaling), the Mamba / linear-attention scans and convolutions ("mamba_scan_forward",
"causal_conv1d_*", "chunk_gated_delta_rule", ...), "MultiScaleDeformableAttention",
"SoftmaxTopKRouter", "Qwen3_5GatedDeltaNet", "EsmFold2TriangleMultiplication": fastlayers has no
op for them; kernelize keeps their own forward.

Modes: Mode.TRAINING and Mode.INFERENCE (the layers have a backward). Not Mode.TORCH_COMPILE:
the layers say ``can_torch_compile = False``, so kernelize keeps the original forward there and
Inductor fuses it (the first-call probe is eager Python). Devices: "cpu" (the C++ backend) and
"cuda" (rms_norm's and rotary's Triton kernels; a bare activation is ATen's own one-pass kernel
there). The "cuda" entries have not run on a GPU yet (the ops' Triton kernels are tested under
the interpreter; kernelize with device="cuda" is not).

16-bit inputs: RMSNorm and the rotary function give HF's rounding exactly (fastlayers.rotary rounds
q * cos, rotate_half(q) * sin and their sum as eager does). The activations compute in float32 and
round once (as ATen's F.gelu / F.silu do: those modules take fastlayers' op at every dtype, one
rounding apart); a module whose eager formula rounds every step (NewGELU, FastGELU, QuickGELU, the
``use_gelu_python`` variants) keeps its own forward for float16 / bfloat16 inputs -- its rounding
is the model's definition there -- and runs fastlayers' op for float32 / float64.

The ``kernels`` and ``transformers`` packages are imported only by kernel_mapping() (the extra
``pip install fastlayers[hf]``): ``import fastlayers`` needs neither.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from .backends import use_backend
from .ops.activation import activation
from .ops.norms import rms_norm
from .swap.activations import ACTIVATION_OF as _ACTIVATION_OF
from .swap.activations import activation_problem as _activation_problem
from .swap.norms import hf_rmsnorm_problem
from .swap.activations import rounds_its_own_way as _rounds_its_own_way

__all__ = ["kernel_mapping", "Repository", "LAYER_NAMES", "why_not"]

LAYER_NAMES: Tuple[str, ...] = ("RMSNorm", "rotary_pos_emb") + tuple(_ACTIVATION_OF)

_VERDICT = "_fastlayers_hf_why_not"  # a marked module's __dict__ entry: None (fastlayers' forward) or why not
_UNSET = object()


def why_not(module: nn.Module) -> Optional[str]:
    """Why a kernelized module runs its own forward rather than fastlayers' (None: it runs
    fastlayers'; "not called yet": its check runs at its first call). An activation module whose
    16-bit rounding is its own (see fastlayers.swap.activations.rounds_its_own_way) says so: it runs
    fastlayers' op for float32 / float64 inputs only."""
    v = module.__dict__.get(_VERDICT, _UNSET)
    if v is _UNSET:
        return "not called yet"
    if isinstance(v, tuple):  # an activation's (why not, 16-bit inputs keep its own forward)
        why, own_16bit = v
        if why is None and own_16bit:
            return (f"{type(module).__name__}: float16 / bfloat16 inputs run its own forward (its formula "
                    "rounds otherwise than fastlayers' op); float32 / float64 run fastlayers'")
        return why
    return v


def _verdict(m: nn.Module, check, *args):
    v = m.__dict__.get(_VERDICT, _UNSET)
    if v is _UNSET:
        v = check(m, *args)
        m.__dict__[_VERDICT] = v
    return v


# ----------------------------------------------------------------------------- the checks
def _rmsnorm_problem(m: nn.Module) -> Optional[str]:
    """None when m's own class forward is LlamaRMSNorm's (structure, then behaviour), else why not."""
    return hf_rmsnorm_problem(m, class_forward=True)


# ----------------------------------------------------------------------------- the layer classes
# What kernelize loads: nn.Module subclasses without __init__ or members of their own (kernels
# checks that, and that forward's parameters match the marked class's), whose forward it binds
# to each marked module. Each forward runs fastlayers' op once the module passed its check, else
# the module's own class forward.
def _activation_check(m: nn.Module, act_name: str, device: torch.device) -> Tuple[Optional[str], bool]:
    why = _activation_problem(m, act_name, device)
    return why, why is None and _rounds_its_own_way(m, act_name, device)


def _activation_forward(m: nn.Module, x: Tensor, act_name: str) -> Tensor:
    why, own_16bit = _verdict(m, _activation_check, act_name, x.device)
    if why is None and not (own_16bit and x.dtype in (torch.float16, torch.bfloat16)):
        return activation(x, act_name)
    return type(m).forward(m, x)


class RMSNorm(nn.Module):
    """Hugging Face's "RMSNorm" (LlamaRMSNorm's forward) -> fastlayers.rms_norm(mode="hf")."""
    has_backward = True
    can_torch_compile = False

    def forward(self, hidden_states: Tensor) -> Tensor:
        if _verdict(self, _rmsnorm_problem) is None:
            return rms_norm(hidden_states, self.weight, self.variance_epsilon, mode="hf")
        return type(self).forward(self, hidden_states)


class GeLU(nn.Module):
    """Hugging Face's "GeLU" (GELUActivation: F.gelu, or its erf formula) -> activation "gelu"."""
    has_backward = True
    can_torch_compile = False

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - the marked classes' parameter name
        return _activation_forward(self, input, "gelu")


class GeluTanh(nn.Module):
    """Hugging Face's "GeluTanh" / "NewGELU" / "FastGELU" (tanh-approximate GELU, as
    F.gelu(approximate="tanh") or its formula) -> activation "gelu_tanh"."""
    has_backward = True
    can_torch_compile = False

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return _activation_forward(self, input, "gelu_tanh")


class QuickGELU(nn.Module):
    """Hugging Face's "QuickGELU" (x * sigmoid(1.702 x)) -> activation "quick_gelu"."""
    has_backward = True
    can_torch_compile = False

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return _activation_forward(self, input, "quick_gelu")


class SiLU(nn.Module):
    """Hugging Face's "SiLU" (F.silu) -> activation "silu"."""
    has_backward = True
    can_torch_compile = False

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return _activation_forward(self, input, "silu")


def _rotary_probe(cos: Tensor, q: Tensor, unsqueeze_dim: int, dtype: torch.dtype):
    """Random (q, k, cos, sin) in `dtype` shaped as this call's (batch 1, 5 positions, 2 / 1 heads,
    its head dim D and rotary dim R), or None for layouts the probe does not build."""
    if cos.dim() != 3 or unsqueeze_dim not in (1, 2, -3, -2) or q.dim() != 4:
        return None
    gen = torch.Generator(device="cpu").manual_seed(0)
    d, r = q.shape[-1], cos.shape[-1]

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=q.device, dtype=dtype)
    heads_first = unsqueeze_dim in (1, -3)
    qs, ks = ((1, 2, 5, d), (1, 1, 5, d)) if heads_first else ((1, 5, 2, d), (1, 5, 1, d))
    return t(*qs), t(*ks), t(1, 5, r), t(1, 5, r)


def _rotary_check(m: nn.Module, q: Tensor, cos: Tensor, unsqueeze_dim: int) -> Tuple[Optional[str], bool]:
    """(None or why not, whether 16-bit inputs keep its own forward) for a "rotary_pos_emb" function
    module: its own function on probe inputs of this call's layout must equal fastlayers.rotary in
    float64 / float32 (the activations' tolerances), and, for 16-bit inputs to take fastlayers' op,
    bit for bit in bfloat16 / float16 (fastlayers.rotary rounds each product and the sum as Hugging
    Face's q * cos + rotate_half(q) * sin does; a function rounding otherwise keeps its own 16-bit
    forward)."""
    from .ops.rotary import rotary
    name = type(m).__name__
    own_16bit = False
    with torch.no_grad():
        for dtype, rtol, atol in ((torch.float64, 1e-7, 1e-7), (torch.float32, 1.3e-6, 1e-5),
                                  (torch.bfloat16, 0.0, 0.0), (torch.float16, 0.0, 0.0)):
            probe = _rotary_probe(cos, q, unsqueeze_dim, dtype)
            if probe is None:
                return f"{name}: a call layout the check does not cover (q {tuple(q.shape)}, cos {tuple(cos.shape)})", False
            try:
                got = type(m).forward(m, *probe, unsqueeze_dim)  # the wrapped function itself
            except Exception as e:  # noqa: BLE001
                return f"{name}: its function failed on a probe input ({type(e).__name__})", False
            ctx = use_backend("cpp") if q.device.type == "cpu" else nullcontext()  # the kernels at probe size
            with ctx:
                want = rotary(*probe, unsqueeze_dim=unsqueeze_dim)
            ok = (isinstance(got, tuple) and len(got) == 2 and all(
                isinstance(g, Tensor) and g.dtype == w.dtype and g.shape == w.shape for g, w in zip(got, want)))
            if not ok:
                return f"{name}: its function returns other dtypes / shapes than fastlayers.rotary", False
            close = all(torch.allclose(g.double(), w.double(), rtol=rtol, atol=atol) for g, w in zip(got, want))
            if not close and dtype in (torch.float64, torch.float32):
                return f"{name}: its function differs from fastlayers.rotary (another layout or formula)", False
            own_16bit = own_16bit or not close
    return None, own_16bit


class RotaryPosEmb(nn.Module):
    """Hugging Face's "rotary_pos_emb" (``apply_rotary_pos_emb``, which transformers attaches to each
    attention module with ``use_kernelized_func``; kernelize sets this forward on that module's own
    wrapper) -> fastlayers.rotary."""
    has_backward = True
    can_torch_compile = False

    def forward(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
        why, own_16bit = _verdict(self, _rotary_check, q, cos, unsqueeze_dim)
        if why is None and not (own_16bit and q.dtype in (torch.float16, torch.bfloat16)):
            from .ops.rotary import rotary
            return rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return type(self).forward(self, q, k, cos, sin, unsqueeze_dim)


_LAYER_CLASSES = {"RMSNorm": RMSNorm, "GeLU": GeLU, "GeluTanh": GeluTanh, "NewGELU": GeluTanh,
                  "FastGELU": GeluTanh, "QuickGELU": QuickGELU, "SiLU": SiLU, "rotary_pos_emb": RotaryPosEmb}


class Repository:
    """A ``kernels`` repository for one of fastlayers' layers: ``load()`` returns its layer class
    (kernels' RepositoryProtocol). Nothing is downloaded; equal for equal names (kernels caches
    the loaded class per repository)."""

    def __init__(self, layer_name: str):
        if layer_name not in _LAYER_CLASSES:
            raise ValueError(f"fastlayers.hf.Repository: no fastlayers layer for {layer_name!r}; expected one "
                             f"of {', '.join(LAYER_NAMES)}")
        self.layer_name = layer_name

    def load(self) -> type:
        return _LAYER_CLASSES[self.layer_name]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Repository) and other.layer_name == self.layer_name

    def __hash__(self) -> int:
        return hash(("fastlayers", self.layer_name))

    def __str__(self) -> str:
        return f"fastlayers (layer `{self.layer_name}`)"

    __repr__ = __str__


# ----------------------------------------------------------------------------- the mapping
_DEVICES = ("cpu", "cuda")


def _mode(m: object):
    from kernels import Mode
    if isinstance(m, str) and m.lower() in ("training", "inference"):
        return Mode.TRAINING if m.lower() == "training" else Mode.INFERENCE
    if m in (Mode.TRAINING, Mode.INFERENCE):
        return m
    raise ValueError(f"fastlayers.hf.kernel_mapping: expected modes among Mode.TRAINING, Mode.INFERENCE "
                     f"(or 'training', 'inference'), got {m!r} (fastlayers' layers are not registered for "
                     f"Mode.TORCH_COMPILE: Inductor fuses the original forward there)")


def kernel_mapping(modes: Iterable[object] = ("training", "inference"),
                   devices: Iterable[str] = _DEVICES,
                   layers: Optional[Iterable[str]] = None) -> Dict[str, Dict[str, Dict[object, Repository]]]:
    """The mapping ``kernels.use_kernel_mapping`` / ``register_kernel_mapping`` take:
    ``{layer name: {device: {Mode: Repository}}}`` for `layers` (default: all of LAYER_NAMES),
    `devices` ("cpu", "cuda") and `modes` (kernels.Mode.TRAINING / INFERENCE, or their names).

    On "cuda", kernels picks among mappings of the same capability range arbitrarily: if another
    mapping (e.g. transformers' own) is registered too, enter this one with
    ``use_kernel_mapping(..., inherit_mapping=False)`` to be sure it is the one used.
    """
    op = "fastlayers.hf.kernel_mapping"
    try:
        import kernels  # noqa: F401 - the optional dependency, with a clear message
    except ImportError as e:
        raise ImportError(f"{op} needs the `kernels` package: pip install 'fastlayers[hf]' "
                          "(or pip install kernels transformers)") from e
    mode_list = [_mode(m) for m in modes]
    if not mode_list:
        raise ValueError(f"{op}: expected at least one mode")
    dev_list = list(devices)
    for d in dev_list:
        if d not in _DEVICES:
            raise ValueError(f"{op}: expected devices among {_DEVICES}, got {d!r}")
    names = LAYER_NAMES if layers is None else tuple(layers)
    for n in names:
        if n not in _LAYER_CLASSES:
            raise ValueError(f"{op}: no fastlayers layer for {n!r}; expected names among {', '.join(LAYER_NAMES)}")
    return {n: {d: {m: Repository(n) for m in mode_list} for d in dev_list} for n in names}
