"""Rotary position embeddings: Hugging Face's ``apply_rotary_pos_emb`` for q and k in one pass each
way -- the checks, the one autograd Function, the route, the public function and its torch.library ops.

    q_embed, k_embed = fl.rotary(q, k, cos, sin, unsqueeze_dim=1, interleaved=False)

Semantics (transformers' Llama ``apply_rotary_pos_emb``, with PyTorch's broadcasting and type
promotion): ``cos = cos.unsqueeze(unsqueeze_dim)`` (sin alike), ``q_embed = q * cos + rotate_half(q) * sin``,
k the same. With ``R = cos.shape[-1]`` smaller than the head dim only the first R dims rotate and the
rest pass through, as GPT-NeoX / Phi / StableLM / GLM write it (``cat([rot(q[..., :R]), q[..., R:]], -1)``;
the result is then contiguous, as torch.cat's). ``interleaved=True``: GPT-J's ``rotate_every_two``
(pairs (2i, 2i+1)) with cos / sin in that layout (each frequency repeated twice, adjacent).

What is saved for backward (checked with saved_tensors_hooks, torch 2.13):
    eager: views of cos and sin only (four references, no copies) -- the same memory as here, as long
        as cos / sin need no gradient (then eager also keeps q, k and their rotate_half, q- and
        k-sized). Eager's cost is its passes: per tensor it writes four q-sized temporaries forward
        (x * cos, the rotate_half cat, its product with sin, the sum) and as many backward.
    fastlayers: cos and sin only (the inputs themselves, no copies); the backward is the rotation by
        -sin: ``dq = dq_embed * cos + rotate_half^T(dq_embed * sin)``, one pass over q's and k's rows.

Numerics: bfloat16 / float16 give eager's bits, values and gradients: PyTorch's 16-bit ops compute
each op in float32 and round its result, so eager's ``q * cos + rotate_half(q) * sin`` is
rnd(rnd(q * cos) + rnd(rotate_half(q) * sin)) and its autograd's dq rnd(rnd(g * cos) +
rotate_half^T(rnd(g * sin))) (rotate_half and its transpose, permutations and negations, are
exact); the kernels compute in float32 and round at exactly those points (no FMA across them).
float32 / float64 results differ from eager's by rounding only (the kernels contract the
multiply-adds into FMAs, one rounding per element).

Routes (FusedOp.run, fastlayers/ops/_autograd.py): the registered op fastlayers::rotary while
torch.compile / jit.trace record; the PyTorch composite (the formula above in torch ops) for fake
tensors, subclasses, torch.func transforms, dispatch modes, for mixed dtypes (e.g. float32 cos with
bfloat16 q: PyTorch's type promotion gives a float32 result there), when cos or sin requires grad
(rare: their gradients are then autograd's own), and for layouts the kernels do not take (more than
three leading dims, a non-contiguous last dim, cos broadcasting q / k to a larger shape); else a
backend's kernels (cpu -> cpp, cuda -> triton), through the Function when a gradient is needed.

Inputs are typically the non-contiguous (B, H, S, D) views of ``.view(B, S, H, D).transpose(1, 2)``:
the kernels read them (any strides, last dim contiguous) without copies, and write outputs in the
layout eager's ``q * cos + ...`` gives (q's own layout; contiguous with partial rotary).

Autocast: mul / add / cat are on none of autocast's lists (CPU or CUDA), so eager leaves the dtypes
alone under autocast; so does this op (a bfloat16 q with float32 cos takes the composite and gives
float32, as eager).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._dispatch import check_int, check_tensor, empty_contiguous, placeholder
from .._errors import DeviceError, ShapeError
from ..backends import forced
from ._autograd import FusedOp, define

OP = "fastlayers.rotary"


# ----------------------------------------------------------------------------- argument checks
def _check(q: object, k: object, cos: object, sin: object, unsqueeze_dim: object, interleaved: object) -> int:
    """Validates the arguments; returns unsqueeze_dim as an int (in range for cos and sin)."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_tensor(OP, name, t)
        if t.dim() == 0:
            raise ShapeError(f"{OP}: expected {name} to have at least one dim, got a 0-d tensor")
    if not isinstance(interleaved, bool):
        raise TypeError(f"{OP}: expected interleaved to be a bool, got {type(interleaved).__name__}")
    ud = check_int(OP, "unsqueeze_dim", unsqueeze_dim)
    for name, t in (("cos", cos), ("sin", sin)):
        n = t.dim() + 1
        if not -n <= ud < n:
            raise IndexError(f"{OP}: unsqueeze_dim out of range for {name} of {t.dim()} dims (expected to be in "
                             f"range of [{-n}, {n - 1}], but got {ud})")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise DeviceError(f"{OP}: expected {name} on the same device as q ({q.device}), got {t.device}")
    r = cos.shape[-1]
    if sin.shape[-1] != r:
        raise ShapeError(f"{OP}: expected sin with the same last dim as cos ({r}), got shapes "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if r % 2:
        raise ShapeError(f"{OP}: expected an even rotary dim (cos.shape[-1]), got {r} (cos: {tuple(cos.shape)})")
    for name, t in (("q", q), ("k", k)):
        if t.shape[-1] < r:
            raise ShapeError(f"{OP}: {name} has head dim {t.shape[-1]} (shape {tuple(t.shape)}), smaller than the "
                             f"rotary dim {r} of cos (shape {tuple(cos.shape)}): expected cos.shape[-1] <= head dim")
    for name, t in (("cos", cos), ("sin", sin)):
        d = ud % (t.dim() + 1)
        tu = t.shape[:d] + (1,) + t.shape[d:]
        for xname, x in (("q", q), ("k", k)):
            if _broadcast(tu[:-1], x.shape[:-1]) is None:
                raise ShapeError(f"{OP}: {name} of shape {tuple(t.shape)}, unsqueezed at dim {d} to {tuple(tu)}, "
                                 f"does not broadcast with {xname} of shape {tuple(x.shape)}")
    return ud


def _broadcast(a: Tuple[int, ...], b: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
    """torch.broadcast_shapes(a, b), or None where they do not broadcast (~1 us; torch's: ~20 us)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


# ----------------------------------------------------------------------------- composite
def _rotate(x: Tensor, interleaved: bool) -> Tensor:
    """rotate_half (Llama) or rotate_every_two (GPT-J) over the last dim, as transformers writes them."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotary_composite(q: Tensor, k: Tensor, cos_u: Tensor, sin_u: Tensor, interleaved: bool) -> Tuple[Tensor, Tensor]:
    """The PyTorch-ops statement of the op on the unsqueezed cos / sin (composite route, the oracle)."""
    r = cos_u.shape[-1]

    def one(x: Tensor) -> Tensor:
        if x.shape[-1] == r:
            return x * cos_u + _rotate(x, interleaved) * sin_u
        xr = x[..., :r]
        return torch.cat([xr * cos_u + _rotate(xr, interleaved) * sin_u, x[..., r:]], dim=-1)
    return one(q), one(k)


# ----------------------------------------------------------------------------- layouts
def _as_4d(t: Tensor) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _table(t: Tensor, x: Tensor) -> Tensor:
    """cos / sin (unsqueezed) as a (n0, n1, n2, R) view broadcast to x's leading dims."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return _as_4d(t.expand(x.shape[:-1] + t.shape[-1:]))


def _fusable(x: Tensor, cos_u: Tensor) -> bool:
    """Whether the kernels take x with this cos: at most 3 leading dims, last dim contiguous, and
    cos broadcasting to x's leading dims without enlarging them."""
    if x.dim() > 4 or cos_u.dim() > x.dim() or (x.shape[-1] > 1 and x.stride(-1) != 1):
        return False
    return _broadcast(cos_u.shape[:-1], x.shape[:-1]) == tuple(x.shape[:-1])


def _like(x: Tensor) -> Tensor:
    """An uninitialised tensor in the layout TensorIterator gives ``x * cos`` (x first): x's own
    strides when x is dense (transposed views included), else dense in x's stride order."""
    if x.is_contiguous() or _dense(x):
        return empty_contiguous(x, preserve=True)  # (large CPU outputs: the output cache, x's strides)
    order = sorted(range(x.dim()), key=lambda i: -x.stride(i))
    out = x.new_empty([x.shape[i] for i in order])
    return out.permute([order.index(i) for i in range(x.dim())])


def _dense(x: Tensor) -> bool:
    """Non-overlapping and dense (some permutation of a contiguous tensor)."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(x.shape, x.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _out(x: Tensor, r: int) -> Tensor:
    """The forward's output for x: x's layout (full rotary), contiguous (partial: torch.cat's)."""
    return _like(x) if x.shape[-1] == r else empty_contiguous(x)


def _rows(g: Tensor) -> Tensor:
    """A gradient as the kernels read it: last dim contiguous (a sum()'s expanded gradient is copied)."""
    return g.contiguous() if g.shape[-1] > 1 and g.stride(-1) != 1 else g


def _memory_order(x: Tensor, *others: Tensor):
    """x and others (4-D, same leading shape) with their three leading dims permuted into x's memory
    order (largest stride first): the kernels then walk x's rows sequentially -- for a transposed
    (B, H, S, D) view, the heads of one position one after another, sharing its cos / sin row.
    Measured 2026-12-07 (Xeon, 1 thread, medians of 9, busy machine), q (1, 32, S, 128) + k (1, 8, S, 128)
    transposed views, S = 512 / 2048: 1.6-1.9x (fp32) and 1.8-2.6x (bf16) faster than (B, H, S) order."""
    order = sorted(range(3), key=lambda i: -x.stride(i) if x.shape[i] > 1 else 0)
    if order == [0, 1, 2]:
        return (x, *others)
    perm = order + [3]
    return tuple(t.permute(perm) for t in (x, *others))


def _apply(backend, q: Tensor, k: Tensor, cos_u: Tensor, sin_u: Tensor, interleaved: bool, inverse: bool,
           out_q: Tensor, out_k: Tensor) -> Tuple[Tensor, Tensor]:
    """The backend's kernel into out_q / out_k (shaped like q / k; any dense layout)."""
    q4, oq4, cq, sq = _memory_order(_as_4d(q), _as_4d(out_q), _table(cos_u, q), _table(sin_u, q))
    k4, ok4, ck, sk = _memory_order(_as_4d(k), _as_4d(out_k), _table(cos_u, k), _table(sin_u, k))
    backend.rotary(q4, k4, cq, sq, ck, sk, oq4, ok4, interleaved, inverse)
    return out_q, out_k


def _forward(backend, q, k, cos_u, sin_u, interleaved):
    r = cos_u.shape[-1]
    return _apply(backend, q, k, cos_u, sin_u, interleaved, False, _out(q, r), _out(k, r))


def _backward(backend, gq, gk, cos_u, sin_u, interleaved):
    gq, gk = _rows(gq), _rows(gk)
    return _apply(backend, gq, gk, cos_u, sin_u, interleaved, True, _like(gq), _like(gk))


def _backward_composite(gq: Tensor, gk: Tensor, cos_u: Tensor, sin_u: Tensor, interleaved: bool):
    """dq = g * cos + rotate^T(g * sin) in differentiable torch ops (create_graph=True)."""
    r = cos_u.shape[-1]

    def rot_t(y: Tensor) -> Tensor:  # the transpose of _rotate
        if interleaved:
            return torch.stack((y[..., 1::2], -y[..., 0::2]), dim=-1).flatten(-2)
        h = y.shape[-1] // 2
        return torch.cat((y[..., h:], -y[..., :h]), dim=-1)

    def one(g: Tensor) -> Tensor:
        gr = g[..., :r]
        d = gr * cos_u + rot_t(gr * sin_u)
        return d if g.shape[-1] == r else torch.cat([d, g[..., r:]], dim=-1)
    return one(gq), one(gk)


# ----------------------------------------------------------------------------- the op
class Rotary(FusedOp):
    """(q_embed, k_embed) = rotary(q, k) with cos / sin (unsqueezed, of q's dtype, in a layout
    _fusable accepts) as constants; saves cos and sin. Outputs in eager's layouts (_out, _like)."""
    name, public = "rotary", OP
    schema = "Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved"
    n_inputs, n_outputs = 4, 2
    contiguous_outputs = False

    def forward(self, backend, inputs, params, save):
        return _forward(backend, *inputs, *params), ()

    def save(self, inputs, outputs, extras, params):
        return inputs[2:]

    def backward(self, backend, saved, grads, needs, params):
        return _backward(backend, *grads, *saved, *params) + (None, None)

    def backward_graph(self, saved, grads, needs, params):
        return _backward_composite(*grads, *saved, *params) + (None, None)

    def fake(self, inputs, params):
        q, k, cos = inputs[:3]
        return _out(q, cos.shape[-1]), _out(k, cos.shape[-1])

    def fake_backward(self, saved, grads, needs, params):
        gq, gk = grads
        return _like(_rows(gq)), _like(_rows(gk)), placeholder(saved[0]), placeholder(saved[0])


ROTARY = define(Rotary())
RotaryFunction = ROTARY.Function


def _composite(inputs, params):
    return rotary_composite(*inputs, *params)


# ----------------------------------------------------------------------------- the route
# CPU calls below this many q + k elements (no backend forced) run the composite: the fused call's fixed
# cost is as much as eager's whole formula there (measurements: bench/results/cpu-routes.md)
_TORCH_MAX_NUMEL = 1 << 13


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1,
           interleaved: bool = False) -> Tuple[Tensor, Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``, fused: q and k in one
    pass forward, one pass backward.

    q, k: (..., D) (typically (B, H, S, D) strided views; k may have fewer heads, GQA); cos, sin:
    (..., R) broadcastable to q / k after ``unsqueeze(unsqueeze_dim)`` (typically (B, S, R)), R even,
    R <= D: the first R dims rotate, the rest pass through (partial rotary). interleaved: GPT-J's
    pair layout (2i, 2i+1) instead of rotate_half's (i, i + R/2). Returns (q_embed, k_embed) with
    eager's dtype (type promotion of q / k with cos / sin) and layout.
    Saved for backward: cos and sin only (no copies), as eager when cos / sin need no gradient.
    """
    ud = _check(q, k, cos, sin, unsqueeze_dim, interleaved)
    cos_u, sin_u = cos.unsqueeze(ud), sin.unsqueeze(ud)
    same = q.dtype == k.dtype == cos.dtype == sin.dtype and cos_u.shape == sin_u.shape
    table_grad = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    if not same or table_grad or not (_fusable(q, cos_u) and _fusable(k, cos_u)):
        return rotary_composite(q, k, cos_u, sin_u, interleaved)
    small = q.is_cpu and q.numel() + k.numel() < _TORCH_MAX_NUMEL and forced() is None
    return ROTARY.run((q, k, cos_u, sin_u), (interleaved,), _composite, small)
