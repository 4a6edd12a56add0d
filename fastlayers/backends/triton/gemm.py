"""The Triton backend's GEMM launcher, ``launch_gemm``: ``c = act(a @ b + bias)`` (and the
pre-activation z) on the kernels of kernels/gemm.py and kernels/gemm_tma.py, for every GEMM of the
backend (linear_act forward and backward, gated's backward GEMMs, the fused loss's gradients).

It chooses, per call: split-K (plain GEMMs with few output tiles and a long reduction: partial
tiles into a workspace, then a fixed-order sum), the persistent TMA kernel (fp16 / bf16, sm_90+,
TMA-legal operands, ``TMA_GEMM`` on), else the generic kernel, autotuned (``AUTOTUNE``; the config
it chose is remembered per key for CUDA-graph capture) or one heuristic config. Also the
fixed-order row sums (``sum_rows``, ``column_sums``) the bias gradients and split-K use.

The tunables (AUTOTUNE, SPLIT_K_*, TMA_*) are read here only: set them on this module.
"""
from __future__ import annotations

import contextvars
import os
from typing import Callable, Optional

import torch
import triton
from torch import Tensor

from ...activations import ACTIVATIONS
from ...kernels import gemm as _la
from ...kernels import gemm_tma as _tk
from ...kernels import linear_grad as _lg
from ...kernels import next_pow2
from .device import INTERPRETED, device_facts, gemm_precision
from .launch import kernel_dtype, launch, split_slope

NONE = ACTIVATIONS["none"].code  # the identity: no epilogue, no act'

# Autotuning (see kernels/gemm.py for the config classes). FASTLAYERS_AUTOTUNE=0 launches
# one heuristic config per shape instead (no benchmarking: quick runs, deterministic choice).
# During CUDA-graph capture nothing is benchmarked either: a config tuned earlier in this process
# for the same key, else the heuristic one.
AUTOTUNE = os.environ.get("FASTLAYERS_AUTOTUNE", "1") != "0"
_tuned: dict = {}  # our autotuning key -> the config autotuning chose

# Split-K for plain GEMMs whose output has fewer tiles than the GPU has SMs and whose reduction
# is long (dW = dz^T @ x with M >> N x K): each split sums SPLIT_K_MIN_CHUNK or more of K.
SPLIT_K_MIN_CHUNK = 1024
SPLIT_K_MAX = 16


def _capturing(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (no autotuning then)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def split_k_count(dclass: str, M: int, N: int, K: int, sms: int) -> int:
    """How many K ranges a plain (M, K) @ (K, N) GEMM is split into (1: no split). Depends on the
    shape and the SM count only, so the summation order is fixed for a shape on a device."""
    cfg = _la.SPLIT_K_CONFIG[dclass]
    tiles = triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"])
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), K // SPLIT_K_MIN_CHUNK, SPLIT_K_MAX))


