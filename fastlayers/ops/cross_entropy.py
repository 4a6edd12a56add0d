"""Fused softmax cross-entropy: the op (one definition: fastlayers/ops/_autograd.py), the public function.

    fl.cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                     weight=None)                          == F.cross_entropy(...)

The math: fastlayers/ops/_loss.py. Backends compute per-row losses and stats = (M, log S, A) in one
pass over each row (online max and rescaled sums) and the gradient from x and the stats in one more
pass (contract in fastlayers/backends/contract.py). What autograd saves for cross_entropy: the logits (an input, no
copy), the target and the (N, 3) stats: O(N) extra memory where eager saves the (N, C) log-softmax.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._autocast import autocast_dtype as _autocast_dtype
from .._dispatch import _FASTPATH, _is_compiling, check_tensor as _check_tensor, composite_reason, placeholder
from ._autograd import FusedOp, define
from .._dtypes import compute_dtype
from ..backends import forced
from ._loss import _check_options, _check_target_values, _denominator, _prepare, _reduce, _row_scale


# CPU calls with fewer logits than this (no backend forced) run PyTorch's own F.cross_entropy: below
# it the fused path's fixed cost (the target check, the row scales, the reduction: ~0.2 ms) is more
# than its passes save (fwd+bwd at 2^18 logits 0.45-0.95x of eager, at 2^20 1.04-1.31x;
# bench/results/cpu-routes.md). A forced backend runs its kernels at every size (how tests reach them).
_TORCH_MAX_NUMEL = 1 << 20
# fastlayers._fastpath.small_cross_entropy (csrc/torch/fastpath.cpp): that route for (N, C) logits
# and class targets in one C++ call (None where _fastpath was not built; tests set it to None).
_FAST_SMALL_CE = _FASTPATH.small_cross_entropy if _FASTPATH is not None else None


# ----------------------------------------------------------------------------- the op
class CrossEntropy(FusedOp):
    """The loss of (N, C) logits x2 against flat targets (class indices (N,), or probabilities (N, C)):
    0-d ("mean", "sum") or (N,) ("none") in x2's dtype. Saves x2, the target, the weight (inputs: no
    copies) and internal outputs: the row stats (N, 3) and the "mean" denominator (0-d)."""
    name, public = "cross_entropy", "fastlayers.cross_entropy"
    schema = "Tensor x2, Tensor target, Tensor? weight, int ignore_index, float eps, str reduction, bool probs"
    n_inputs, n_extras = 3, 2

    def check(self, inputs, params):
        x2, target, _ = inputs
        if not params[3]:  # the values of class targets (the eager route checked them in _prepare)
            _check_target_values(self.public, target, x2.shape[1], params[0])

    def forward(self, backend, inputs, params, save):
        (x2, target, weight), (ignore_index, eps, reduction, probs) = inputs, params
        rows, stats = backend.cross_entropy_forward(x2, target, weight, ignore_index, eps)  # (N,), (N, 3)
        den = _denominator(target, weight, ignore_index, probs, x2.shape[0], rows.dtype)
        return (_reduce(rows, reduction, den, x2.dtype, (x2.shape[0],)),), (stats, den)

    def save(self, inputs, outputs, extras, params):
        return inputs + extras

    def backward(self, backend, saved, grads, needs, params):
        x2, target, weight, stats, den = saved
        ignore_index, eps, reduction, _ = params
        scale = _row_scale(grads[0], reduction, den, target, ignore_index, stats.dtype)
        return backend.cross_entropy_backward(x2, target, weight, stats, scale, ignore_index, eps, None), None, None

    def backward_graph(self, saved, grads, needs, params):
        x2, target, weight = saved[:3]
        ignore_index, eps, reduction, _ = params
        with torch.enable_grad():
            xd = x2.detach().requires_grad_() if not x2.requires_grad else x2
            loss = F.cross_entropy(xd, target, weight=None if weight is None else weight.to(x2.dtype),
                                   ignore_index=ignore_index, label_smoothing=eps, reduction=reduction)
            (dx,) = torch.autograd.grad(loss, xd, grads[0].reshape(loss.shape), create_graph=True)
        return dx, None, None

    def fake(self, inputs, params):
        x2 = inputs[0]
        cd = compute_dtype(x2.dtype)
        loss = x2.new_empty((x2.shape[0],) if params[2] == "none" else ())
        return loss, x2.new_empty((x2.shape[0], 3), dtype=cd), x2.new_empty((), dtype=cd)

    def fake_backward(self, saved, grads, needs, params):
        x2 = saved[0]
        return torch.empty_like(x2), placeholder(x2), placeholder(x2)


CROSS_ENTROPY = define(CrossEntropy())
CrossEntropyFunction = CROSS_ENTROPY.Function


def _composite(inputs, params):
    (x2, target, weight), (ignore_index, eps, reduction, _) = inputs, params
    if weight is not None:  # (_prepare gives it in the compute dtype; PyTorch's op wants the logits')
        weight = weight.to(x2.dtype)
    return (F.cross_entropy(x2, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=eps),)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean", weight: Optional[Tensor] = None) -> Tensor:
    """``F.cross_entropy(logits, target, weight, ignore_index=..., reduction=..., label_smoothing=...)``
    in one fused pass per row (and one more for the gradient).

    logits: (C,), (N, C) or (N, C, d1, ...); target: class indices (int64, or uint8) of the logits'
    shape without the class dim, each in [0, C) or == ignore_index, or class probabilities of the
    logits' shape. weight: (C,) per-class weights. Returns a 0-d loss ("mean", "sum") or one per
    position ("none") in the logits' dtype (float32 under autocast, like torch).
    """
    if _FAST_SMALL_CE is not None and weight is None and not _is_compiling() and forced() is None:
        # below _TORCH_MAX_NUMEL on the CPU, the common form: PyTorch's op, checks included, in one C++ call
        loss = _FAST_SMALL_CE(logits, target, ignore_index, label_smoothing, reduction, _TORCH_MAX_NUMEL)
        if loss is not None:
            return loss
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
    x2, t2, w, probs, loss_shape = _prepare(op, logits, target, weight, ignore_index)
    if weight is not None and weight.requires_grad and not probs:
        raise RuntimeError(f"{op}: the loss is not differentiable with respect to weight (as in torch); "
                           f"pass a weight with requires_grad=False")
    if probs and torch.is_grad_enabled() and (t2.requires_grad or (w is not None and w.requires_grad)):
        # gradients for the targets / weights too: PyTorch's own op (the fused kernels give dlogits)
        return F.cross_entropy(logits, target, weight=weight, reduction=reduction, label_smoothing=eps)
    if x2.device.type == "meta":
        return x2.new_empty(loss_shape if reduction == "none" else ())
    small = x2.is_cpu and x2.numel() < _TORCH_MAX_NUMEL and forced() is None
    (loss,) = CROSS_ENTROPY.run((x2, t2, w), (ignore_index, eps, reduction, probs), _composite, small)
    return loss.view(loss_shape) if reduction == "none" else loss
