"""Reference backend: plain PyTorch ops. The oracle in tests, and a readable statement of what
the fused backends compute. Runs on any device PyTorch runs on."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import SAVE_INPUT, SAVE_OUTPUT, Activation
from .._dtypes import compute_dtype

NAME = "reference"
DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None


_LOW = (torch.float16, torch.bfloat16)


def _opmath(t: Tensor) -> Tensor:
    """The dtype ATen's CPU kernels compute fp16 / bf16 in (fp32), rounded once at the end."""
    return t.float() if t.dtype in _LOW else t


def act_forward(z: Tensor, act: Activation, slope: float) -> Tensor:
    """act(z) by ATen's formula at every size. PyTorch's own op (act.ref) everywhere but GELU, whose
    vectorised CPU loop (run on tensors of two elements and more) gives gelu(+inf) = NaN and
    gelu(z) = inf for z >= ~1.7e38, where its formula z * 0.5 * (1 + erf(z / sqrt 2)) gives inf and z."""
    if act.name == "gelu":
        zf = _opmath(z)
        return (zf * 0.5 * (1 + torch.erf(zf * 0.7071067811865476))).to(z.dtype)
    return act.ref(z, slope)


def linear_act_forward(x: Tensor, w: Tensor, b: Optional[Tensor], act: Activation, slope: float,
                       save: bool) -> Tuple[Tensor, Optional[Tensor]]:
    z = F.linear(x, w, b)  # (M, N)
    y = act_forward(z, act, slope)
    if act.name == "none":
        y = z
    if not save:
        return y, None
    kind = act.saves(slope)
    return y, (y if kind == SAVE_OUTPUT else z if kind == SAVE_INPUT else None)


def act_grad(dy: Tensor, saved: Optional[Tensor], act: Activation, slope: float) -> Tensor:
    """dz = dy * act'(z), from whichever of y / z the forward saved (PyTorch's own backward ops, but
    where their vectorised loop, run on long tensors, departs from ATen's formula: hardswish and
    relu6 at NaN, written out below as the formula)."""
    name = act.name
    if name == "none":
        return dy
    if name == "relu":
        return torch.ops.aten.threshold_backward(dy, saved, 0)
    if name == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(dy, saved, slope, slope >= 0)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(dy, saved)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(dy, saved, approximate="tanh")
    if name == "silu":
        return torch.ops.aten.silu_backward(dy, saved)
    if name == "sigmoid":
        return torch.ops.aten.sigmoid_backward(dy, saved)
    if name == "tanh":
        return torch.ops.aten.tanh_backward(dy, saved)
    if name == "hardswish":  # 0 (z <= -3), dy (z / 3 + 1/2) (z < 3), else dy (NaN: dy)
        s, g = _opmath(saved), _opmath(dy)
        return torch.where(s <= -3, 0.0, torch.where(s < 3, g * (s / 3 + 0.5), g)).to(dy.dtype)
    if name == "hardsigmoid":
        return torch.ops.aten.hardsigmoid_backward(dy, saved)
    if name == "relu6":  # hardtanh_backward's formula from y (y <= 0 <=> z <= 0 ...; NaN passes dy)
        return torch.where((saved <= 0) | (saved >= 6), 0.0, dy)
    if name == "mish":
        return torch.ops.aten.mish_backward(dy, saved)
    if name == "quick_gelu":  # no ATen op: autograd's product rule on z * sigmoid(1.702 z), in the
        # order autograd evaluates it (fp32 for fp16 / bf16, rounded once, like the forward)
        z, g = (saved.float(), dy.float()) if saved.dtype in (torch.float16, torch.bfloat16) else (saved, dy)
        s = torch.sigmoid(1.702 * z)
        return (g * s + 1.702 * torch.ops.aten.sigmoid_backward(g * z, s)).to(dy.dtype)
    raise AssertionError(name)


def linear_act_backward(dy: Tensor, x: Tensor, w: Tensor, saved: Optional[Tensor], act: Activation,
                        slope: float, needs: Tuple[bool, bool, bool]):
    dz = act_grad(dy, saved, act, slope)  # (M, N)
    dx = dz @ w if needs[0] else None      # (M, K)
    dw = dz.t() @ x if needs[1] else None  # (N, K)
    db = dz.sum(0) if needs[2] else None   # (N,)
    return dx, dw, db


def softmax_forward(x: Tensor, log: bool) -> Tensor:
    return torch.log_softmax(x, 1) if log else torch.softmax(x, 1)


def softmax_backward(dy: Tensor, y: Tensor, log: bool) -> Tensor:
    if log:
        return torch.ops.aten._log_softmax_backward_data(dy, y, 1, y.dtype)
    return torch.ops.aten._softmax_backward_data(dy, y, 1, y.dtype)


