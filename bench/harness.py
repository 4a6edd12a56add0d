"""Timing harness for the fastlayers benchmark suite (bench/test_bench_*.py; run `pytest bench/`).

Method: this machine is shared and noisy, so contenders are
never timed in separate blocks. Each pytest-benchmark round runs every contender once, one after
the other, and we keep each contender's time for that round. A speed-up is the median over rounds
of the per-round ratio t_baseline / t_fastlayers, which cancels most of the slow drifts that a
ratio of two separately taken medians would not.

Everything a report needs lands in `benchmark.extra_info` (see `run_compare`), so
bench/report.py works from the JSON alone.
"""
from __future__ import annotations

import gc
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Callable, Dict, Optional, Union

import torch

# `pytest bench/` puts bench/ (not the repo root) on sys.path; make the in-tree package importable
# without an install, the same way tests/ sees it.
ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastlayers import backends as _backends  # noqa: E402

QUICK = os.environ.get("FASTLAYERS_BENCH_QUICK", "") not in ("", "0")

# Round budget per test on the CPU: enough rounds for a stable median, few enough that the
# whole suite stays around 6-10 minutes on 2 cores (the biggest linear fwd+bwd round is ~1 s).
TARGET_S = 0.3 if QUICK else 3.0
# FASTLAYERS_BENCH_MIN_ROUNDS overrides the floor (e.g. 5 for a shorter run on a busy machine).
MIN_ROUNDS = int(os.environ.get("FASTLAYERS_BENCH_MIN_ROUNDS") or (3 if QUICK else 11))
MAX_ROUNDS = 15 if QUICK else 200


def cpu_backend_name() -> str:
    """The backend fastlayers uses for CPU tensors in this run (the default unless forced)."""
    return _backends.select(torch.device("cpu"), "bench").NAME


# ----------------------------------------------------------------------------- timing
def perf_counter_time(fn: Callable[[], object]) -> float:
    """Seconds for one call on the CPU."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median_ratio(num, den):
    return statistics.median(a / b for a, b in zip(num, den))


def _per_contender(value, names):
    return value if isinstance(value, dict) else {n: value for n in names}


def run_compare(benchmark, contenders: Dict[str, Callable[[], object]], *, info: dict,
                bytes_moved: Union[int, Dict[str, int], None] = None,
                flops: Union[int, Dict[str, int], None] = None,
                time_fn: Callable[[Callable[[], object]], float] = perf_counter_time,
                calls_per_sample: int = 1, warmup: int = 2, rounds: Optional[int] = None,
                fastlayers: str = "fastlayers", baselines=("eager", "compile")) -> dict:
    """Time `contenders` side by side in interleaved rounds and record the results.

    contenders: name -> zero-argument callable that does one complete measured unit (inputs
        prepared beforehand; compiled functions already compiled by the warm-up here).
    info: op/shape/dtype/pass labels, copied into extra_info.
    bytes_moved / flops: per call, one number or a per-contender dict (e.g. a copy ceiling).
    time_fn: how to time one call, in seconds (perf_counter here; do_bench on a GPU).
    calls_per_sample: a contender that loops over N calls reports per-call times.
    rounds: fixed number of rounds; by default chosen from a timed trial round.
    """
    names = list(contenders)
    for fn in contenders.values():  # compile, autotune, first-touch allocations: all untimed
        for _ in range(warmup):
            fn()

    times: Dict[str, list] = {n: [] for n in names}
    state = {"round": 0}

    def one_round():
        # Rotate the starting contender each round so none always runs right after the same
        # neighbour (its freed memory, its cache footprint).
        k = state["round"] % len(names)
        state["round"] += 1
        for n in names[k:] + names[:k]:
            times[n].append(time_fn(contenders[n]) / calls_per_sample)

    gc.collect()
    if rounds is None:
        t0 = time.perf_counter()
        one_round()  # trial round: sizes the run, then discarded
        trial = time.perf_counter() - t0
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(TARGET_S / max(trial, 1e-9))))
        for n in names:
            times[n].clear()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one contender's call would be charged to it
    try:
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    finally:
        if gc_was_enabled:
            gc.enable()

    med = {n: statistics.median(times[n]) for n in names}
    extra = dict(info)
    extra["contenders"] = names
    extra["rounds"] = rounds
    extra["threads"] = torch.get_num_threads()
    # 1-min load average after the rounds (this run itself adds ~threads): report.py warns when
    # other work was competing for the cores, which makes CPU numbers unreliable.
    extra["load1"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    extra["median_ms"] = {n: med[n] * 1e3 for n in names}
    extra["min_ms"] = {n: min(times[n]) * 1e3 for n in names}
    if "eager" in times:  # every contender's speed-up over eager, median of per-round ratios
        extra["vs_eager"] = {n: _median_ratio(times["eager"], times[n]) for n in names}
    if fastlayers in times:  # fastlayers' speed-up over every other contender
        extra["fastlayers_speedup"] = {n: _median_ratio(times[n], times[fastlayers])
                                       for n in names if n != fastlayers}
        extra["baselines"] = [b for b in baselines if b in times]
    if bytes_moved is not None:
        b = _per_contender(bytes_moved, names)
        extra["bytes"] = b
        extra["gbps"] = {n: b[n] / med[n] / 1e9 for n in names if b.get(n)}
    if flops is not None:
        f = _per_contender(flops, names)
        extra["flops"] = f
        extra["gflops"] = {n: f[n] / med[n] / 1e9 for n in names if f.get(n)}
    benchmark.extra_info.update(extra)
    benchmark.group = f"{info.get('op', '')} {info.get('pass', '')}".strip()
    return extra


# ----------------------------------------------------------------------------- inputs
def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, seed=0, requires_grad=False):
    """Fresh non-zero random data (never zeros: a zero page or a zero-skipping path would lie)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = (torch.randn(*shape, generator=g, dtype=torch.float32) * scale).to(device=device,
                                                                           dtype=dtype)
    return t.requires_grad_(requires_grad)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
