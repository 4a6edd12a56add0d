"""Shared by the issue-4 integration tests (swap, compile, autocast, ddp): whether a backend can
run here, and fp32 tolerances for whole models. (The `backend` fixture is conftest.py's.)"""
from __future__ import annotations

import math

import torch

from fastlayers._errors import BackendUnavailableError
from fastlayers.backends import load


def backend_skip_reason(name: str, device: str = "cpu") -> str | None:
    try:
        mod = load(name)
    except BackendUnavailableError as e:
        return str(e)
    return mod.unavailable_reason(torch.device(device))


def assert_close_gemm(actual: torch.Tensor, expected: torch.Tensor, k: int) -> None:
    """fp32 tolerance for results of a chain of GEMMs with reduction length ~k: the assert_close
    defaults, atol scaled by sqrt(k) since fused backends may sum in another order."""
    torch.testing.assert_close(actual, expected, rtol=1.3e-6 * 4, atol=1e-5 * math.sqrt(k))