def launch_gemm(op: str, a: Tensor, b: Tensor, c: Tensor, z: Optional[Tensor] = None,
                bias: Optional[Tensor] = None, act_code: int = NONE, slope: float = 0.0) -> None:
    """c = act(a @ b + bias) with z = a @ b + bias (if z is given); a: (M, K), b: (K, N),
    c and z: (M, N); any strides. All in one dtype."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    if K == 0:  # nothing to load: point the operands at c so no empty tensor is passed
        a, b = c, c.t()
    precision = gemm_precision(c)
    dclass = _la.dtype_class(str(c.dtype).rsplit(".", 1)[-1], precision)
    plain = z is None and bias is None and act_code == NONE
    hi, lo = split_slope(slope)
    layout = 2 * int(a.stride(1) == 1) + int(b.stride(1) == 1)
    meta = dict(HAS_BIAS=bias is not None, ACT=act_code, STORE_Z=z is not None,
                ACC_DTYPE=kernel_dtype(c.dtype), PRECISION=precision,
                DOT_FP32=INTERPRETED and c.dtype == torch.bfloat16)
    sms, capability = device_facts(c)

    def args(c_arg, k_per_split=0, stride_cs=0):
        return (a, b, c_arg, z if z is not None else c, bias if bias is not None else c,
                M, N, K,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1), c_arg.stride(-2), c_arg.stride(-1),
                hi, lo, k_per_split, stride_cs,
                next_pow2(M), next_pow2(N), next_pow2(K), layout)

    split = split_k_count(dclass, M, N, K, sms) if plain and c.is_contiguous() else 1
    if split > 1:  # partial tiles into an fp32 / fp64 workspace, then a fixed-order sum
        cfg = _la.SPLIT_K_CONFIG[dclass]
        bk = cfg.kwargs["BLOCK_K"]
        k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
        split = triton.cdiv(K, k_per_split)
        work = torch.empty((split, M, N), device=c.device,
                           dtype=torch.float64 if dclass == "fp64" else torch.float32)
        grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]), split)
        launch(op, c, lambda: _la.gemm_kernel[grid](
            *args(work, k_per_split, M * N), **meta, SPLIT_K=split, **cfg.all_kwargs()))
        sum_rows(op, work.view(split, M * N), c.view(M * N))
        return

    if K and _use_tma_gemm(a, b, c, capability):
        _tma_gemm(op, a, b, c, z, bias, act_code, hi, lo, sms)
        return
    configs = _la.gemm_configs(dclass, next_pow2(M), plain, capability)
    key = (dclass, plain, next_pow2(M), next_pow2(N), next_pow2(K), layout, act_code, bias is not None,
           z is not None, precision, c.dtype, c.device)
    if AUTOTUNE and not _capturing(c):
        kernel = _la.autotuned_gemm(configs)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        launch(op, c, lambda: kernel[grid](*args(c), **meta, SPLIT_K=1))
        _tuned[key] = kernel.best_config
        return
    cfg = _tuned.get(key) or _la.heuristic_config(configs, M, N, sms)
    grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
    launch(op, c, lambda: _la.gemm_kernel[grid](*args(c), **meta, SPLIT_K=1, **cfg.all_kwargs()))


# The persistent TMA GEMM (kernels/gemm_tma.py `tma_gemm_kernel`) for fp16 / bf16
# GEMMs on sm_90+ GPUs. Off until it has run on a GPU (it is tested only under the interpreter
# and compiled by the sm_90 gate): FASTLAYERS_TMA_GEMM=1 in the environment (or TMA_GEMM = True
# here) turns it on; scripts/gpu_check.py runs it and times it against the generic kernel.
# TMA_MIN_M: smaller M stays on the generic kernel (its decode-sized configs; a persistent grid
# gains nothing with few tiles).
TMA_GEMM = os.environ.get("FASTLAYERS_TMA_GEMM", "0") == "1"
TMA_MIN_M = 256
TMA_PROGRAMS_PER_SM = 1


def tma_layout_ok(a: Tensor, b: Tensor, itemsize: int) -> bool:
    """TMA's rules for a (M, K) @ b (K, N) of elements of `itemsize` bytes: K > 0, a with unit
    column stride, b with unit stride in one dimension, 16-byte aligned base addresses and row
    strides."""
    if a.shape[1] == 0 or a.stride(1) != 1 or not (b.stride(0) == 1 or b.stride(1) == 1):
        return False
    lead_b = b.stride(1) if b.stride(0) == 1 else b.stride(0)
    return all(v % 16 == 0 for v in (a.stride(0) * itemsize, lead_b * itemsize, a.data_ptr(), b.data_ptr()))


def tma_gemm_ok(a: Tensor, b: Tensor, c: Tensor, capability: int) -> bool:
    """Whether the persistent TMA GEMM computes c = epilogue(a @ b): TMA_GEMM on, compute
    capability >= 9.0 (10 * major + minor >= 90), fp16 / bf16, M >= TMA_MIN_M and tma_layout_ok."""
    return (TMA_GEMM and capability >= 90 and c.dtype in (torch.float16, torch.bfloat16)
            and a.shape[0] >= TMA_MIN_M and tma_layout_ok(a, b, c.element_size()))


def _use_tma_gemm(a: Tensor, b: Tensor, c: Tensor, capability: int) -> bool:
    """The chooser of launch_gemm: the TMA GEMM on CUDA tensors only (tests force it under the
    interpreter by replacing this function)."""
    return c.is_cuda and tma_gemm_ok(a, b, c, capability)


def _tma_scratch(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    """Global scratch for the TMA descriptors the kernel makes on the device (triton's allocator
    protocol; torch's caching allocator, current device and stream)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_gemm(op: str, a: Tensor, b: Tensor, c: Tensor, z: Optional[Tensor], bias: Optional[Tensor],
              act_code: int, hi: float, lo: float, sms: int) -> None:
    """launch_gemm on the persistent TMA kernel (tma_gemm_ok(a, b, c, ...) holds): at most
    TMA_PROGRAMS_PER_SM programs per SM, autotuned like launch_gemm."""
    M, K = a.shape
    N = b.shape[1]
    b_kmajor = b.stride(0) == 1  # b is the transpose of a row-major (N, K) tensor (W^T)
    plain = z is None and bias is None and act_code == NONE
    args = (a, b.t() if b_kmajor else b, c, z if z is not None else c, bias if bias is not None else c,
            M, N, K, a.stride(0), b.stride(1) if b_kmajor else b.stride(0), c.stride(0), c.stride(1),
            hi, lo, next_pow2(M), next_pow2(N), next_pow2(K))
    meta = dict(HAS_BIAS=bias is not None, ACT=act_code, STORE_Z=z is not None, B_KMAJOR=b_kmajor,
                DOT_FP32=INTERPRETED and c.dtype == torch.bfloat16)
    configs = _tk.tma_gemm_configs(plain)
    programs = sms * TMA_PROGRAMS_PER_SM

    def grid(meta):
        return (min(programs, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    key = ("tma", plain, next_pow2(M), next_pow2(N), next_pow2(K), b_kmajor, act_code,
           bias is not None, z is not None, c.dtype, c.device)
    if AUTOTUNE and not _capturing(c):
        kernel = _tk.autotuned_tma_gemm(configs)
        _launch_with_scratch(op, c, lambda: kernel[grid](*args, **meta))
        _tuned[key] = kernel.best_config
        return
    cfg = _tuned.get(key) or _la.heuristic_config(configs, M, N, sms)
    _launch_with_scratch(op, c, lambda: _tk.tma_gemm_kernel[grid(cfg.kwargs)](
        *args, **meta, **cfg.all_kwargs()))


def _launch_with_scratch(op: str, t: Tensor, fn: Callable[[], object]) -> None:
    """launch with _tma_scratch as triton's allocator, set in a copy of the current context so
    the caller's allocator setting is left as it was."""
    def run():
        triton.set_allocator(_tma_scratch)
        launch(op, t, fn)

    contextvars.copy_context().run(run)


def sum_rows(op: str, partial: Tensor, out: Tensor) -> None:
    """out = partial.sum(0) in a fixed order; partial: (P, N) contiguous fp32/fp64, out: (N,)."""
    P, N = partial.shape
    launch(op, out, lambda: _lg.sum_rows_kernel[(triton.cdiv(N, _lg.SUM_BLOCK_N),)](
        partial, out, P, N, BLOCK_P=_lg.SUM_BLOCK_P, BLOCK_N=_lg.SUM_BLOCK_N,
        num_warps=_lg.SUM_NUM_WARPS))


def column_sums(op: str, partial: Tensor, out_dtype: torch.dtype) -> Tensor:
    """out[n] = sum_p partial[p, n] in a fixed order (sum_rows), as a new (N,) tensor of out_dtype."""
    out = torch.empty(partial.shape[1], device=partial.device, dtype=out_dtype)
    sum_rows(op, partial, out)
    return out