# --- gated linear
def gated_forward(x: Tensor, wg: Tensor, wu: Tensor, bg: Optional[Tensor], bu: Optional[Tensor],
                  act: Activation, slope: float, save: bool):
    """h = act(x Wg^T + bg) * (x Wu^T + bu); saved = (g, u), the pre-activations (M, N)."""
    g, u = F.linear(x, wg, bg), F.linear(x, wu, bu)  # (M, N) each
    h = (g if act.name == "none" else act_forward(g, act, slope)) * u
    return h, ((g, u) if save else None)


def gated_backward(dh: Tensor, x: Tensor, wg: Tensor, wu: Tensor, saved, act: Activation, slope: float,
                   needs: Tuple[bool, bool, bool, bool, bool]):
    """dg = act'(g) * (dh * u), du = dh * act(g); dx = dg Wg + du Wu, dW* = d*^T x, db* = d*.sum(0)."""
    g, u = saved
    a = g if act.name == "none" else act_forward(g, act, slope)
    kind = act.saves(slope)
    dg = act_grad(dh * u, a if kind == SAVE_OUTPUT else g if kind == SAVE_INPUT else None, act, slope)
    du = dh * a
    dx = dg @ wg + du @ wu if needs[0] else None
    return (dx, dg.t() @ x if needs[1] else None, du.t() @ x if needs[2] else None,
            dg.sum(0) if needs[3] else None, du.sum(0) if needs[4] else None)

# --- cross entropy (contract in fastlayers/backends/contract.py; the math in fastlayers/ops/_loss.py)
def _ce_coefficients(xc: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                     eps: float, col0: int = 0, classes: Optional[int] = None) -> Tensor:
    """c (N, C'): the row's coefficients, loss_i = sum_j c_ij (log S_i - (x_ij - M_i)), over the columns
    [col0, col0 + C') of rows with `classes` classes (all of them by default)."""
    n, nc = xc.shape
    C = nc if classes is None else classes
    w = torch.ones(C, dtype=xc.dtype, device=xc.device) if weight is None else weight.to(xc.dtype)
    if target.is_floating_point():
        q = target.to(xc.dtype)
        if eps > 0:
            q = q * (1 - eps) + eps / C
        return w * q
    keep = target != ignore_index
    t = torch.where(keep, target, 0)
    c = (eps / C) * w[col0:col0 + nc].expand(n, nc).clone() if eps > 0 else xc.new_zeros(n, nc)
    here = keep & (t >= col0) & (t < col0 + nc)  # the target's column is in this block
    c.scatter_add_(1, torch.where(here, t - col0, 0)[:, None], torch.where(here, (1 - eps) * w[t], 0)[:, None])
    return torch.where(keep[:, None], c, 0)


def cross_entropy_forward(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                          eps: float) -> Tuple[Tensor, Tensor]:
    cd = compute_dtype(x.dtype)
    xc = x.to(cd)  # (N, C)
    n, C = xc.shape
    if C == 0:
        z = xc.new_zeros(n)
        return z, torch.stack([z, z, z], 1)
    m = xc.amax(1)                                                   # (N,)
    shifted = xc - m[:, None]
    log_s = shifted.exp().sum(1).log()
    logp = shifted - log_s[:, None]                                  # (N, C), torch's log_softmax
    c = _ce_coefficients(xc, target, weight, ignore_index, eps)
    if not target.is_floating_point() and eps == 0:
        # only the target's term: no 0 * (-inf) from classes with c = 0 (torch's nll_loss)
        keep = target != ignore_index
        t = torch.where(keep, target, 0)
        rows = torch.where(keep, -(c.gather(1, t[:, None]) * logp.gather(1, t[:, None]))[:, 0], 0)
    elif not target.is_floating_point():
        keep = target != ignore_index
        t = torch.where(keep, target, 0)
        w = torch.ones(C, dtype=cd, device=x.device) if weight is None else weight.to(cd)
        nll = -(w[t] * logp.gather(1, t[:, None])[:, 0])
        smooth = -(logp * w).sum(1)
        rows = torch.where(keep, (1 - eps) * nll + (eps / C) * smooth, 0)
    else:
        rows = -(c * logp).sum(1)
    return rows, torch.stack([m, log_s, c.sum(1)], 1)


def cross_entropy_backward(x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                           scale: Tensor, ignore_index: int, eps: float, out: Tensor, col0: int = 0,
                           classes: Optional[int] = None) -> Tensor:
    cd = stats.dtype
    xc = x.to(cd)
    m, log_s, a = stats.unbind(1)
    p = ((xc - m[:, None]) - log_s[:, None]).exp()                  # (N, C') softmax
    c = _ce_coefficients(xc, target, weight, ignore_index, eps, col0, classes)
    dx = scale[:, None] * (p * a[:, None] - c)
    return dx.to(x.dtype) if out is None else out.copy_(dx)


