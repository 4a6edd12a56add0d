"""Fused softmax cross-entropy: the Function, the route, the public function, its torch.library ops.

    fl.cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                     weight=None)                          == F.cross_entropy(...)

The math: fastlayers/ops/_loss.py. Backends compute per-row losses and stats = (M, log S, A) in one
pass over each row (online max and rescaled sums) and the gradient from x and the stats in one more
pass (contract in fastlayers/backends/contract.py). What autograd saves for cross_entropy: the logits (an input, no
copy), the target and the (N, 3) stats: O(N) extra memory where eager saves the (N, C) log-softmax.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._autocast import autocast_dtype as _autocast_dtype
from .._dispatch import check_tensor as _check_tensor, composite_reason
from ._loss import (_ce_backend, _check_options, _check_target_values, _compute_dtype, _denominator, _prepare,
                    _reduce, _row_scale)


# ----------------------------------------------------------------------------- cross_entropy
class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, eps: float,
                reduction: str, probs: bool, loss_shape, back) -> Tensor:
        backend = _ce_backend(x2)
        rows, stats = backend.cross_entropy_forward(x2, target, weight, ignore_index, eps)  # (N,), (N, 3)
        cd = rows.dtype
        den = _denominator(target, weight, ignore_index, probs, x2.shape[0], cd)
        ctx.backend, ctx.ignore_index, ctx.eps, ctx.reduction, ctx.back = backend, ignore_index, eps, reduction, back
        ctx.save_for_backward(x2, target, weight, stats, den)
        return _reduce(rows, reduction, den, x2.dtype, loss_shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, target, weight, stats, den = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a graph of PyTorch ops (higher orders exact)
            return (_ce_backward_differentiable(x2, target, weight, grad, ctx.ignore_index, ctx.eps,
                                                ctx.reduction), None, None, None, None, None, None, None, None)
        scale = _row_scale(grad, ctx.reduction, den, target, ctx.ignore_index, stats.dtype)
        dx = ctx.backend.cross_entropy_backward(x2, target, weight, stats, scale, ctx.ignore_index, ctx.eps, None)
        return dx, None, None, None, None, None, None, None, None


def _ce_backward_differentiable(x2, target, weight, grad, ignore_index, eps, reduction):
    with torch.enable_grad():
        xd = x2.detach().requires_grad_() if not x2.requires_grad else x2
        loss = F.cross_entropy(xd, target, weight=None if weight is None else weight.to(x2.dtype),
                               ignore_index=ignore_index, label_smoothing=eps, reduction=reduction)
        (dx,) = torch.autograd.grad(loss, xd, grad.reshape(loss.shape), create_graph=True)
    return dx


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean", weight: Optional[Tensor] = None) -> Tensor:
    """``F.cross_entropy(logits, target, weight, ignore_index=..., reduction=..., label_smoothing=...)``
    in one fused pass per row (and one more for the gradient).

    logits: (C,), (N, C) or (N, C, d1, ...); target: class indices (int64, or uint8) of the logits'
    shape without the class dim, each in [0, C) or == ignore_index, or class probabilities of the
    logits' shape. weight: (C,) per-class weights. Returns a 0-d loss ("mean", "sum") or one per
    position ("none") in the logits' dtype (float32 under autocast, like torch).
    """
    op = "fastlayers.cross_entropy"
    eps = _check_options(op, ignore_index, label_smoothing, reduction)
    if isinstance(logits, Tensor) and _autocast_dtype(logits) is not None:
        # torch runs cross-entropy in float32 under CPU and CUDA autocast (nll_loss is on the
        # fp32 list; on CUDA log_softmax is computed in float32 too)
        logits, weight = (t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t
                          for t in (logits, weight))
        if isinstance(target, Tensor) and target.dtype in (torch.float16, torch.bfloat16):
            target = target.float()
    if isinstance(logits, Tensor) and isinstance(target, Tensor) and composite_reason(logits, target, weight):
        # tensors whose data kernels must not read (fake tensors, subclasses, torch.func
        # transforms, dispatch modes): PyTorch's own op, which all of them understand
        _check_tensor(op, "logits", logits)
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=eps)
    x2, t2, w, probs, loss_shape, back = _prepare(op, logits, target, weight, ignore_index)
    if weight is not None and weight.requires_grad and not probs:
        raise RuntimeError(f"{op}: the loss is not differentiable with respect to weight (as in torch); "
                           f"pass a weight with requires_grad=False")
    if probs and torch.is_grad_enabled() and (t2.requires_grad or (w is not None and w.requires_grad)):
        # gradients for the targets / weights too: PyTorch's own op (the fused kernels give dlogits)
        return F.cross_entropy(logits, target, weight=weight, reduction=reduction, label_smoothing=eps)
    if x2.device.type == "meta":
        out = x2.new_empty(loss_shape if reduction == "none" else ())
        return out
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return back_loss(_cross_entropy_op(x2, t2, w, ignore_index, eps, reduction, probs), reduction, loss_shape)
    if torch.is_grad_enabled() and x2.requires_grad:
        return CrossEntropyFunction.apply(x2, t2, w, ignore_index, eps, reduction, probs, loss_shape, back)
    backend = _ce_backend(x2)
    rows, _ = backend.cross_entropy_forward(x2, t2, w, ignore_index, eps)
    den = _denominator(t2, w, ignore_index, probs, x2.shape[0], rows.dtype)
    return _reduce(rows, reduction, den, x2.dtype, loss_shape)


def back_loss(loss: Tensor, reduction: str, loss_shape) -> Tensor:
    return loss.view(loss_shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------- torch.library ops
# Used while torch.compile traces (or jit.trace records): opaque nodes, no graph break; the
# logits arrive already flattened to (N, C) by the traced Python above.
@torch.library.custom_op("fastlayers::cross_entropy", mutates_args=())
def _cross_entropy_lib(x2: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, eps: float,
                       reduction: str, probs: bool) -> Tuple[Tensor, Tensor, Tensor]:
    backend = _ce_backend(x2)
    if not probs:
        _check_target_values("fastlayers.cross_entropy", target, x2.shape[1], ignore_index)
    rows, stats = backend.cross_entropy_forward(x2, target, weight, ignore_index, eps)
    den = _denominator(target, weight, ignore_index, probs, x2.shape[0], rows.dtype)
    loss = _reduce(rows, reduction, den, x2.dtype, (x2.shape[0],))
    return loss, stats, den


@_cross_entropy_lib.register_fake
def _(x2, target, weight, ignore_index, eps, reduction, probs):
    cd = _compute_dtype(x2.dtype)
    loss = x2.new_empty((x2.shape[0],) if reduction == "none" else ())
    return loss, x2.new_empty((x2.shape[0], 3), dtype=cd), x2.new_empty((), dtype=cd)


@torch.library.custom_op("fastlayers::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_lib(grad: Tensor, x2: Tensor, target: Tensor, weight: Optional[Tensor],
                                stats: Tensor, den: Tensor, ignore_index: int, eps: float,
                                reduction: str) -> Tensor:
    backend = _ce_backend(x2)
    scale = _row_scale(grad, reduction, den, target, ignore_index, stats.dtype)
    return backend.cross_entropy_backward(x2, target, weight, stats, scale, ignore_index, eps, None)


@_cross_entropy_backward_lib.register_fake
def _(grad, x2, target, weight, stats, den, ignore_index, eps, reduction):
    return torch.empty_like(x2)


def _ce_lib_setup(ctx, inputs, output) -> None:
    x2, target, weight, ignore_index, eps, reduction, probs = inputs
    _, stats, den = output
    ctx.mark_non_differentiable(stats, den)
    ctx.ignore_index, ctx.eps, ctx.reduction = ignore_index, eps, reduction
    ctx.save_for_backward(x2, target, weight, stats, den)


def _ce_lib_backward(ctx, grad, _gs, _gd):
    x2, target, weight, stats, den = ctx.saved_tensors
    dx = _cross_entropy_backward_lib(grad, x2, target, weight, stats, den, ctx.ignore_index, ctx.eps,
                                     ctx.reduction)
    return dx, None, None, None, None, None, None


torch.library.register_autograd("fastlayers::cross_entropy", _ce_lib_backward, setup_context=_ce_lib_setup)


def _cross_entropy_op(x2, t2, w, ignore_index, eps, reduction, probs) -> Tensor:
    return _cross_entropy_lib(x2, t2, w, ignore_index, eps, reduction, probs)[0]
