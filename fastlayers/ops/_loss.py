"""What both losses share: argument checks, the reductions and their gradients' row scales
(fastlayers/ops/cross_entropy.py, fastlayers/ops/linear_cross_entropy.py).

The math, per row i of logits x (C classes), with M = max_j x_j, log S = log sum_j exp(x_j - M),
log p_j = (x_j - M) - log S and the row's coefficients c_j >= 0:

    loss_i = sum_j c_j (log S - (x_j - M))        dloss_i / dx_j = p_j * A_i - c_j,  A_i = sum_j c_j

    class targets t (smoothing e, class weights w, default 1):
        c_j = (1 - e) w_t [j == t] + (e / C) w_j        (torch's (1-e) nll + e/C * smoothing term)
        ignored rows (t == ignore_index): c = 0, so loss 0 and gradient 0 (NaN where p is NaN,
        as torch's log_softmax backward gives)
    probability targets q:  c_j = w_j q'_j,  q' = q (1 - e) + e / C  (q' = q when e == 0)

    reduction "mean": class targets divide by sum_i w_{t_i} over non-ignored rows (the count when
    unweighted; 0 / 0 = nan for an all-ignored batch, like torch); probability targets by N.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._dispatch import backend_for, check_tensor as _check_tensor, cpu_backend
from .._errors import DeviceError, DTypeError, ShapeError
from .._dtypes import compute_dtype

_REDUCTIONS = ("none", "mean", "sum")


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value (torch raises RuntimeError for these; ValueError is what it is)."""


# ----------------------------------------------------------------------------- validation
def _check_options(op: str, ignore_index: int, label_smoothing: float, reduction: str) -> float:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: expected ignore_index to be an int, got {type(ignore_index).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: {reduction!r} is not a valid value for reduction "
                         f"(expected 'none', 'mean' or 'sum')")
    eps = float(label_smoothing)
    # torch checks the range only when smoothing is on (eps > 0); a negative or NaN eps is "off".
    if eps > 1.0:
        raise ArgumentError(f"{op}: label_smoothing must be between 0.0 and 1.0, got {eps}")
    return eps if eps > 0.0 else 0.0


