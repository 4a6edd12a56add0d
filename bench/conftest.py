"""pytest set-up for the benchmark suite: hooks and fixtures (the harness is bench/harness.py).

bench/ is not in `testpaths`, so `make test` never collects it; run it explicitly: `pytest bench/`.
"""
from __future__ import annotations

import pathlib

import pytest
import torch

# bench/ is on sys.path under pytest; harness also puts the repo root there for `fastlayers`.
from harness import QUICK, cpu_backend_name, run_compare  # noqa: E402
from fastlayers import backends as _backends  # noqa: E402


# ----------------------------------------------------------------------------- pytest hooks
def pytest_configure(config):
    # pytest-benchmark 4.x keeps --benchmark-json as a path and writes it at the end without
    # creating its folder; 5.x opens the file itself while parsing options (an open file object
    # here, its folder must already exist: the Makefile creates it).
    target = config.getoption("benchmark_json", None)
    if isinstance(target, (str, pathlib.PurePath)):
        pathlib.Path(target).parent.mkdir(parents=True, exist_ok=True)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["fastlayers_forced_backend"] = _backends.forced()
    machine_info["quick"] = QUICK
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()


@pytest.fixture(scope="session")
def cpu_backend() -> str:
    """Fail the whole CPU suite with one clear message when fastlayers can't run on the CPU."""
    try:
        return cpu_backend_name()
    except Exception as e:  # BackendUnavailableError, or an ImportError from a broken build
        pytest.exit(f"fastlayers cannot run on the CPU: {e}\n"
                    "Build the C++ extension first (make), or for a dry run of the suite only, "
                    "set FASTLAYERS_BACKEND=reference.", returncode=1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every test compiles its own function for its own shapes. Resetting dynamo keeps one test's
    # specialisations from counting against the next one's recompile limit (past it,
    # torch.compile silently falls back to eager) and from turning shapes dynamic.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def compare(benchmark):
    """`compare(contenders, info=..., ...)`: run_compare bound to this test's benchmark."""
    def _compare(contenders, **kw):
        return run_compare(benchmark, contenders, **kw)
    return _compare


