"""Triton kernels (``@triton.jit`` functions, their autotune configs and block-size helpers only).

Launchers live in fastlayers/backends/triton/. Importing this package imports triton, and the
kernels are built for the interpreter when TRITON_INTERPRET=1 is set *before* the import (triton
reads the flag when each ``@triton.jit`` decorator runs).
"""
import triton


def next_pow2(n: int) -> int:
    """The smallest power of two >= n, 1 for n <= 1: block sizes and autotune buckets."""
    return triton.next_power_of_2(max(int(n), 1))
