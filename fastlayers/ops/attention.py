"""Fused scaled-dot-product attention with torch.nn.functional.scaled_dot_product_attention's
signature (the route -> the one autograd Function -> torch.library ops).

    fl.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    scale=None, enable_gqa=False)
        == F.scaled_dot_product_attention(...)   up to floating-point rounding

A drop-in: where the fused kernels take a call (below), they run; every other call is PyTorch's own
function, unchanged (masks, dropout, grouped-query heads, other devices, other shapes). The kernels
take 4-D (B, H, L, D) query and (B, H, S, D) key / value of one floating dtype on a backend with
fused attention (the CPU's), with no attn_mask, dropout_p == 0, the same heads in all three, one
head dim D, L, S >= 1, the last dim contiguous -- and, with no backend forced, where they are
faster than PyTorch's CPU flash attention (MAX_HEAD_DIM below: causal, small head dims, 16-bit
dtypes only when a gradient is needed). is_causal is top-left aligned,
as PyTorch's (query i sees keys j <= i); scale defaults to 1 / sqrt(D).

The CPU kernel (csrc/attention.cpp) never holds the (L, S) probabilities: blocks of 4 query rows
walk the keys (scores, softmax, output), and the backward recomputes the probabilities from the
saved row log-sum-exp (FlashAttention-2's equations), in float32 (float64 for float64), each
result rounded once. Measured against PyTorch's CPU flash attention at (4, 4, 256, 16), causal,
2 threads, nanoGPT's q, k, v views (bench/results/cpu-routes.md): forward + backward 1.1x in
float32, 2.7x in bfloat16 (PyTorch's bfloat16 backward is the slow part there).

Saved for backward: query, key, value (inputs: no copies), the output and the (B, H, L) row
log-sum-exp in float32 -- what PyTorch's flash attention saves; eager attention (the math path)
saves the (B, H, L, S) probabilities.
The output is laid out as torch.empty_like(query) (PyTorch's CPU flash attention's layout: for a
query that is a transposed view of (B, L, H, D) memory, (B, L, H, D) memory again, so a following
``transpose(1, 2).contiguous()`` copies nothing).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dispatch import FLOATS, backend_for
from ..backends import forced, select
from ._autograd import FusedOp, define

OP = "fastlayers.scaled_dot_product_attention"
# PyTorch's own function, taken at import: the fallback (swap points forwards at this module's function).
_TORCH_SDPA = F.scaled_dot_product_attention
# Which calls the fused kernels take with no backend forced (all others: PyTorch's function), from
# side-by-side runs against PyTorch's CPU flash attention on q, k, v as nanoGPT makes them
# (transposed views of one (B, T, 3 H D) buffer), (4, 4, 256, D), 2 threads, PyTorch time / ours
# (bench/results/cpu-routes.md, 2026-12-07):
#   causal float32        D 16: fwd+bwd 1.10, fwd 1.32;  D 32: 0.94 / 1.17;  D 64: 0.82 / 0.76
#   causal bfloat16       D 16: fwd+bwd 2.73, fwd 0.96;  D 32: 1.61 / 0.61;  D 64: 0.89 / 0.33
#   not causal, float32   D 16: fwd+bwd 0.80, fwd 0.81
# so: causal only; float32 up to D 16; bfloat16 / float16 up to D 32 and only with a gradient (its
# backward is the part PyTorch is slow at); float64 stays PyTorch's (exact either way).
MAX_HEAD_DIM = {torch.float32: 16, torch.bfloat16: 32, torch.float16: 32}
_NEEDS_GRAD = (torch.bfloat16, torch.float16)


class AttentionOp(FusedOp):
    """out = softmax(scale q k^T [causal]) v. Saves q, k, v (inputs), out and lse (B, H, L)."""
    name, public = "scaled_dot_product_attention", OP
    schema = "Tensor query, Tensor key, Tensor value, float scale, bool causal"
    n_inputs, n_extras = 3, 1
    contiguous_outputs = False  # out keeps torch.empty_like(query)'s layout, as the fake says

    def backend(self, device, dtype, params):
        """The selected backend where it has fused attention, else the reference backend (the
        registered op called directly with a backend forced that has none, e.g. triton)."""
        backend = backend_for(OP, device, dtype)
        if getattr(backend, "attention_forward", None) is None:
            from ..backends import reference
            return reference
        return backend

    def forward(self, backend, inputs, params, save):
        (q, k, v), (scale, causal) = inputs, params
        out, lse = backend.attention_forward(q, k, v, scale, causal)
        return (out,), (lse,)

    def save(self, inputs, outputs, extras, params):
        return inputs + outputs + extras

    def backward(self, backend, saved, grads, needs, params):
        q, k, v, out, lse = saved
        dout = grads[0] if grads[0].stride(-1) == 1 else grads[0].contiguous()
        g = backend.attention_backward(dout, q, k, v, out, lse, *params)
        return tuple(gi if need else None for gi, need in zip(g, needs))

    def backward_graph(self, saved, grads, needs, params):
        """First-order gradients as PyTorch ops (create_graph=True): the forward recomputed by
        PyTorch's math from the saved inputs."""
        q, k, v = saved[:3]
        wrt = [t for t, n in zip((q, k, v), needs) if n]
        with torch.enable_grad():
            out = _math(q, k, v, *params)
        got = iter(torch.autograd.grad(out, wrt, grads[0], create_graph=True))
        return tuple(next(got) if n else None for n in needs)

    def fake(self, inputs, params):
        q = inputs[0]
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64
                                                else torch.float32)

    def fake_backward(self, saved, grads, needs, params):
        q, k, v = saved[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


ATTENTION = define(AttentionOp())
AttentionFunction = ATTENTION.Function


def _math(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tensor:
    """softmax(scale q k^T [causal]) v in PyTorch ops (ATen's math path: differentiable twice)."""
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, is_causal=causal, scale=scale)[0]


def _backend_for(q: Tensor):
    """The backend that runs this call's kernels, or None (PyTorch's function runs)."""
    try:
        backend = select(q.device, OP)
    except Exception:  # noqa: BLE001  (no backend here: PyTorch's own function is the answer)
        return None
    if q.dtype not in backend.DTYPES or getattr(backend, "attention_forward", None) is None:
        return None
    return backend


def _pays(q: Tensor, k: Tensor, v: Tensor, D: int, causal: object) -> bool:
    """Whether the fused kernels are faster for this call (MAX_HEAD_DIM's measurements)."""
    if not causal or D > MAX_HEAD_DIM.get(q.dtype, 0):
        return False
    return q.dtype not in _NEEDS_GRAD or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                         or v.requires_grad))


