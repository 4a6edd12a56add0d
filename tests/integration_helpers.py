"""Shared by the integration tests (swap, compile, autocast, ddp, trust, fuzz): whether a backend can
run here, and fp32 tolerances for whole models. (The `backend` fixture is conftest.py's.)"""
from __future__ import annotations

import torch

from conftest import assert_close_fp32

from fastlayers._errors import BackendUnavailableError
from fastlayers.backends import load


def backend_skip_reason(name: str, device: str = "cpu") -> str | None:
    try:
        mod = load(name)
    except BackendUnavailableError as e:
        return str(e)
    return mod.unavailable_reason(torch.device(device))


def assert_close_gemm(actual: torch.Tensor, expected: torch.Tensor, k: int) -> None:
    """Whole-model fp32 results against the original model's: conftest's rule for two fp32 results."""
    assert_close_fp32(actual, expected, red=k)
