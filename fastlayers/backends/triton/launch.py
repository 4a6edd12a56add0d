"""How every launcher of the Triton backend runs a kernel: on the tensor's device, with a compile or
launch failure turned into a RuntimeError naming the op; and the argument conventions they share
(the compute dtype, a float argument split into two fp32 halves).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Tuple

import torch
import triton.language as tl
from torch import Tensor


def on_device(t: Tensor):
    """Launch on the tensor's device, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch(op: str, t: Tensor, fn: Callable[[], object]) -> None:
    """Run a kernel launch; a compile or launch failure becomes a RuntimeError naming the op."""
    try:
        with on_device(t):
            fn()
    except Exception as e:  # noqa: BLE001 - triton raises many types (CompilationError, OutOfResources...)
        msg = str(e).strip().splitlines()
        cause = f"{type(e).__name__}: {msg[-1] if msg else ''}"[:500]
        raise RuntimeError(f"{op}: the triton backend failed to run its kernel "
                           f"(dtype {t.dtype}, device {t.device}): {cause}") from e


def kernel_dtype(dtype: torch.dtype):
    """The kernels' compute dtype (a tl dtype) for data of `dtype`: fp64 for fp64, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def split_slope(slope: float) -> Tuple[float, float]:
    """slope = hi + lo with hi, lo fp32 numbers: a float kernel argument is fp32 on the GPU,
    and fp64 kernels recombine the two at (almost) full fp64 precision."""
    hi = float(torch.tensor(slope, dtype=torch.float32))
    if not math.isfinite(hi):
        return hi, 0.0
    return hi, float(torch.tensor(slope - hi, dtype=torch.float32))