def _check_class_target(op: str, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """int64 targets, every one in [0, C) or == ignore_index (else IndexError naming the value)."""
    if target.dtype not in (torch.int64, torch.uint8):
        raise DTypeError(f"{op}: expected target to hold class indices of dtype int64 (or uint8), or "
                         f"class probabilities of the logits' shape, got dtype {target.dtype} "
                         f"and shape {tuple(target.shape)}")
    target = target.long()
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return target  # checked when the registered op runs (no data-dependent branch in a graph)
    return _check_target_values(op, target, num_classes, ignore_index)


def _check_target_values(op: str, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    if (type(target) is Tensor and target.is_cpu and target.dtype == torch.int64 and target.is_contiguous()
            and (cpu := cpu_backend()) is not None):
        # one C++ pass (the torch ops below cost ~10-30 us, a third of a small loss's whole time)
        flat = target.view(-1)
        i = cpu.loss.first_bad_target(flat, num_classes, ignore_index)
        bad = None if i < 0 else flat[i:i + 1]
    else:
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        bad = target[bad] if target.device.type != "meta" and bool(bad.any()) else None
    if bad is not None:
        v = int(bad[0])
        raise IndexError(f"{op}: target {v} is out of bounds for {num_classes} classes (expected "
                         f"0 <= target < {num_classes}, or target == ignore_index ({ignore_index}))")
    return target


def _prepare(op: str, logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int):
    """Validate and flatten to the backend layout. Returns (x2 (N, C) contiguous, t (N,) int64 or
    q (N, C) contiguous, weight (C,) or None, probs, loss shape of reduction "none", x2 -> logits
    layout of a gradient)."""
    _check_tensor(op, "logits", logits)
    if not isinstance(target, Tensor):
        raise TypeError(f"{op}: expected target to be a torch.Tensor, got {type(target).__name__}")
    if logits.dim() == 0:
        raise ShapeError(f"{op}: expected logits of shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    if target.device != logits.device:
        raise DeviceError(f"{op}: expected target on the same device as logits ({logits.device}), "
                          f"got {target.device}")
    class_dim = 0 if logits.dim() == 1 else 1
    C = logits.shape[class_dim]
    probs = target.is_floating_point()
    if weight is not None:
        _check_tensor(op, "weight", weight)
        if weight.dim() != 1 or weight.shape[0] != C:
            raise ShapeError(f"{op}: expected weight of shape ({C},), one per class, "
                             f"got shape {tuple(weight.shape)}")
        if weight.device != logits.device:
            raise DeviceError(f"{op}: expected weight on the same device as logits ({logits.device}), "
                              f"got {weight.device}")
    if probs:
        _check_tensor(op, "target (class probabilities)", target)
        if target.shape != logits.shape:
            raise ShapeError(f"{op}: expected floating-point target (class probabilities) of the logits' "
                             f"shape {tuple(logits.shape)}, got shape {tuple(target.shape)}")
        if ignore_index != -100:
            raise ArgumentError(f"{op}: ignore_index is not supported with class-probability targets "
                                f"(got ignore_index={ignore_index})")
        # torch's result type: the promotion of logits, target (and weight)
        dt = torch.promote_types(logits.dtype, target.dtype)
        if weight is not None:
            dt = torch.promote_types(dt, weight.dtype)
        logits, target = logits.to(dt), target.to(dt)
        weight = None if weight is None else weight.to(dt)
    else:
        if weight is not None and weight.dtype != logits.dtype:
            raise DTypeError(f"{op}: expected weight to have the logits' dtype ({logits.dtype}), "
                             f"got {weight.dtype}")
        want = tuple(logits.shape[:class_dim]) + tuple(logits.shape[class_dim + 1:])
        if tuple(target.shape) != want:
            raise ShapeError(f"{op}: expected class-index target of shape {want} for logits of shape "
                             f"{tuple(logits.shape)} (or class probabilities of the logits' shape), "
                             f"got shape {tuple(target.shape)}")
        target = _check_class_target(op, target, C, ignore_index)
    # (N, C, d1, ...) -> (N * d1 * ..., C): classes last, one row per position
    if logits.dim() > 2:
        x2 = logits.movedim(1, -1).reshape(-1, C).contiguous()
        t2 = target.movedim(1, -1).reshape(-1, C).contiguous() if probs else target.reshape(-1).contiguous()
    else:
        x2 = logits.reshape(-1, C).contiguous()
        t2 = target.reshape(-1, C).contiguous() if probs else target.reshape(-1).contiguous()
    loss_shape = tuple(logits.shape[:class_dim]) + tuple(logits.shape[class_dim + 1:])
    if weight is not None:
        weight = weight.to(compute_dtype(x2.dtype)).contiguous()
    return x2, t2, weight, probs, loss_shape


def _denominator(target: Tensor, weight: Optional[Tensor], ignore_index: int, probs: bool, n: int,
                 dtype: torch.dtype) -> Tensor:
    """What "mean" divides by (a 0-d tensor of the compute dtype)."""
    if probs:
        return torch.tensor(float(n), dtype=dtype, device=target.device)
    keep = target != ignore_index
    if weight is None:
        return keep.sum().to(dtype)
    return torch.where(keep, weight[target.clamp(0, weight.shape[0] - 1)], 0).sum(dtype=dtype)


def _reduce(rows: Tensor, reduction: str, den: Tensor, out_dtype: torch.dtype, loss_shape) -> Tensor:
    if reduction == "none":
        return rows.to(out_dtype).view(loss_shape)
    total = rows.sum(dtype=torch.float64) if rows.dtype != torch.float64 else rows.sum()
    if reduction == "mean":
        # den == 0 (all ignored, or only zero-weight classes): nan, as torch's nll part gives 0 / 0
        total = torch.where(den == 0, float("nan"), total / den.double())
    return total.to(out_dtype)


def _row_scale(grad: Tensor, reduction: str, den: Tensor, target: Tensor, ignore_index: int,
               dtype: torch.dtype) -> Tensor:
    """d(loss)/d(row loss i) times the incoming gradient, as an (N,) contiguous vector. Ignored rows
    get 0 whatever the incoming gradient (torch's nll_loss backward writes 0 there): with "mean" over
    an all-ignored batch their gradient is then 0 rather than 0 * (1 / 0)."""
    n = target.shape[0]
    if reduction == "none":
        scale = grad.reshape(-1).to(dtype)
    else:
        g = grad.to(dtype)
        if reduction == "mean":  # den == 0: nan for the rows that count (torch: -w_t * g / 0)
            g = torch.where(den == 0, float("nan"), g / den.to(dtype))
        scale = g.reshape(1).expand(n)
    if not target.is_floating_point():
        scale = torch.where(target != ignore_index, scale, 0)
    return scale.contiguous()


def _ce_backend(x: Tensor, op: str = "fastlayers.cross_entropy"):
    return backend_for(op, x.device, x.dtype)

