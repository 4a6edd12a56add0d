"""Linear + cross-entropy without materialised logits.

    fl.linear_cross_entropy(h, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
                            reduction="mean")              == F.cross_entropy(F.linear(h, weight, bias), target, ...)

The loss math: fastlayers/ops/_loss.py.

loss is reduced to one number ("mean", "sum") and the weight is fp32 / fp64, the whole gradient is
built in the forward, in 3 GEMMs like eager's (the chunk's dlogits are known there: the loss is
the output, its incoming gradient a scalar that only scales them):

  forward, by token chunks of at most forward_chunk_bytes of (chunk, V) logits: z = h_c W^T + b,
    the row losses and stats by the fused kernel over whole rows, dz over z in place (scaled for
    an incoming 1), then dh0_c = dz W, dW0 (+)= dz^T h_c (K = the chunk's tokens: chunk + dW
    within the budget of the plain forward's chunk, but at least FWD_DW_MIN_ROWS tokens, see
    forward_dw_chunk_bytes) and db0 (+)= colsum(dz).
  backward: dh = dh0 g, dW = dW0 g, db = db0 g for the incoming scalar g (no multiply when g is 1;
    the saved sums are never written, so retain_graph gives the same gradients twice).

Otherwise ("none": a per-row incoming gradient unknown in the forward; 16-bit weights, whose
running dW sum would need a (V, H) fp32 accumulator), dh0 alone comes from the forward and dW,
db from a gradient pass in the backward:

  backward (dW, db), by vocabulary blocks of about GRAD_BLOCK_BYTES of logits, each all N tokens
    by Vc entries: z_v = h W_v^T + b_v, dz_v = scale_i dloss_i/dz from z_v and the row stats (the
    target's term where it falls in the block, the smoothing share e/V everywhere), then
    dW_v = dz_v^T h written once in W's dtype (a GEMM with K = N) and db_v = colsum(dz_v). Only
    when N x MIN_BLOCK_COLS logits exceed the block (very many tokens) are tokens split as well;
    dW_v then sums over the token blocks, for 16-bit weights in a (Vc, H) fp32 accumulator.
    This path computes z twice (8 N H V flops instead of eager's 6).

Saved for backward versus eager (eager keeps the (N, V) logits' log-softmax, and builds their
(N, V) gradient in the backward): h, W, b and the target (inputs: no copies), the row stats
(N, 3) and "mean" denominator, dh0 (N, H) when h needs a gradient, and on the forward-gradient
path dW0 (V, H) in W's dtype and db0 (V,) in fp32 -- the gradients the backward returns, made early.
Elementwise work: 2 fused passes over each chunk of logits (stats, dz) against eager's ~6
memory-bound passes over whole (N, V) tensors.
Peak extra memory: forward-gradient path, dW0 + one chunk + dh0, the chunk sized so that this
stays the other path's forward peak where FWD_DW_MIN_ROWS tokens allow (W is read
3 x ceil(N / chunk rows) times); gradient-pass path, max(one forward chunk, dW + one gradient
block) + dh0. Eager's is three (N, V) buffers (logits, log-softmax, their gradient) + dW + dh.
Measured (1024 tokens, H 256-768, V 32000-50257, fp32, busy 2-core Xeon, 2026-12-07): 3 GEMMs
instead of 4 took fastlayers from 0.75-0.97x of eager's speed to 1.02-1.32x (docs/results.md).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._autocast import autocast_dtype as _autocast_dtype
from .._dispatch import _FASTPATH, _is_compiling, check_tensor as _check_tensor, composite_reason, placeholder
from .._errors import DeviceError, DTypeError, ShapeError
from ._autograd import FusedOp, define
from .._dtypes import compute_dtype
from ..backends import forced
from ._loss import _check_class_target, _check_options, _check_target_values, _reduce, _row_scale

# linear_cross_entropy's logits in flight, in bytes of h's dtype (module docstring): the forward's
# (tokens, whole vocab) chunks, and the gradient pass's (tokens, vocab block) blocks, these at least
# MIN_BLOCK_COLS vocabulary entries wide.
CHUNK_BYTES = 64 << 20
GRAD_BLOCK_BYTES = 16 << 20
MIN_BLOCK_COLS = 1024
# dW summed in the forward's chunks (forward_weight_grads), in chunks of at least this many tokens
# (forward_dw_chunk_bytes): each chunk reads and writes all of dW beside GEMMs of 2 x rows x H x V flops.
FORWARD_WEIGHT_GRADS = True
FWD_DW_MIN_ROWS = 256
# CPU calls with fewer (tokens x vocab) logits than this (no backend forced) run the composite,
# F.linear + F.cross_entropy (16-bit logits upcast to fp32 first, the kernels' compute dtype): a
# character vocabulary's logits are a few MB at most, and there the chunked path's fixed cost (its
# checks, row scales and three small GEMMs' calls: ~0.4 ms) is more than it saves (fwd+bwd at
# 768 x 65 logits 0.4x of eager; bench/results/cpu-routes.md).
TORCH_MAX_LOGITS = 1 << 20
# fastlayers._fastpath.small_linear_ce (csrc/torch/fastpath.cpp): that route's checks and ops in one
# C++ call (None where _fastpath was not built; tests set it to None).
_FAST_SMALL_LCE = _FASTPATH.small_linear_ce if _FASTPATH is not None else None


# ----------------------------------------------------------------------------- linear + cross-entropy
def chunk_rows(n: int, vocab: int, itemsize: int, budget: Optional[int] = None) -> int:
    """Tokens per forward chunk: the (chunk, vocab) logits stay within `budget` bytes (CHUNK_BYTES by
    default; at least one token), the chunks of one size as near equal as that allows."""
    most = max(1, min(n, (CHUNK_BYTES if budget is None else budget) // max(1, vocab * itemsize)))
    chunks = -(-n // most) if n else 1
    return -(-n // chunks) if n else most


def forward_chunk_bytes(weight: Tensor, need_dw: bool) -> int:
    """The forward's logits budget: CHUNK_BYTES, or dW's size when larger and the backward will hold
    dW anyway (the peak memory stays that of the backward; fewer, taller GEMMs: at V = 128256 a
    130-token chunk ran both GEMMs ~20% slower than 512 tokens)."""
    return max(CHUNK_BYTES, weight.numel() * weight.element_size()) if need_dw else CHUNK_BYTES


def grad_blocks(n: int, vocab: int, itemsize: int) -> Tuple[int, int]:
    """(tokens, vocabulary entries) per block of the gradient pass: about GRAD_BLOCK_BYTES of logits,
    all tokens when that leaves at least MIN_BLOCK_COLS entries (then dW's block is one GEMM over
    every token, written once), else MIN_BLOCK_COLS entries and fewer tokens."""
    elems = max(1, GRAD_BLOCK_BYTES // itemsize)
    cols = max(1, min(vocab, max(MIN_BLOCK_COLS, elems // max(1, n))))
    return max(1, min(n, elems // cols)), cols


def forward_weight_grads(n: int, weight: Tensor, reduction: str) -> bool:
    """Whether dW (and db) are summed in the forward's chunks (module docstring): the loss is
    reduced to one number ("mean", "sum": the incoming gradient is a scalar that scales dW after)
    and the weight is fp32 / fp64 (dW accumulates in place in its own dtype; 16-bit weights would
    need a (V, H) fp32 accumulator). FORWARD_WEIGHT_GRADS = False turns it off (tests, benchmarks)."""
    return FORWARD_WEIGHT_GRADS and reduction != "none" and weight.dtype in (torch.float32, torch.float64)


def forward_dw_chunk_bytes(weight: Tensor) -> int:
    """The logits budget of the forward when it also sums dW: what the plain forward would take
    (forward_chunk_bytes with dW to come) less dW itself, so that chunk + dW stay within the old
    peak, but at least FWD_DW_MIN_ROWS tokens' worth (each chunk reads and writes all of dW beside
    GEMMs of 2 x rows x H x V flops: shorter chunks would make that traffic rival the GEMMs)."""
    dw_bytes = weight.numel() * weight.element_size()
    return max(forward_chunk_bytes(weight, True) - dw_bytes, FWD_DW_MIN_ROWS * weight.shape[0] * weight.element_size())


def _block(buf: Optional[Tensor], rows: int, cols: int) -> Optional[Tensor]:
    """A (rows, cols) contiguous tensor at the start of the flat buffer buf (None: none yet)."""
    return None if buf is None else buf[:rows * cols].view(rows, cols)


def _lce_forward(backend, h2: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                 eps: float, dz_scale: Optional[Tensor] = None, need_dw: bool = False, need_dh: bool = True,
                 fwd_dw: bool = False, fwd_db: bool = False):
    """(rows, stats, dh0, dw0, db0): row losses (N,) and stats (N, 3) in the compute dtype; with
    dz_scale (N,) given, the gradients of sum_i dz_scale_i loss_i: dh0 wrt h (need_dh), dw0 wrt W
    (fwd_dw) and db0 wrt b (fwd_db), each None when not asked for. Per chunk of tokens:
    z = h_c W^T + b (m, V), the fused cross-entropy forward over its whole rows, then dz over z in
    place, dh0_c = dz W (a GEMM over the whole vocabulary), dw0 (+)= dz^T h_c (K = the chunk's
    tokens) and db0 (+)= colsum(dz). need_dw: the backward will hold dW (chunk size:
    forward_chunk_bytes)."""
    n, vocab = h2.shape[0], weight.shape[0]
    cd = compute_dtype(h2.dtype)
    rows = torch.empty(n, dtype=cd, device=h2.device)
    stats = torch.empty(n, 3, dtype=cd, device=h2.device)
    grads = dz_scale is not None
    # the first chunk's GEMMs write dh0's rows and all of dw0 / db0 (accumulate=False): no zero
    # fill (a pass over dW), except with no tokens at all
    new = torch.zeros if n == 0 else torch.empty
    dh0 = new(h2.shape, dtype=h2.dtype, device=h2.device) if grads and need_dh else None
    dw0 = new(weight.shape, dtype=weight.dtype, device=h2.device) if grads and fwd_dw else None
    db0 = (new(vocab, dtype=weight.dtype if weight.dtype == torch.float64 else torch.float32, device=h2.device)
           if grads and fwd_db else None)
    budget = forward_dw_chunk_bytes(weight) if fwd_dw else forward_chunk_bytes(weight, need_dw)
    step = chunk_rows(n, vocab, h2.element_size(), budget)
    zbuf, reuse = None, backend.logits_into(h2[:step], weight, bias)  # (see linear_ce_logits)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        z = backend.linear_ce_logits(h2[c0:c1], weight, bias, _block(zbuf, c1 - c0, vocab))  # (m, V)
        zbuf = z.view(-1) if zbuf is None and reuse else zbuf  # the first (largest) chunk's
        rows[c0:c1], stats[c0:c1] = backend.cross_entropy_forward(z, target[c0:c1], None, ignore_index, eps)
        if grads and (dh0 is not None or dw0 is not None or db0 is not None):
            backend.cross_entropy_backward(z, target[c0:c1], None, stats[c0:c1], dz_scale[c0:c1], ignore_index,
                                           eps, z)
            if dh0 is not None:  # this chunk's rows of dh0: written, never summed
                backend.linear_ce_chunk_grads(z, h2[c0:c1], weight, dh0[c0:c1], None, None, False)
            if dw0 is not None or db0 is not None:  # summed over the chunks
                backend.linear_ce_chunk_grads(z, h2[c0:c1], weight, None, dw0, db0, c0 > 0)
        del z  # (before the next chunk's logits exist, unless they reuse zbuf)
    return rows, stats, dh0, dw0, db0


def _scaled_weight_grad(g0: Tensor, grad: Tensor, dtype: torch.dtype, eager: bool = True) -> Tensor:
    """dW (or db) from the forward's sum for an incoming 1, times the incoming scalar gradient; in
    eager autograd (eager) the saved tensor itself (never written) when that is exactly 1 (a host
    check on a CPU scalar; traced graphs always multiply)."""
    if eager and grad.device.type == "cpu" and bool(grad == 1):
        return g0 if g0.dtype == dtype else g0.to(dtype)
    return (g0 * grad.to(g0.dtype)).to(dtype)


def _lce_grads(backend, h2: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, stats: Tensor,
               scale: Tensor, ignore_index: int, eps: float, need_dw: bool, need_db: bool):
    """(dW, db) of sum_i scale_i loss_i, None where not needed, in the weight's dtype. Per block of
    (tokens c, vocabulary v): z = h_c W_v^T + b_v, dz = scale_i dloss_i/dz over z in place (from the
    forward's row stats), dW_v (+)= dz^T h_c, db_v (+)= colsum(dz)."""
    n, hidden = h2.shape
    vocab = weight.shape[0]
    cd = stats.dtype
    dw = torch.empty(vocab, hidden, dtype=weight.dtype, device=h2.device) if need_dw else None
    db = torch.empty(vocab, dtype=weight.dtype, device=h2.device) if need_db else None
    if n == 0:  # no tokens: zero gradients
        return None if dw is None else dw.zero_(), None if db is None else db.zero_()
    tokens, cols = grad_blocks(n, vocab, h2.element_size())
    # dW_v / db_v summed over several token blocks: in fp32 accumulators for 16-bit weights
    split = tokens < n and weight.dtype in (torch.float16, torch.bfloat16)
    zbuf, reuse = None, backend.logits_into(h2[:tokens], weight[:cols], None if bias is None else bias[:cols])  # (see linear_ce_logits)
    for v0 in range(0, vocab, cols):
        v1 = min(vocab, v0 + cols)
        wv, bv = weight[v0:v1], None if bias is None else bias[v0:v1]
        dwv = None if dw is None else h2.new_empty(v1 - v0, hidden, dtype=cd) if split else dw[v0:v1]
        dbv = None if db is None else h2.new_empty(v1 - v0, dtype=cd) if split else db[v0:v1]
        for c0 in range(0, n, tokens):
            c1 = min(n, c0 + tokens)
            z = backend.linear_ce_logits(h2[c0:c1], wv, bv, _block(zbuf, c1 - c0, v1 - v0))  # (m, v1 - v0)
            zbuf = z.view(-1) if zbuf is None and reuse else zbuf  # the first (largest) block's
            backend.cross_entropy_backward(z, target[c0:c1], None, stats[c0:c1], scale[c0:c1], ignore_index, eps,
                                           z, v0, vocab)
            backend.linear_ce_chunk_grads(z, h2[c0:c1], wv, None, dwv, dbv, c0 > 0)
            del z
        if split:
            for full, part in ((dw, dwv), (db, dbv)):
                if full is not None:
                    full[v0:v1].copy_(part)
    return dw, db


def _lce_scales(reduction: str, den: Tensor, target: Tensor, ignore_index: int, dtype: torch.dtype,
                grad: Optional[Tensor] = None) -> Tensor:
    """dh is computed in the forward, before the incoming gradient is known: there with the row
    scale for an incoming 1, except that "none" is left unscaled (grad None); the backward then
    multiplies it per row by the incoming gradient (grad given: per row, or the scalar). The two
    multiply to _row_scale(grad, reduction, ...)."""
    if grad is None:
        return _row_scale(torch.ones((), dtype=dtype, device=target.device),
                          "sum" if reduction == "none" else reduction, den, target, ignore_index, dtype)
    return _row_scale(grad, "none" if reduction == "none" else "sum", den, target, ignore_index, dtype)


def _lce_dh(dh0: Tensor, reduction: str, den: Tensor, target: Tensor, ignore_index: int, grad: Tensor) -> Tensor:
    mult = _lce_scales(reduction, den, target, ignore_index, compute_dtype(dh0.dtype), grad)
    return (dh0 * mult[:, None]).to(dh0.dtype)


def _lce_den(target: Tensor, ignore_index: int, dtype: torch.dtype) -> Tensor:
    return (target != ignore_index).sum().to(dtype)


class LinearCrossEntropy(FusedOp):
    """The loss of h2 (N, H) through the head (weight, bias) against target (N,), in out_dtype. need_dh /
    need_dw / need_db: which gradients the backward will want (they decide what the forward builds).
    Saves h2, weight, bias, target (inputs: no copies) and the internal outputs den, stats, dh0, dw0,
    db0 (module docstring)."""
    name, public = "linear_cross_entropy", "fastlayers.linear_cross_entropy"
    schema = ("Tensor h2, Tensor weight, Tensor? bias, Tensor target, int ignore_index, float eps, str reduction, "
              "ScalarType out_dtype, bool need_dh, bool need_dw, bool need_db")
    n_inputs, n_extras = 4, 5

    def check(self, inputs, params):
        _check_target_values(self.public, inputs[3], inputs[1].shape[0], params[0])

    @staticmethod
    def _forward_grads(weight: Tensor, bias: Optional[Tensor], n: int, params) -> Tuple[bool, bool]:
        """(dW, db) summed in the forward (forward_weight_grads)."""
        reduction, need_dw, need_db = params[2], params[5], params[6]
        fwd_dw = need_dw and forward_weight_grads(n, weight, reduction)
        return fwd_dw, fwd_dw and need_db and bias is not None

    def forward(self, backend, inputs, params, save):
        (h2, weight, bias, target), (ignore_index, eps, reduction, out_dtype, need_dh, need_dw, _) = inputs, params
        cd = compute_dtype(h2.dtype)
        den = _lce_den(target, ignore_index, cd)
        fwd_dw, fwd_db = self._forward_grads(weight, bias, h2.shape[0], params)
        dz_scale = _lce_scales(reduction, den, target, ignore_index, cd) if need_dh or fwd_dw else None
        rows, stats, dh0, dw0, db0 = _lce_forward(backend, h2, weight, bias, target, ignore_index, eps, dz_scale,
                                                  need_dw, need_dh, fwd_dw, fwd_db)
        return (_reduce(rows, reduction, den, out_dtype, (h2.shape[0],)),), (den, stats, dh0, dw0, db0)

    def save(self, inputs, outputs, extras, params):
        return inputs + extras

    def backward(self, backend, saved, grads, needs, params):
        h2, weight, bias, target, den, stats, dh0, dw0, db0 = saved
        (grad,), (ignore_index, eps, reduction, _, need_dh, _, _) = grads, params
        need = (needs[0], needs[1], bias is not None and needs[2])
        fwd_dw, fwd_db = self._forward_grads(weight, bias, h2.shape[0], params)
        if need[0] and not need_dh:  # dh0 was not built (a graph recorded without it): the forward again
            scale = _lce_scales(reduction, den, target, ignore_index, stats.dtype)
            dh0 = _lce_forward(backend, h2, weight, bias, target, ignore_index, eps, scale, False, True)[2]
        dh = _lce_dh(dh0, reduction, den, target, ignore_index, grad) if need[0] else None
        dw = _scaled_weight_grad(dw0, grad, weight.dtype) if need[1] and fwd_dw else None
        db = _scaled_weight_grad(db0, grad, bias.dtype) if need[2] and fwd_db else None
        rest = (need[1] and not fwd_dw, need[2] and not fwd_db)
        if any(rest):
            scale = _row_scale(grad, reduction, den, target, ignore_index, stats.dtype)
            dw2, db2 = _lce_grads(backend, h2, weight, bias, target, stats, scale, ignore_index, eps, *rest)
            dw, db = dw if dw2 is None else dw2, db if db2 is None else db2
        return dh, dw, db, None

    def backward_graph(self, saved, grads, needs, params):
        h2, weight, bias, target = saved[:4]
        ignore_index, eps, reduction = params[:3]
        need = (needs[0], needs[1], bias is not None and needs[2])
        with torch.enable_grad():
            ins = [t.detach().requires_grad_() if (t is not None and not t.requires_grad) else t
                   for t in (h2, weight, bias)]
            z = F.linear(ins[0], ins[1], ins[2])
            loss = F.cross_entropy(z.float() if h2.dtype in (torch.float16, torch.bfloat16) else z, target,
                                   ignore_index=ignore_index, label_smoothing=eps, reduction=reduction)
            wrt = [t for t, n in zip(ins, need) if n]
            got = iter(torch.autograd.grad(loss, wrt, grads[0].reshape(loss.shape).to(loss.dtype), create_graph=True))
        return tuple(next(got) if n else None for n in need) + (None,)

    def fake(self, inputs, params):
        h2, weight, bias, _ = inputs
        reduction, out_dtype, need_dh = params[2], params[3], params[4]
        cd = compute_dtype(h2.dtype)
        fwd_dw, fwd_db = self._forward_grads(weight, bias, h2.shape[0], params)
        return (h2.new_empty((h2.shape[0],) if reduction == "none" else (), dtype=out_dtype),
                h2.new_empty((), dtype=cd), h2.new_empty((h2.shape[0], 3), dtype=cd),
                h2.new_empty(h2.shape) if need_dh else placeholder(h2),
                weight.new_empty(weight.shape) if fwd_dw else placeholder(h2),
                h2.new_empty((weight.shape[0],), dtype=cd) if fwd_db else placeholder(h2))

    def fake_backward(self, saved, grads, needs, params):
        h2, weight, bias = saved[:3]
        return (h2.new_empty(h2.shape) if needs[0] else placeholder(h2),
                weight.new_empty(weight.shape) if needs[1] else placeholder(h2),
                weight.new_empty((weight.shape[0],)) if needs[2] and bias is not None else placeholder(h2),
                placeholder(h2))


LINEAR_CROSS_ENTROPY = define(LinearCrossEntropy())
LinearCrossEntropyFunction = LINEAR_CROSS_ENTROPY.Function


def _composite(inputs, params):
    (h2, weight, bias, target), (ignore_index, eps, reduction, out_dtype) = inputs, params[:4]
    return (_linear_ce_torch(h2, weight, bias, target, ignore_index, eps, reduction).to(out_dtype),)


def _linear_ce_torch(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                     eps: float, reduction: str) -> Tensor:
    """The loss by PyTorch's ops: F.linear, then F.cross_entropy on the logits in the kernels' compute
    dtype (16-bit logits upcast to fp32, as transformers' loss does); h (*, H), the class dim last."""
    z = F.linear(h, weight, bias)
    z = z.to(compute_dtype(z.dtype))
    return F.cross_entropy(z.movedim(-1, 1) if z.dim() > 2 else z, target, ignore_index=ignore_index,
                           label_smoothing=eps, reduction=reduction)


def _check_linear_ce(op: str, h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                     ignore_index: int, values: bool = True) -> Tensor:
    _check_tensor(op, "h", h)
    _check_tensor(op, "weight", weight)
    if bias is not None:
        _check_tensor(op, "bias", bias)
    if weight.dim() != 2:
        raise ShapeError(f"{op}: expected weight of shape (vocab, hidden), got shape {tuple(weight.shape)}")
    if h.dim() < 1 or h.shape[-1] != weight.shape[1]:
        raise ShapeError(f"{op}: expected h of shape (*, {weight.shape[1]}) to match weight "
                         f"{tuple(weight.shape)}, got shape {tuple(h.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ShapeError(f"{op}: expected bias of shape ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("target", target)):
        if t is None:
            continue
        if name != "target" and t.dtype != h.dtype:
            raise DTypeError(f"{op}: expected {name} to have h's dtype ({h.dtype}), got {t.dtype}")
        if t.device != h.device:
            raise DeviceError(f"{op}: expected {name} on the same device as h ({h.device}), got {t.device}")
    if not isinstance(target, Tensor):
        raise TypeError(f"{op}: expected target to be a torch.Tensor, got {type(target).__name__}")
    if tuple(target.shape) != tuple(h.shape[:-1]):
        raise ShapeError(f"{op}: expected target of shape {tuple(h.shape[:-1])} (h's leading dims), "
                         f"got shape {tuple(target.shape)}")
    if not values:
        return target
    return _check_class_target(op, target, weight.shape[0], ignore_index)


def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean") -> Tensor:
    """``F.cross_entropy(F.linear(h, weight, bias), target, ...)`` without materialising the
    (tokens, vocab) logits: the forward goes through the tokens in chunks of at most CHUNK_BYTES of
    logits, the backward through the vocabulary in blocks (module docstring).

    h: (*, hidden); weight: (vocab, hidden) as nn.Linear (an LM head); bias: (vocab,) or None;
    target: (*,) class indices (int64, or uint8), each in [0, vocab) or == ignore_index.
    Returns a 0-d loss ("mean", "sum") or one per token ("none", shape (*,)) in h's dtype
    (float32 under autocast, where h, weight and bias are first cast like F.linear's inputs).
    """
    return _linear_cross_entropy(h, weight, target, bias, ignore_index, label_smoothing, reduction)


def _linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                          ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                          out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """linear_cross_entropy; out_dtype (e.g. float32 for 16-bit inputs, as transformers' loss
    gives) is the loss's dtype instead of h's (swap(skip_logits=True))."""
    if (_FAST_SMALL_LCE is not None and (out_dtype is None or out_dtype is torch.float32)
            and not _is_compiling() and forced() is None):
        # below TORCH_MAX_LOGITS on the CPU: _linear_ce_torch's ops, checks included, in one C++ call
        loss = _FAST_SMALL_LCE(h, weight, bias, target, ignore_index, label_smoothing, reduction,
                               out_dtype is not None, TORCH_MAX_LOGITS)
        if loss is not None:
            return loss
    op = "fastlayers.linear_cross_entropy"
    eps = _check_options(op, ignore_index, label_smoothing, reduction)
    if isinstance(h, Tensor) and (ac := _autocast_dtype(h)) is not None:
        h, weight, bias = (t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(ac)
                           for t in (h, weight, bias))
        out_dtype = torch.float32 if h.dtype != torch.float64 else None
    if composite_reason(h, weight, bias, target) is not None:  # see cross_entropy
        _check_linear_ce(op, h, weight, bias, target, ignore_index, values=False)
        loss = _linear_ce_torch(h, weight, bias, target, ignore_index, eps, reduction)
        return loss.to(h.dtype if out_dtype is None else out_dtype)
    target = _check_linear_ce(op, h, weight, bias, target, ignore_index)
    out_dtype = out_dtype or h.dtype
    loss_shape = tuple(h.shape[:-1])
    h2 = h.reshape(-1, h.shape[-1])  # (N, H)
    t2 = target.reshape(-1).contiguous()
    if h2.device.type == "meta":
        return h2.new_empty(loss_shape if reduction == "none" else (), dtype=out_dtype)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and h.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    small = h2.is_cpu and h2.shape[0] * weight.shape[0] < TORCH_MAX_LOGITS and forced() is None
    (loss,) = LINEAR_CROSS_ENTROPY.run((h2, weight, bias, t2), (ignore_index, eps, reduction, out_dtype, *needs),
                                       _composite, small)
    return loss.view(loss_shape) if reduction == "none" else loss