def _kernels_take(q: object, k: object, v: object, attn_mask: object, dropout_p: object, scale: object,
                  causal: object) -> bool:
    """Whether the fused kernels compute this call as PyTorch's function does (module docstring)."""
    if not (type(q) in (Tensor, torch.nn.Parameter) and type(k) in (Tensor, torch.nn.Parameter)
            and type(v) in (Tensor, torch.nn.Parameter)):
        return False
    if q.is_nested or k.is_nested or v.is_nested or q.layout != torch.strided or k.layout != torch.strided \
            or v.layout != torch.strided or type(causal) is not bool:  # (PyTorch's own errors for a non-bool)
        return False
    if attn_mask is not None or not (type(dropout_p) in (int, float) and dropout_p == 0):
        return False
    if scale is not None and not (type(scale) in (int, float) and math.isfinite(scale)):
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.dtype not in FLOATS:
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        return False
    B, H, L, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        return False  # (grouped-query heads, broadcast batches, another value dim: PyTorch's function)
    if L == 0 or k.shape[2] == 0 or D == 0:
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    if forced() is None and not _pays(q, k, v, D, causal):
        return False
    return _backend_for(q) is not None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with fused kernels where they take the
    call (module docstring); PyTorch's own function otherwise, with the same arguments.

    query (B, H, L, D), key / value (B, H, S, D) -> (B, H, L, D) in query's dtype, laid out as
    torch.empty_like(query). Saved for backward: the inputs, the output and a (B, H, L) float32
    row log-sum-exp (no (L, S) probabilities).
    """
    if not _kernels_take(query, key, value, attn_mask, dropout_p, scale, is_causal):  # (enable_gqa: same heads only)
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    sc = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)

    def composite(inputs, params):
        return (_TORCH_SDPA(query, key, value, is_causal=is_causal, scale=sc),)
    return ATTENTION.run((query, key, value), (sc, is_causal), composite)[0]


__all__ = ["scaled_dot_product_attention", "AttentionFunction", "MAX_HEAD_DIM"]
