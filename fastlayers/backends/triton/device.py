"""The Triton backend's facts about devices: whether the kernels run in Triton's interpreter, which
devices it can run on (``unavailable_reason``), a GPU's SM count and compute capability, and the
TF32 policy of fp32 GEMMs (``fp32_matmul_precision``: PyTorch's setting for CUDA matmuls).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...kernels import tiles as _tiles

# Whether the kernels were built for the interpreter: triton reads TRITON_INTERPRET when each
# @triton.jit decorator runs, i.e. when fastlayers.kernels was imported, not now.
INTERPRETED = _tiles.INTERPRET

# "SMs" of the interpreter (one program at a time): tests raise it to reach the split-K path.
INTERPRETER_SMS = 1
_device_facts: dict = {}  # GPU index -> (SM count, compute capability)


def unavailable_reason(device: torch.device) -> Optional[str]:
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if INTERPRETED:
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 was set after fastlayers' Triton kernels were imported; "
                    "set it before importing fastlayers to run Triton on CPU tensors")
        return ("Triton kernels run on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 "
                "before importing fastlayers (Triton's interpreter, slow: for tests)")
    return f"Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type}"


def device_facts(t: Tensor) -> Tuple[int, int]:
    """(SM count, compute capability as 10 * major + minor) of t's GPU; for the interpreter
    (INTERPRETER_SMS, 90)."""
    if not t.is_cuda:
        return INTERPRETER_SMS, 90
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _device_facts:
        props = torch.cuda.get_device_properties(idx)
        _device_facts[idx] = (props.multi_processor_count, 10 * props.major + props.minor)
    return _device_facts[idx]


def num_sms(t: Tensor) -> int:
    return device_facts(t)[0]


def fp32_matmul_precision() -> str:
    """tl.dot's input_precision for fp32 CUDA GEMMs: "tf32" when PyTorch lets CUDA fp32 matmuls use
    TF32, else "ieee". Never raises.

    PyTorch has two APIs for this: ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9;
    "tf32" / "ieee", or "none" to inherit the global ``torch.backends.fp32_precision``; the getter
    returns the inherited value) and the legacy ``torch.backends.cuda.matmul.allow_tf32`` /
    ``torch.set_float32_matmul_precision``. Setting the new one makes a read of the legacy flag
    raise ("mix of legacy and new APIs"), so the new one is read first and the legacy one only
    when the new one is absent or "none" (both unset: the legacy flag decides, default False).
    """
    matmul = torch.backends.cuda.matmul
    try:
        new = getattr(matmul, "fp32_precision", None)
    except Exception:  # noqa: BLE001 - an unexpected torch version: fall through to the legacy flag
        new = None
    if new == "tf32":
        return "tf32"
    if new == "ieee":
        return "ieee"
    try:
        return "tf32" if bool(matmul.allow_tf32) else "ieee"
    except Exception:  # noqa: BLE001 - a mixed-API state torch itself rejects: exact fp32
        return "ieee"


def gemm_precision(c: Tensor) -> str:
    """tl.dot's input_precision for a GEMM writing c: fp32 CUDA GEMMs follow PyTorch's TF32
    setting (fp32_matmul_precision); everything else "ieee" (ignored by non-fp32 dots)."""
    return fp32_matmul_precision() if c.dtype == torch.float32 and c.is_cuda else "ieee"