def linear_ce_logits(h: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
    """linear_act_forward's logits for act "none" (F.linear; a new tensor, out unused)."""
    return F.linear(h, w, b)


def logits_into(h: Tensor, w: Tensor, b: Optional[Tensor]) -> bool:
    """linear_ce_logits returns F.linear's new tensor."""
    return False


def linear_ce_chunk_grads(dz: Tensor, h: Tensor, w: Tensor, dh: Optional[Tensor], dw: Optional[Tensor],
                          db: Optional[Tensor], accumulate: bool) -> None:
    """dh, dw, db = (or += when accumulate) dz @ w, dz^T @ h, colsum(dz), in whatever dtype they have.
    dz: (m, V') contiguous, h: (m, H), w: (V', H); each output may be a view into a larger tensor."""
    sums = {"dh": lambda: dz @ w, "dw": lambda: dz.t() @ h,
            "db": lambda: dz.sum(0, dtype=torch.promote_types(dz.dtype, torch.float32))}
    for out, new in zip((dh, dw, db), sums.values()):
        if out is not None:
            out.copy_(out + new().to(out.dtype) if accumulate else new())


# --- norms (fastlayers/ops/norms.py): RMSNorm / LayerNorm over the rows of (M, N), residual add in front
def _norm_xhat(src: Tensor, mean: Optional[Tensor], rstd: Tensor) -> Tensor:
    xc = src.to(rstd.dtype)
    return (xc - mean[:, None]) * rstd[:, None] if mean is not None else xc * rstd[:, None]


def norm_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float, kind: str, save: bool):
    """(y, s, mean, rstd): s = x + residual in x's dtype (None without a residual); y = norm(s or x);
    mean (M,) for "layer" else None, rstd (M,), in the compute dtype (fp32; fp64 for fp64)."""
    s = x + residual if residual is not None else None
    src = x if s is None else s
    xc = src.to(compute_dtype(src.dtype))
    if kind == "layer":
        var, mean = torch.var_mean(xc, dim=1, correction=0)
    else:
        var, mean = xc.pow(2).mean(1), None
    rstd = torch.rsqrt(var + eps)
    xhat = _norm_xhat(src, mean, rstd)
    if kind == "rms_hf":  # LlamaRMSNorm: cast back first, then weight * that in the weight's dtype
        y = xhat.to(x.dtype)
        y = weight * y if weight is not None else y
    else:
        y = xhat * weight.to(xc.dtype) if weight is not None else xhat
        if bias is not None:
            y = y + bias.to(xc.dtype)
        y = y.to(x.dtype)
    return y, s, (mean if save else None), (rstd if save else None)


def norm_backward(dy: Tensor, ds: Optional[Tensor], src: Tensor, weight: Optional[Tensor],
                  mean: Optional[Tensor], rstd: Tensor, kind: str, needs):
    """(dx, dw, db) from what norm_forward saved; ds (the returned sum's gradient) is added to dx."""
    xhat = _norm_xhat(src, mean, rstd)
    cd = rstd.dtype
    g = dy.to(cd)
    dxh = g * weight.to(cd) if weight is not None else g
    dx = dw = db = None
    if needs[0]:
        c2 = (dxh * xhat).mean(1, keepdim=True)
        d = dxh - xhat * c2
        if kind == "layer":
            d = d - dxh.mean(1, keepdim=True)
        dx = d * rstd[:, None]
        if ds is not None:
            dx = dx + ds.to(cd)
        dx = dx.to(src.dtype)
    if needs[1] and weight is not None:
        xw = xhat.to(src.dtype).to(cd) if kind == "rms_hf" else xhat
        dw = (g * xw).sum(0).to(weight.dtype)
    if len(needs) > 2 and needs[2]:
        db = g.sum(0).to(src.dtype)
    return dx, dw, db


# --- rotary (fastlayers/ops/rotary.py): Hugging Face's apply_rotary_pos_emb on (n0, n1, n2, D) views
def _rotate(x: Tensor, interleaved: bool, transpose: bool) -> Tensor:
    """rotate_half(x) (pairs (i, i + R/2)) or GPT-J's rotate_every_two (pairs (2i, 2i+1)) over the
    last dim; transpose: the transposed map (the backward's)."""
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        pair = torch.stack((b, -a) if transpose else (-b, a), dim=-1)
        return pair.flatten(-2)
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return torch.cat((b, -a) if transpose else (-b, a), dim=-1)


