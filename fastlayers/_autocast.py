"""PyTorch's autocast policy, applied by the public ops themselves.

fastlayers' autograd Functions are invisible to autocast, so the wrappers cast as PyTorch would for
the equivalent aten op (checked by experiment on torch 2.13; tests/ops/test_autocast.py compares
against torch's own ops so a policy change shows up):
* linear is "lower precision" on cpu and cuda: floating inputs other than float64 are cast to the
  autocast dtype;
* softmax / log_softmax are "fp32_set_opt_dtype" on cuda (computed in float32 unless dtype= is
  given) and left alone on cpu.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

SOFTMAX_FP32_DEVICES = frozenset({"cuda"})


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for x's device, or None when autocast is off there."""
    # is_cpu / is_cuda: ~0.5 us cheaper per call than x.device.type (measured).
    if x.is_cpu:
        dev = "cpu"
    elif x.is_cuda:
        dev = "cuda"
    else:  # e.g. meta: autocast has no state for it (torch.is_autocast_enabled would raise)
        return None
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """t in the autocast dtype: float64 and non-floating tensors are left alone, like torch."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def linear_inputs(x, *rest):
    """(x, weights..., biases...) as autocast would hand them to a linear op."""
    if isinstance(x, Tensor) and (dtype := autocast_dtype(x)) is not None:
        return tuple(cast(t, dtype) if isinstance(t, Tensor) else t for t in (x, *rest))
    return (x, *rest)


def softmax_dtype(x: Tensor, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype= a softmax runs with under autocast (float32 on cuda when none was given)."""
    if (dtype is None and not x.is_cpu and x.device.type in SOFTMAX_FP32_DEVICES
            and autocast_dtype(x) is not None and x.is_floating_point()
            and x.dtype != torch.float64):
        return torch.float32
    return dtype
