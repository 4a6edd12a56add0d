"""The attention-score softmax, fused: ``softmax(scores * scale + mask)`` with an additive or
boolean mask and a causal option, forward and backward one pass each (checks -> the one autograd
Function -> the route -> the public function -> torch.library ops -> the module).

    fl.attention_softmax(scores, scale=1.0, mask=None, causal=False, dtype=None)
    fl.AttentionSoftmax(scale=1.0, causal=False)

Semantics (the composite, ``attention_softmax_composite``, is the statement and the oracle):
    z = scores * scale                       (in scores' dtype, as eager rounds it)
    z = z + mask                             a floating mask, broadcastable to scores (PyTorch's
                                             type promotion; eager's rounding)
    z = z.masked_fill(~keep, -inf)           keep: a boolean mask (True = takes part, SDPA's
                                             convention) and/or causal (column j > row i masked,
                                             top-left aligned as SDPA's is_causal /
                                             ``torch.ones(L, S).tril()``)
    softmax(z, -1, dtype=dtype)              for 16-bit z without dtype: computed in float32 and
                                             rounded once, ``softmax(z, -1, dtype=float32).to(z.dtype)``
                                             -- Hugging Face eager attention's expression, bit for bit.
(torch.softmax on a bfloat16 / float16 tensor itself is *not* bit-identical to that: measured on
torch 2.13's CPU kernel, about 1 element in 10^5 differs by one ulp; this op follows Hugging Face.)
Masked positions are -inf whatever their score (masked_fill, as nanoGPT writes it; SDPA's math
path adds -inf instead, which differs only where a masked score is +inf or NaN). A fully masked
row is NaN, as softmax over all -inf is; NaN / +inf scores give eager's NaN rows.

Masks are never materialised: a (B|1, H|1, L|1, S|1) mask (any shape broadcastable to scores) is
read through its strides, 0 on the broadcast dims; causal is computed from the row and column
indices. (Scores of more than 4 dims whose mask's leading dims cannot be merged into two strided
dims are the one case where the expanded mask is copied.)

Saved for backward:
    eager (Hugging Face's ``softmax(scores * scaling + mask, dtype=float32).to(dtype)``): the
        float32 softmax output (SoftmaxBackward; the scale and the mask add keep nothing) -- 4
        bytes per score, twice the bf16 probabilities the next matmul saves too.
    fastlayers: only y, the output (in its own dtype: the same tensor the probabilities @ V matmul
        saves, so no extra memory), and a reference to a boolean mask (an input: no copy; the
        backward writes exact zeros at masked positions, as masked_fill's backward does).
Backward: ``dscores = where(keep, y * (dy - sum(dy * y)) * scale, 0)``, one pass per row, in
float32 from the saved y. For 16-bit outputs that is the rounded y, as torch.softmax's own 16-bit
backward reads it: where dy is nearly constant along a row (sum(dy * y) cancels against dy) the
gradient is then less accurate than Hugging Face's, whose float32 copy is the price of its accuracy
(the tests hold ours to twice torch's own 16-bit softmax error).
A floating mask that requires grad takes the composite route (PyTorch's autograd gives it its
gradient, dz reduced over the broadcast dims): a rare case, not worth a kernel.

Routes (FusedOp.run, fastlayers/ops/_autograd.py): the registered op fastlayers::attention_softmax while
torch.compile / jit.trace record; the composite for fake tensors, tensor subclasses, torch.func
transforms, dispatch modes, a floating mask of another dtype than scores or needing grad, dtype=
other than the scores' own or float32 for 16-bit scores, empty tensors and small CPU calls
(_TORCH_MAX_NUMEL); else a backend's kernels (cpu -> cpp, cuda -> triton), through the Function
when a gradient is needed.

Autocast: as torch.softmax -- left alone on the CPU (checked on torch 2.13: bfloat16 in, bfloat16
out; float32 in, float32 out), float32 on CUDA when no dtype is given (autocast's
fp32_set_opt_dtype policy; not checked on a GPU here).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _autocast
from .._dispatch import FLOATS, backend_for, check_tensor, placeholder
from ._autograd import FusedOp, define
from .._errors import DeviceError, DTypeError, ShapeError
from ..backends import forced
from ..backends.reference import attention_softmax_backward as _attention_softmax_backward, attn_scores as _scores

OP = "fastlayers.attention_softmax"
_LOW = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- argument checks
def _check(scores: object, scale: object, mask: object, causal: object, dtype: object) -> float:
    """Validates every argument; returns scale as a float."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"{OP}: expected scores to be a torch.Tensor, got {type(scores).__name__}")
    check_tensor(OP, "scores", scores)
    if scores.dim() < 2:
        raise ShapeError(f"{OP}: expected scores of shape (*, L, S) (at least 2 dims), got shape "
                         f"{tuple(scores.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{OP}: expected scale to be a real number, got {type(scale).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"{OP}: expected causal to be a bool, got {type(causal).__name__}")
    if dtype is not None and dtype not in FLOATS:
        raise DTypeError(f"{OP}: expected dtype to be None or a floating-point dtype (float16, bfloat16, "
                         f"float32 or float64), got {dtype}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{OP}: expected mask to be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            if mask.dtype not in FLOATS:
                raise DTypeError(f"{OP}: expected mask to be a boolean or floating-point tensor, got dtype "
                                 f"{mask.dtype}")
            check_tensor(OP, "mask", mask)
        elif mask.is_nested or mask.layout != torch.strided:
            raise TypeError(f"{OP}: expected mask to be a dense (strided) tensor")
        try:
            shape = torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError:
            shape = None
        if shape != scores.shape:
            raise ShapeError(f"{OP}: expected mask broadcastable to scores' shape {tuple(scores.shape)}, got "
                             f"shape {tuple(mask.shape)}")
        if mask.device != scores.device:
            raise DeviceError(f"{OP}: expected mask on the same device as scores ({scores.device}), got "
                              f"{mask.device}")
    return float(scale)


# ----------------------------------------------------------------------------- composite
def attention_softmax_composite(scores: Tensor, scale: float, mask: Optional[Tensor], causal: bool,
                                dtype: Optional[torch.dtype]) -> Tensor:
    """The PyTorch-ops statement of the op (composite route, the oracle)."""
    z = _scores(scores, scale, mask, causal)
    if dtype is None and z.dtype in _LOW:  # fp32 math, one rounding: Hugging Face's expression
        return torch.softmax(z, -1, dtype=torch.float32).to(z.dtype)
    return torch.softmax(z, -1, dtype=dtype)


# ----------------------------------------------------------------------------- layouts
def _mask_lead(mask: Tensor, shape: torch.Size) -> Tuple[Tensor, int, int]:
    """The mask expanded to `shape` (a view), its leading dims merged into two strided dims:
    returns (m4, g0, g1), m4 a (g0, g1, L, S) strided view of the mask's storage."""
    me = mask.expand(shape)
    L, S = shape[-2], shape[-1]
    groups = []  # (size, stride) of the leading dims, size-1 dims dropped, mergeable ones merged
    for size, stride in zip(me.shape[:-2], me.stride()[:-2]):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = (groups[-1][0] * size, stride)
        else:
            groups.append((size, stride))
    if len(groups) > 2:  # not expressible by two strides: the one case that copies the mask
        me = me.contiguous()
        groups = [(math.prod(shape[:-2]), L * S)]
    groups = [(1, 0)] * (2 - len(groups)) + groups
    (g0, s0), (g1, s1) = groups
    m4 = me.as_strided((g0, g1, L, S), (s0, s1, me.stride(-2), me.stride(-1)), me.storage_offset())
    return m4, g0, g1


def _layout(scores: Tensor, mask: Optional[Tensor]):
    """scores as a contiguous (g0, g1, L, S) tensor and the mask as a (g0, g1, L, S) strided view
    (or None); g0 * g1 = the product of scores' leading dims."""
    L, S = scores.shape[-2], scores.shape[-1]
    if mask is not None:
        m4, g0, g1 = _mask_lead(mask, scores.shape)
    else:
        m4, g0, g1 = None, 1, math.prod(scores.shape[:-2])
    return scores.contiguous().view(g0, g1, L, S), m4


def _bool_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    return mask if mask is not None and mask.dtype == torch.bool else None


# ----------------------------------------------------------------------------- the op
class AttentionSoftmaxOp(FusedOp):
    """y = softmax(mask(scores * scale)) in out_dtype; saves y and a boolean mask (a reference; an
    additive mask is not needed by the backward). in_dtype: the scores' dtype, the gradient's."""
    name, public = "attention_softmax", OP
    schema = "Tensor scores, Tensor? mask, float scale, bool causal, ScalarType out_dtype, ScalarType in_dtype"
    n_inputs = 2

    def backend(self, device, dtype, params):
        return backend_for(OP, device, params[3])

    def forward(self, backend, inputs, params, save):
        (scores, mask), (scale, causal, out_dtype, _) = inputs, params
        x4, m4 = _layout(scores, mask)
        return (backend.attention_softmax_forward(x4, m4, scale, causal, out_dtype).view(scores.shape),), ()

    def save(self, inputs, outputs, extras, params):
        return outputs[0], _bool_mask(inputs[1])

    def backward(self, backend, saved, grads, needs, params):
        (y, bmask), (scale, causal, _, in_dtype) = saved, params
        y4, m4 = _layout(y, bmask)
        dy4 = grads[0].contiguous().view(y4.shape)
        return backend.attention_softmax_backward(dy4, y4, m4, scale, causal, in_dtype).view(y.shape), None

    def backward_graph(self, saved, grads, needs, params):
        (y, bmask), (scale, causal, _, in_dtype) = saved, params
        return _attention_softmax_backward(grads[0], y, bmask, scale, causal, in_dtype), None  # PyTorch ops

    def fake(self, inputs, params):
        return (inputs[0].new_empty(inputs[0].shape, dtype=params[2]),)

    def fake_backward(self, saved, grads, needs, params):
        y = saved[0]
        return y.new_empty(y.shape, dtype=params[3]), placeholder(y)


ATTENTION_SOFTMAX = define(AttentionSoftmaxOp())
AttentionSoftmaxFunction = ATTENTION_SOFTMAX.Function


# ----------------------------------------------------------------------------- the route
# CPU calls below this many scores (no backend forced) run the composite: the fused path's fixed cost is
# more than it saves (measurements: bench/results/cpu-routes.md)
_TORCH_MAX_NUMEL = 1 << 14


def _out_dtype(scores: Tensor, mask: Optional[Tensor], dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    if mask is not None and mask.dtype != torch.bool:
        return torch.promote_types(scores.dtype, mask.dtype)
    return scores.dtype


def _kernels_take(scores: Tensor, mask: Optional[Tensor], out_dtype: torch.dtype) -> bool:
    """Whether the kernels compute this call exactly as the composite states it."""
    if scores.numel() == 0:
        return False
    if mask is not None and mask.dtype != torch.bool:
        if mask.dtype != scores.dtype or (mask.requires_grad and torch.is_grad_enabled()):
            return False
    return out_dtype == scores.dtype or (scores.dtype in _LOW and out_dtype == torch.float32)


def _route(scores: Tensor, scale: float, mask: Optional[Tensor], causal: bool, dtype: Optional[torch.dtype]) -> Tensor:
    dtype = _autocast.softmax_dtype(scores, dtype)
    out_dtype = _out_dtype(scores, mask, dtype)
    if not _kernels_take(scores, mask, out_dtype):
        return attention_softmax_composite(scores, scale, mask, causal, dtype)
    small = scores.is_cpu and scores.numel() < _TORCH_MAX_NUMEL and forced() is None

    def composite(inputs, params):  # with the caller's dtype (None: Hugging Face's 16-bit expression)
        return (attention_softmax_composite(scores, scale, mask, causal, dtype),)
    return ATTENTION_SOFTMAX.run((scores, mask), (scale, causal, out_dtype, scores.dtype), composite, small)[0]


def attention_softmax(scores: Tensor, scale: float = 1.0, mask: Optional[Tensor] = None, causal: bool = False,
                      dtype: Optional[torch.dtype] = None) -> Tensor:
    """``softmax(scores * scale + mask, dim=-1)``, the attention probabilities, fused: one pass
    forward, one backward, rows of any length.

    scores: (*, L, S), L queries by S keys (e.g. ``q @ k.transpose(-2, -1)``, (B, H, L, S)).
    scale: multiplies the scores first (e.g. ``head_dim ** -0.5``).
    mask: None; a floating tensor added to the scaled scores (Hugging Face's additive mask); or a
        boolean tensor, True where a key takes part (SDPA's convention), False -> -inf. Either
        broadcastable to scores ((B|1, H|1, L|1, S|1)) and read through its strides, never
        expanded in memory.
    causal: mask key j > query i (top-left aligned, as SDPA's is_causal), from the indices; with a
        mask both apply.
    dtype: the result's dtype, as torch.softmax's dtype= (the masked scores are cast to it first).
        Without it, 16-bit scores give 16-bit probabilities computed in float32 and rounded once
        (= ``softmax(..., dtype=torch.float32).to(scores.dtype)``, Hugging Face's eager attention).

    Saved for backward: only y (the output, which the next matmul saves anyway) and a reference to
    a boolean mask; eager attention's softmax saves a float32 copy of the probabilities. A fully
    masked row is NaN (softmax over all -inf), its gradient 0 (masked_fill's backward).
    """
    scale = _check(scores, scale, mask, causal, dtype)
    return _route(scores, scale, mask, causal, dtype)


# ----------------------------------------------------------------------------- module
class AttentionSoftmax(nn.Module):
    """``forward(scores, mask=None)`` = ``attention_softmax(scores, self.scale, mask, self.causal)``."""

    def __init__(self, scale: float = 1.0, causal: bool = False) -> None:
        super().__init__()
        self.scale, self.causal = float(scale), bool(causal)

    def forward(self, scores: Tensor, mask: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
        return attention_softmax(scores, self.scale, mask, self.causal, dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, causal={self.causal}"