def rotary(q: Tensor, k: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor, sin_k: Tensor, out_q: Tensor,
           out_k: Tensor, interleaved: bool, inverse: bool) -> None:
    """The backend contract of fastlayers/ops/rotary.py in PyTorch ops: writes out_q, out_k. The math
    is in x's dtype, op by op as eager: for bf16 / fp16 each product and the sum rounds to it
    (PyTorch's 16-bit ops round each result once), the kernels' contract for 16-bit."""
    for x, c, s, out in ((q, cos_q, sin_q, out_q), (k, cos_k, sin_k, out_k)):
        r = c.shape[-1]
        xr = x[..., :r]
        if inverse:
            y = xr * c + _rotate(xr * s, interleaved, True)
        else:
            y = xr * c + _rotate(xr, interleaved, False) * s
        out[..., :r] = y
        out[..., r:] = x[..., r:]


# --- attention-score softmax (fastlayers/ops/attention_softmax.py)
# x: (B, H, L, S) contiguous scores; mask: None or a (B, H, L, S) strided view (bool: True takes part;
# or floating in x's dtype, added); causal: column j > row i masked.
def _attn_keep(mask: Optional[Tensor], causal: bool, L: int, S: int, device) -> Optional[Tensor]:
    keep = mask if mask is not None and mask.dtype == torch.bool else None
    if causal:
        tri = torch.ones(L, S, dtype=torch.bool, device=device).tril()
        keep = tri if keep is None else keep & tri
    return keep


def attn_scores(x: Tensor, scale: float, mask: Optional[Tensor], causal: bool) -> Tensor:
    """x * scale [+ an additive mask], -inf where a boolean mask or causality drops a key (eager's
    rounding: each op rounds to the dtype of its result)."""
    z = x * scale
    if mask is not None and mask.dtype != torch.bool:
        z = z + mask
    keep = _attn_keep(mask, causal, z.shape[-2], z.shape[-1], z.device)
    return z if keep is None else z.masked_fill(~keep, float("-inf"))


def attention_softmax_forward(x: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                              out_dtype: torch.dtype) -> Tensor:
    """softmax(masked(x * scale [+ mask])) in out_dtype: z rounded to x's dtype as eager rounds it,
    the softmax in fp32 (fp64 for fp64) rounded once."""
    z = attn_scores(x, scale, mask, causal)
    return torch.softmax(z, -1, dtype=torch.float32 if z.dtype in _LOW else z.dtype).to(out_dtype).contiguous()


def attention_softmax_backward(dy: Tensor, y: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                               in_dtype: torch.dtype) -> Tensor:
    """dscores = where(keep, y * (dy - sum(dy * y)) * scale, 0) in the compute dtype, rounded once to
    in_dtype; keep = the boolean mask (a floating one is not read) and / or causal."""
    cd = compute_dtype(y.dtype)
    yc, g = y.to(cd), dy.to(cd)
    dz = yc * (g - (g * yc).sum(-1, keepdim=True)) * scale
    keep = _attn_keep(mask, causal, y.shape[-2], y.shape[-1], y.device)
    if keep is not None:
        dz = dz.masked_fill(~keep, 0.0)
    return dz.to(in_dtype).contiguous()


# --- fused attention (fastlayers/ops/attention.py): q (B, H, L, D), k, v (B, H, S, D), any strides
def _attn_probs(q: Tensor, k: Tensor, scale: float, causal: bool, lse: Optional[Tensor] = None):
    """(scores scale q k^T in the compute dtype, -inf past the diagonal when causal; their rows'
    logsumexp) -- or, given the forward's lse, the probabilities exp(scores - lse) instead."""
    cd = compute_dtype(q.dtype)
    s = (q.to(cd) @ k.to(cd).transpose(-2, -1)) * scale
    if causal:
        keep = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return (s, torch.logsumexp(s, -1)) if lse is None else torch.exp(s - lse[..., None])


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tuple[Tensor, Tensor]:
    """(out (B, H, L, D) in q's dtype, lse (B, H, L) in the compute dtype): softmax in the compute
    dtype, rounded once."""
    s, lse = _attn_probs(q, k, scale, causal)
    out = torch.exp(s - lse[..., None]) @ v.to(s.dtype)
    return torch.empty_like(q).copy_(out), lse  # (laid out as the contract says)


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                       causal: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) laid out as q, k, v (torch.empty_like) from p = exp(scores - lse): dp = dout v^T,
    ds = p (dp - rowsum(dout * out)), dq = scale ds k, dk = scale ds^T q, dv = p^T dout (compute
    dtype, each rounded once)."""
    p = _attn_probs(q, k, scale, causal, lse)
    cd = p.dtype
    g = dout.to(cd)
    ds = p * (g @ v.to(cd).transpose(-2, -1) - (g * out.to(cd)).sum(-1, keepdim=True))
    dq = (ds @ k.to(cd)) * scale
    dk = (ds.transpose(-2, -1) @ q.to(cd)) * scale
    dv = p.transpose(-2, -1) @ g
    return tuple(torch.empty_like(t).copy_(d) for t, d in ((q, dq), (k, dk), (v, dv)))
