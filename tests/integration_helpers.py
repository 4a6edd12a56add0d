"""Shared by the issue-4 integration tests (swap, compile, autocast, ddp): which backends to run
on, and fp32 tolerances for whole models."""
from __future__ import annotations

import math

import pytest
import torch

import fastlayers
from fastlayers._errors import BackendUnavailableError
from fastlayers.backends import load


def backend_skip_reason(name: str, device: str = "cpu") -> str | None:
    try:
        mod = load(name)
    except BackendUnavailableError as e:
        return str(e)
    return mod.unavailable_reason(torch.device(device))


@pytest.fixture(params=["reference", "cpp"])
def backend(request):
    """Runs the test on each CPU backend, forced; skips (saying why) one that cannot run here."""
    why = backend_skip_reason(request.param)
    if why is not None:
        pytest.skip(f"backend {request.param!r} unavailable: {why}")
    with fastlayers.use_backend(request.param):
        yield request.param


def assert_close_gemm(actual: torch.Tensor, expected: torch.Tensor, k: int) -> None:
    """fp32 tolerance for results of a chain of GEMMs with reduction length ~k: the assert_close
    defaults, atol scaled by sqrt(k) since fused backends may sum in another order."""
    torch.testing.assert_close(actual, expected, rtol=1.3e-6 * 4, atol=1e-5 * math.sqrt(k))
