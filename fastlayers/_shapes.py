"""The two layouts of the backend contract, from tensors of any shape."""
import math

from torch import Tensor


def as_2d(t: Tensor) -> Tensor:
    """(*, K) -> (M, K) with M = prod(*): a view when the leading dims allow (K may be 0)."""
    if t.dim() == 2:
        return t
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def as_3d(x: Tensor, dim: int) -> Tensor:
    """(*pre, L, *post) -> (outer, L, inner) contiguous, for an op over `dim` (a 0-d x is (1, 1, 1))."""
    x = x.contiguous()
    if x.dim() == 0:
        return x.view(1, 1, 1)
    shape = x.shape
    length, inner = shape[dim], 1
    for s in shape[dim + 1:]:
        inner *= s
    n = length * inner
    outer = x.numel() // n if n else math.prod(shape[:dim])
    return x.view(outer, length, inner)
