"""What rewritten and redirected forwards call in place of torch's cross-entropy (fastlayers.swap's
loss routes: see fastlayers/swap/loss/__init__.py)."""
from __future__ import annotations

import types
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ops.cross_entropy import cross_entropy
from ...ops.linear_cross_entropy import linear_cross_entropy

FUSED, CROSS_ENTROPY = "linear_cross_entropy", "cross_entropy"


def is_torch_cross_entropy(obj: Any) -> bool:
    """PyTorch's own F.cross_entropy (not a replacement someone installed in its place)."""
    return (isinstance(obj, types.FunctionType) and obj.__module__ == "torch.nn.functional"
            and obj.__qualname__ == "cross_entropy")


def cross_entropy_as_torch(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                           size_average: Optional[bool] = None, ignore_index: int = -100,
                           reduce: Optional[bool] = None, reduction: str = "mean",
                           label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy`` with its own signature, computed by fastlayers.cross_entropy (the
    deprecated size_average / reduce arguments go to PyTorch's own)."""
    if size_average is not None or reduce is not None:
        return F.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                               label_smoothing)
    return cross_entropy(input, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         reduction=reduction, weight=weight)


def logits_stand_in(h: Tensor, weight: Tensor) -> Tensor:
    """A meta tensor of the head's logits' shape, for the shape reads and views the forward does
    on them (no data, no memory)."""
    return torch.empty((*h.shape[:-1], weight.shape[0]), dtype=h.dtype, device="meta")


def head_cross_entropy(h: Tensor, weight: Tensor, bias: Optional[Tensor], logits_view: Tensor,
                       target: Tensor, class_weight: Optional[Tensor] = None, ignore_index: int = -100,
                       reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """``cross_entropy(<views of> F.linear(h, weight, bias), target, class_weight, ...)``;
    logits_view is the stand-in after the forward's views. Views keep the row-major order, so a
    (N, vocab) view is h's leading dims flattened: one linear_cross_entropy. Anything else (class
    weights, class-probability targets, another shape) computes the logits and the loss as written."""
    vocab = weight.shape[0]
    if (class_weight is None and logits_view.dim() == 2 and logits_view.shape[1] == vocab
            and isinstance(target, Tensor) and not target.is_floating_point()
            and target.shape == logits_view.shape[:1]):
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), weight, target, bias, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, reduction=reduction)
    logits = F.linear(h, weight, bias).reshape(logits_view.shape)
    return cross_entropy_as_torch(logits, target, class_weight, ignore_index=ignore_index, reduction=reduction,
                                  label_smoothing=label_smoothing)
