"""Triton backend: launches the kernels of fastlayers/kernels/ (the contract is in
fastlayers/backends/contract.py).

Runs on CUDA tensors, and on CPU tensors when the kernels were built for Triton's interpreter
(TRITON_INTERPRET=1 in the environment before fastlayers' kernels are imported), which is how CI
tests every kernel without a GPU.

linear_act forward: one GEMM launch whose epilogue adds the bias, applies the activation and
    stores y (and the pre-activation z when the backward needs it). fp16 / bf16 GEMMs with
    TMA-legal operands on sm_90+ GPUs run the persistent TMA kernel (``tma_gemm_ok``).
linear_act backward: one elementwise launch ``dz = dy * act'(saved)`` that also writes per-slab
    column sums of dz, a small fixed-order reduction of those sums into db, then the GEMMs
    dx = dz @ W and dW = dz^T @ x. (Fusing act' into the GEMM prologue instead would save one
    write + read of dz; not measured yet.)
softmax / log_softmax: single-pass kernels for rows that fit one tile, streaming kernels (online
    max and rescaled sum, then a normalising pass) for longer rows, and split rows (several
    programs per row: per-segment partials, then a combine and write per segment) when long rows
    are too few to fill the GPU; see kernels/softmax.py.

fp32 GEMMs follow PyTorch's TF32 setting for CUDA matmuls exactly as ``torch.mm`` does (see
``fp32_matmul_precision``: the ``fp32_precision`` API or the legacy ``allow_tf32`` flag; exact
fp32, input_precision="ieee", when TF32 is off, as PyTorch's default). fp64 runs in fp64 throughout, GEMMs included (tl.dot
on fp64), so gradcheck goes through these kernels.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the registry turns this into a BackendUnavailableError
    raise ImportError(
        "the 'triton' backend needs the triton package (pip install 'triton>=3.0', or "
        f"pip install 'fastlayers[triton]'); importing it failed: {e}") from e

from ..activations import ACTIVATIONS, SAVE_INPUT, SAVE_OUTPUT, Activation
from ..kernels import gemm as _la
from ..kernels import next_pow2
from ..kernels import softmax as _sm

NAME = "triton"
_NONE = ACTIVATIONS["none"].code  # the identity: no epilogue, no act'
DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

# Whether the kernels were built for the interpreter: triton reads TRITON_INTERPRET when each
# @triton.jit decorator runs, i.e. when fastlayers.kernels was imported, not now.
INTERPRETED = _la.INTERPRET


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


# ----------------------------------------------------------------------------- helpers
def _on_device(t: Tensor):
    """Launch on the tensor's device, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch(op: str, t: Tensor, fn: Callable[[], object]) -> None:
    """Run a kernel launch; a compile or launch failure becomes a RuntimeError naming the op."""
    try:
        with _on_device(t):
            fn()
    except Exception as e:  # noqa: BLE001 - triton raises many types (CompilationError, OutOfResources...)
        msg = str(e).strip().splitlines()
        cause = f"{type(e).__name__}: {msg[-1] if msg else ''}"[:500]
        raise RuntimeError(f"{op}: the triton backend failed to run its kernel "
                           f"(dtype {t.dtype}, device {t.device}): {cause}") from e


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _split_slope(slope: float) -> Tuple[float, float]:
    """slope = hi + lo with hi, lo fp32 numbers: a float kernel argument is fp32 on the GPU,
    and fp64 kernels recombine the two at (almost) full fp64 precision."""
    hi = float(torch.tensor(slope, dtype=torch.float32))
    if not math.isfinite(hi):
        return hi, 0.0
    return hi, float(torch.tensor(slope - hi, dtype=torch.float32))


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
# "SMs" of the interpreter (one program at a time): tests raise it to reach the split-K path.
INTERPRETER_SMS = 1
_device_facts: dict = {}


def _device(t: Tensor) -> Tuple[int, int]:
    """(SM count, compute capability as 10 * major + minor) of t's GPU; for the interpreter
    (INTERPRETER_SMS, 90)."""
    if not t.is_cuda:
        return INTERPRETER_SMS, 90
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _device_facts:
        props = torch.cuda.get_device_properties(idx)
        _device_facts[idx] = (props.multi_processor_count, 10 * props.major + props.minor)
    return _device_facts[idx]


def _num_sms(t: Tensor) -> int:
    return _device(t)[0]


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


def _gemm(op: str, a: Tensor, b: Tensor, c: Tensor, z: Optional[Tensor] = None,
          bias: Optional[Tensor] = None, act_code: int = _NONE, slope: float = 0.0) -> None:
    """c = act(a @ b + bias) with z = a @ b + bias (if z is given); a: (M, K), b: (K, N),
    c and z: (M, N); any strides. All in one dtype."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    if K == 0:  # nothing to load: point the operands at c so no empty tensor is passed
        a, b = c, c.t()
    precision = fp32_matmul_precision() if c.dtype == torch.float32 and c.is_cuda else "ieee"
    dclass = _la.dtype_class(str(c.dtype).rsplit(".", 1)[-1], precision)
    plain = z is None and bias is None and act_code == _NONE
    hi, lo = _split_slope(slope)
    layout = 2 * int(a.stride(1) == 1) + int(b.stride(1) == 1)
    meta = dict(HAS_BIAS=bias is not None, ACT=act_code, STORE_Z=z is not None,
                ACC_DTYPE=_compute_dtype(c.dtype), PRECISION=precision,
                DOT_FP32=INTERPRETED and c.dtype == torch.bfloat16)
    sms, capability = _device(c)

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
        _launch(op, c, lambda: _la.gemm_kernel[grid](
            *args(work, k_per_split, M * N), **meta, SPLIT_K=split, **cfg.all_kwargs()))
        _sum_rows(op, work.view(split, M * N), c.view(M * N))
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

        _launch(op, c, lambda: kernel[grid](*args(c), **meta, SPLIT_K=1))
        _tuned[key] = kernel.best_config
        return
    cfg = _tuned.get(key) or _la.heuristic_config(configs, M, N, sms)
    grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
    _launch(op, c, lambda: _la.gemm_kernel[grid](*args(c), **meta, SPLIT_K=1, **cfg.all_kwargs()))


# The persistent TMA GEMM (kernels/gemm.py `_gemm_tma_persistent_kernel`) for fp16 / bf16
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
    """The chooser of _gemm: the TMA GEMM on CUDA tensors only (tests force it under the
    interpreter by replacing this function)."""
    return c.is_cuda and tma_gemm_ok(a, b, c, capability)


def _tma_scratch(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    """Global scratch for the TMA descriptors the kernel makes on the device (triton's allocator
    protocol; torch's caching allocator, current device and stream)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_gemm(op: str, a: Tensor, b: Tensor, c: Tensor, z: Optional[Tensor], bias: Optional[Tensor],
              act_code: int, hi: float, lo: float, sms: int) -> None:
    """_gemm on the persistent TMA kernel (tma_gemm_ok(a, b, c, ...) holds): at most
    TMA_PROGRAMS_PER_SM programs per SM, autotuned like _gemm."""
    M, K = a.shape
    N = b.shape[1]
    b_kmajor = b.stride(0) == 1  # b is the transpose of a row-major (N, K) tensor (W^T)
    plain = z is None and bias is None and act_code == _NONE
    args = (a, b.t() if b_kmajor else b, c, z if z is not None else c, bias if bias is not None else c,
            M, N, K, a.stride(0), b.stride(1) if b_kmajor else b.stride(0), c.stride(0), c.stride(1),
            hi, lo, next_pow2(M), next_pow2(N), next_pow2(K))
    meta = dict(HAS_BIAS=bias is not None, ACT=act_code, STORE_Z=z is not None, B_KMAJOR=b_kmajor,
                DOT_FP32=INTERPRETED and c.dtype == torch.bfloat16)
    configs = _la.tma_gemm_configs(plain)
    programs = sms * TMA_PROGRAMS_PER_SM

    def grid(meta):
        return (min(programs, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    key = ("tma", plain, next_pow2(M), next_pow2(N), next_pow2(K), b_kmajor, act_code,
           bias is not None, z is not None, c.dtype, c.device)
    if AUTOTUNE and not _capturing(c):
        kernel = _la.autotuned_tma_gemm(configs)
        _launch_with_scratch(op, c, lambda: kernel[grid](*args, **meta))
        _tuned[key] = kernel.best_config
        return
    cfg = _tuned.get(key) or _la.heuristic_config(configs, M, N, sms)
    _launch_with_scratch(op, c, lambda: _la.tma_gemm_kernel[grid(cfg.kwargs)](
        *args, **meta, **cfg.all_kwargs()))


def _launch_with_scratch(op: str, t: Tensor, fn: Callable[[], object]) -> None:
    """_launch with _tma_scratch as triton's allocator, set in a copy of the current context so
    the caller's allocator setting is left as it was."""
    def run():
        triton.set_allocator(_tma_scratch)
        _launch(op, t, fn)

    contextvars.copy_context().run(run)


def _sum_rows(op: str, partial: Tensor, out: Tensor) -> None:
    """out = partial.sum(0) in a fixed order; partial: (P, N) contiguous fp32/fp64, out: (N,)."""
    P, N = partial.shape
    _launch(op, out, lambda: _la.sum_rows_kernel[(triton.cdiv(N, _la.SUM_BLOCK_N),)](
        partial, out, P, N, BLOCK_P=_la.SUM_BLOCK_P, BLOCK_N=_la.SUM_BLOCK_N,
        num_warps=_la.SUM_NUM_WARPS))


# ----------------------------------------------------------------------------- linear + act
def linear_act_forward(x: Tensor, w: Tensor, b: Optional[Tensor], act: Activation, slope: float,
                       save: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """y = act(x @ w.T + b): x (M, K), w (N, K), b (N,) or None; any strides.
    Cost: 2*M*N*K flops; reads M*K + N*K (+ N), writes M*N (+ M*N for z) elements."""
    op = "fastlayers.linear_act"
    M, N = x.shape[0], w.shape[0]
    kind = act.saves(slope)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    z = torch.empty_like(y) if save and kind == SAVE_INPUT else None
    _gemm(op, x, w.t(), y, z=z, bias=b, act_code=act.code, slope=slope)
    if not save:
        return y, None
    return y, (y if kind == SAVE_OUTPUT else z)


# Target number of (row-slab x column-block) programs of act_grad_bias_kernel: enough to fill a
# GPU; each program then loops over its slab. Fixed, so db's summation order depends only on
# the shape.
_GRAD_TARGET_PROGRAMS = 1024


def _row_slabs(M: int, N: int, bm: int, bn: int) -> Tuple[int, int, int]:
    """The grid of the elementwise backward kernels: (row-slab programs, column blocks, rows per
    slab). About _GRAD_TARGET_PROGRAMS programs in all; slabs are whole multiples of bm rows, so
    the bias gradient's summation order depends only on the shape."""
    col_blocks = triton.cdiv(N, bn)
    row_blocks = triton.cdiv(M, bm)
    progs = min(row_blocks, max(1, _GRAD_TARGET_PROGRAMS // col_blocks))
    rows_per_prog = triton.cdiv(row_blocks, progs) * bm
    return triton.cdiv(M, rows_per_prog), col_blocks, rows_per_prog


def _act_grad_and_bias(op: str, dy: Tensor, saved: Optional[Tensor], act: Activation, slope: float,
                       need_dz: bool, need_db: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """dz = dy * act'(saved) (when need_dz) and db = dz.sum(0) (when need_db)."""
    M, N = dy.shape
    store_dz = need_dz and act.code != _NONE
    dz = torch.empty_like(dy) if store_dz else (dy if need_dz else None)
    if not (store_dz or need_db):
        return dz, None
    compute = torch.float64 if dy.dtype == torch.float64 else torch.float32
    if M == 0 or N == 0:
        return dz, (torch.zeros(N, device=dy.device, dtype=dy.dtype) if need_db else None)
    bm = _la.GRAD_BLOCK_M_FP64 if dy.dtype == torch.float64 else _la.GRAD_BLOCK_M
    bn = _la.GRAD_BLOCK_N
    progs, col_blocks, rows_per_prog = _row_slabs(M, N, bm, bn)
    partial = torch.empty((progs, N), device=dy.device, dtype=compute) if need_db else dy
    hi, lo = _split_slope(slope)
    saved_arg = saved.contiguous() if saved is not None and act.code != _NONE else dy
    _launch(op, dy, lambda: _la.act_grad_bias_kernel[(progs, col_blocks)](
        dy, saved_arg, dz if store_dz else dy, partial,
        M, N, rows_per_prog, hi, lo,
        ACT=act.code, STORE_DZ=store_dz, NEED_DB=need_db,
        COMPUTE_DTYPE=_compute_dtype(dy.dtype), BLOCK_M=bm, BLOCK_N=bn,
        num_warps=_la.GRAD_NUM_WARPS))
    if not need_db:
        return dz, None
    db = torch.empty(N, device=dy.device, dtype=dy.dtype)
    _sum_rows(op, partial, db)
    return dz, db


def linear_act_backward(dy: Tensor, x: Optional[Tensor], w: Optional[Tensor],
                        saved: Optional[Tensor], act: Activation, slope: float,
                        needs: Tuple[bool, bool, bool]
                        ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """dz = dy * act'(saved); dx = dz @ w (M, K); dw = dz^T @ x (N, K); db = dz.sum(0) (N,).
    dy: (M, N) contiguous; x (M, K) and w (N, K) any strides (None when not needed).
    Cost: 4*M*N*K flops for dx and dw; the elementwise pass reads 2*M*N and writes M*N."""
    op = "fastlayers.linear_act (backward)"
    need_dx, need_dw, need_db = needs
    dy = dy.contiguous()
    dz, db = _act_grad_and_bias(op, dy, saved, act, slope, need_dx or need_dw, need_db)
    dx = dw = None
    if need_dx:
        dx = torch.empty((dy.shape[0], w.shape[1]), device=dy.device, dtype=w.dtype)
        _gemm(op, dz, w, dx)
    if need_dw:
        dw = torch.empty((dy.shape[1], x.shape[1]), device=dy.device, dtype=x.dtype)
        _gemm(op, dz.t(), x, dw)
    return dx, dw, db


# ----------------------------------------------------------------------------- softmax
def _softmax_launch(op: str, fwd: bool, log: bool, out: Tensor, *tensors: Tensor) -> None:
    outer, length, inner = out.shape
    rows = outer * inner
    if out.numel() == 0:
        return
    single, block_r, block_l, warps = _sm.plan(rows, length, inner, out.dtype == torch.float64)
    meta = dict(COMPUTE_DTYPE=_compute_dtype(out.dtype), STRIDED=inner > 1, BLOCK_R=block_r,
                BLOCK_L=block_l, num_warps=warps)
    tiles = _sm.grid_size(rows, inner, block_r)
    segments, seg = (1, length) if single else _sm.split_plan(rows, length, inner, block_r, block_l,
                                                              _num_sms(out))
    if segments > 1:
        _softmax_split(op, fwd, log, out, tensors, tiles, segments, seg, meta)
        return
    if fwd:
        kernel = _sm.softmax_fwd_kernel if single else _sm.softmax_fwd_streaming_kernel
    else:
        kernel = _sm.softmax_bwd_kernel if single else _sm.softmax_bwd_streaming_kernel
    _launch(op, out, lambda: kernel[(tiles,)](*tensors, out, rows, length, inner, LOG=log, **meta))


def _softmax_split(op: str, fwd: bool, log: bool, out: Tensor, tensors: Tuple[Tensor, ...],
                   tiles: int, segments: int, seg: int, meta: dict) -> None:
    """Split rows (see kernels/softmax.py): per-segment partials, then each segment's output from
    its row's combined partials. Partials: (2, R, S) (max, sum exp) forward, (R, S) backward, in
    the compute dtype."""
    outer, length, inner = out.shape
    rows = outer * inner
    part = torch.empty((2 if fwd else 1, rows, segments), device=out.device,
                       dtype=torch.float64 if out.dtype == torch.float64 else torch.float32)
    grid = (tiles, segments)
    sizes = (rows, length, inner, seg, segments)
    if fwd:
        _launch(op, out, lambda: _sm.softmax_fwd_split_stats_kernel[grid](*tensors, part, *sizes, **meta))
        kernel = _sm.softmax_fwd_split_kernel
    else:
        _launch(op, out, lambda: _sm.softmax_bwd_split_stats_kernel[grid](
            *tensors, part, *sizes, LOG=log, **meta))
        kernel = _sm.softmax_bwd_split_kernel
    _launch(op, out, lambda: kernel[grid](*tensors, out, part, *sizes, LOG=log,
                                          BLOCK_S=next_pow2(segments), **meta))


def softmax_forward(x: Tensor, log: bool) -> Tensor:
    """softmax (or log_softmax) over dim 1 of x: (outer, L, inner) contiguous.
    Bytes: 2 * numel * itemsize (single pass) or 3 * numel * itemsize (streaming, split rows)."""
    op = "fastlayers.log_softmax" if log else "fastlayers.softmax"
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    _softmax_launch(op, True, log, y, x)
    return y


def softmax_backward(dy: Tensor, y: Tensor, log: bool) -> Tensor:
    """dx from dy and the forward's output y, both (outer, L, inner) contiguous.
    Bytes: 3 * numel * itemsize (single pass) or 5 * numel * itemsize (streaming, split rows)."""
    op = "fastlayers.log_softmax (backward)" if log else "fastlayers.softmax (backward)"
    dy, y = dy.contiguous(), y.contiguous()
    dx = torch.empty_like(y, memory_format=torch.contiguous_format)
    _softmax_launch(op, False, log, dx, dy, y)
    return dx


# --- gated linear
# Forward: one launch of kernels/gated.py's dual-accumulator GEMM (x read once for both products;
# bias, activation and product in the epilogue). Backward: one elementwise launch for dg, du and
# the partial bias sums, fixed-order reductions into dbg / dbu, then linear_act's GEMM for
# dx = dg Wg (+ du Wu, a second GEMM added in place: a dual-operand GEMM would save that M*K
# temporary; not written yet), dWg = dg^T x and dWu = du^T x.
from ..kernels import gated as _gl  # noqa: E402  (kept with its section)


def gated_forward(x: Tensor, wg: Tensor, wu: Tensor, bg: Optional[Tensor], bu: Optional[Tensor],
                  act: Activation, slope: float, save: bool):
    """h = act(x Wg^T + bg) * (x Wu^T + bu): x (M, K), wg / wu (N, K) any strides, biases (N,)
    contiguous or None. saved = (g, u), the biased pre-activations (M, N), when save.
    Cost: 4*M*N*K flops; reads M*K + 2*N*K (+2N), writes M*N (3*M*N when saving)."""
    op = "fastlayers.gated_linear"
    M, K = x.shape
    N = wg.shape[0]
    h = torch.empty((M, N), device=x.device, dtype=x.dtype)
    g = torch.empty_like(h) if save else None
    u = torch.empty_like(h) if save else None
    if M and N:
        if K == 0:  # nothing to load: point the operands at h so no empty tensor is passed
            x, wg, wu = h, h.t(), h.t()
        precision = fp32_matmul_precision() if h.dtype == torch.float32 and h.is_cuda else "ieee"
        kernel = _gl.gated_gemm_kernels[_la.dtype_class(str(h.dtype).rsplit(".", 1)[-1], precision)]
        hi, lo = _split_slope(slope)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _launch(op, h, lambda: kernel[grid](
            x, wg, wu, h, g if save else h, u if save else h,
            bg if bg is not None else h, bu if bu is not None else h,
            M, N, K,
            x.stride(0), x.stride(1), wg.stride(0), wg.stride(1), wu.stride(0), wu.stride(1),
            hi, lo, next_pow2(M), next_pow2(N), next_pow2(K),
            HAS_BG=bg is not None, HAS_BU=bu is not None, ACT=act.code, STORE_GU=save,
            ACC_DTYPE=_compute_dtype(h.dtype), PRECISION=precision,
            DOT_FP32=INTERPRETED and h.dtype == torch.bfloat16))
    return h, ((g, u) if save else None)


def _column_sums(op: str, partial: Tensor, out_dtype: torch.dtype) -> Tensor:
    """out[n] = sum_p partial[p, n] in a fixed order (_sum_rows: linear_act's sum_rows_kernel)."""
    out = torch.empty(partial.shape[1], device=partial.device, dtype=out_dtype)
    _sum_rows(op, partial, out)
    return out


def gated_backward(dh: Tensor, x: Tensor, wg: Tensor, wu: Tensor, saved, act: Activation, slope: float,
                   needs: Tuple[bool, bool, bool, bool, bool]):
    """dg = dh * u * act'(g), du = dh * act(g); dx = dg Wg + du Wu (M, K); dWg = dg^T x,
    dWu = du^T x (N, K); dbg, dbu = column sums (N,). dh: (M, N) contiguous; g, u: the saved
    pre-activations. Cost: 6*M*N*K flops (dx, dWg, dWu); the elementwise pass reads 3*M*N and
    writes 2*M*N."""
    op = "fastlayers.gated_linear (backward)"
    need_dx, need_dwg, need_dwu, need_dbg, need_dbu = needs
    g, u = saved
    dh = dh.contiguous()
    M, N = dh.shape
    K = x.shape[1]
    dg, du = torch.empty_like(dh), torch.empty_like(dh)
    dbg = dbu = None
    if M == 0 or N == 0:  # dg, du are empty
        if need_dbg:
            dbg = torch.zeros(N, device=dh.device, dtype=dh.dtype)
        if need_dbu:
            dbu = torch.zeros(N, device=dh.device, dtype=dh.dtype)
    else:
        compute = torch.float64 if dh.dtype == torch.float64 else torch.float32
        bm = _gl.GRAD_BLOCK_M_FP64 if dh.dtype == torch.float64 else _gl.GRAD_BLOCK_M
        bn = _gl.GRAD_BLOCK_N
        progs, col_blocks, rows_per_prog = _row_slabs(M, N, bm, bn)
        pg = torch.empty((progs, N), device=dh.device, dtype=compute) if need_dbg else dh
        pu = torch.empty((progs, N), device=dh.device, dtype=compute) if need_dbu else dh
        hi, lo = _split_slope(slope)
        _launch(op, dh, lambda: _gl.gated_grad_kernel[(progs, col_blocks)](
            dh, g.contiguous(), u.contiguous(), dg, du, pg, pu, M, N, rows_per_prog, hi, lo,
            ACT=act.code, FROM_OUTPUT=act.saves(slope) == SAVE_OUTPUT, NEED_DBG=need_dbg,
            NEED_DBU=need_dbu, COMPUTE_DTYPE=_compute_dtype(dh.dtype), BLOCK_M=bm, BLOCK_N=bn,
            num_warps=_gl.GRAD_NUM_WARPS))
        if need_dbg:
            dbg = _column_sums(op, pg, dh.dtype)
        if need_dbu:
            dbu = _column_sums(op, pu, dh.dtype)
    # The GEMMs write zeros for an empty reduction (N = 0 for dx, M = 0 for the weights).
    dx = dwg = dwu = None
    if need_dx:
        dx = torch.empty((M, K), device=dh.device, dtype=dh.dtype)
        tmp = torch.empty_like(dx)
        _gemm(op, dg, wg, dx)   # (M, K)
        _gemm(op, du, wu, tmp)
        dx += tmp
    if need_dwg:
        dwg = torch.empty((N, K), device=dh.device, dtype=dh.dtype)
        _gemm(op, dg.t(), x, dwg)  # (N, K)
    if need_dwu:
        dwu = torch.empty((N, K), device=dh.device, dtype=dh.dtype)
        _gemm(op, du.t(), x, dwu)
    return dx, dwg, dwu, dbg, dbu

# --- cross entropy (contract in fastlayers/backends/contract.py; kernels in kernels/cross_entropy.py)
from ..kernels import cross_entropy as _ce  # noqa: E402


def _ce_args(x: Tensor, target: Tensor, weight: Optional[Tensor]):
    probs = target.is_floating_point()
    # unused pointers point at x (never read: the kernels branch on constexpr flags)
    return (x if probs else target), (target if probs else x), (weight if weight is not None else x), probs


def cross_entropy_forward(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                          eps: float) -> Tuple[Tensor, Tensor]:
    """Per-row losses and stats, one program per row. Bytes: N*C*itemsize read (+ q's)."""
    n, nc = x.shape
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss = torch.zeros(n, dtype=cd, device=x.device)
    stats = torch.zeros(n, 3, dtype=cd, device=x.device)
    if n == 0 or nc == 0:
        return loss, stats
    t, q, w, probs = _ce_args(x, target, weight)
    hi, lo = _split_slope(eps)
    _launch("fastlayers.cross_entropy", x, lambda: _ce.ce_fwd_kernel[(n,)](
        x, t, q, w, loss, stats, nc, ignore_index, hi, lo,
        HAS_W=weight is not None, PROBS=probs, SMOOTH=eps > 0,
        COMPUTE_DTYPE=_compute_dtype(x.dtype), BLOCK=_ce.block_for(nc)))
    return loss, stats


def cross_entropy_backward(x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                           scale: Tensor, ignore_index: int, eps: float, out: Tensor, col0: int = 0,
                           classes: Optional[int] = None) -> Tensor:
    """dx = scale_i * dloss_i/dx into out (may be x). Bytes: 2 * N*C*itemsize (+ q's)."""
    n, nc = x.shape
    if out is None:
        out = torch.empty_like(x)
    if n == 0 or nc == 0:
        return out
    t, q, w, probs = _ce_args(x, target, weight)
    hi, lo = _split_slope(eps)
    _launch("fastlayers.cross_entropy (backward)", x, lambda: _ce.ce_bwd_kernel[(n,)](
        x, t, q, w, stats, scale, out, nc, col0, nc if classes is None else classes, ignore_index, hi, lo,
        HAS_W=weight is not None, PROBS=probs, SMOOTH=eps > 0,
        COMPUTE_DTYPE=_compute_dtype(x.dtype), BF16_OUT=out.dtype == torch.bfloat16,
        BLOCK=_ce.block_for(nc)))
    return out


def linear_ce_chunk_grads(dz: Tensor, h: Tensor, w: Tensor, dh: Optional[Tensor], dw: Optional[Tensor],
                          db: Optional[Tensor], accumulate: bool) -> None:
    """dh, dw, db = (or += when accumulate) dz @ w, dz^T @ h, colsum(dz), the GEMMs in Triton:
    straight into dh / dw when written in dz's dtype, else through a temporary of their size."""
    op = "fastlayers.linear_cross_entropy (backward)"
    for out, a, b in ((dh, dz, w), (dw, dz.t(), h)):
        if out is None:
            continue
        if out.dtype == dz.dtype and not accumulate:
            _gemm(op, a, b, out)
        else:
            tmp = torch.empty(out.shape, dtype=dz.dtype, device=dz.device)
            _gemm(op, a, b, tmp)
            out.add_(tmp) if accumulate else out.copy_(tmp)
    if db is not None:
        colsum = dz.sum(0, dtype=torch.float64 if db.dtype == torch.float64 else torch.float32)
        db.add_(colsum) if accumulate else db.copy_(colsum)


# --- norms (kernels/norms.py): RMSNorm / LayerNorm with the residual add
from ..kernels import norms as _nk  # noqa: E402  (kept with its section)

_NORM_KINDS = {"rms": 0, "rms_hf": 1, "layer": 2}
_NORM_ROWS_PER_SM = 4  # backward programs per SM: each sums its rows' dw / db partials


def norm_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float, kind: str, save: bool):
    """(y, s, mean, rstd) for x, residual (M, N) contiguous, weight / bias (N,) contiguous or None.
    One program per row (kernels/norms.py). Bytes: reads (1|2)*M*N, writes (1|2)*M*N + stats."""
    op = "fastlayers.layer_norm" if kind == "layer" else "fastlayers.rms_norm"
    M, N = x.shape
    fp64 = x.dtype == torch.float64
    cd = torch.float64 if fp64 else torch.float32
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(y) if residual is not None else None
    mean = torch.empty(M, device=x.device, dtype=cd) if save and kind == "layer" else None
    rstd = torch.empty(M, device=x.device, dtype=cd) if save else None
    if M and not N:  # mean of an empty row: NaN, as torch
        for t in (mean, rstd):
            if t is not None:
                t.fill_(float("nan"))
    if M and N:
        one, block, warps = _nk.plan(N, fp64)
        _launch(op, y, lambda: _nk.norm_fwd_kernel[(M,)](
            x, x if residual is None else residual, y if s is None else s, x if weight is None else weight,
            x if bias is None else bias, y, rstd if mean is None else mean, y if rstd is None else rstd, N, float(eps),
            HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, KIND=_NORM_KINDS[kind],
            STORE_STATS=save, ONE_BLOCK=one, BLOCK_N=block, COMPUTE_DTYPE=_compute_dtype(x.dtype), num_warps=warps))
    return y, s, mean, rstd


def norm_backward(dy: Tensor, ds: Optional[Tensor], src: Tensor, weight: Optional[Tensor],
                  mean: Optional[Tensor], rstd: Tensor, kind: str, needs):
    """(dx, dw, db): P programs of ceil(M / P) rows each write their dw / db partials (P, N), summed
    in a fixed order by sum_rows_kernel. Bytes: reads (2|3)*M*N, writes M*N + 2*P*N (partials)."""
    op = "fastlayers.layer_norm (backward)" if kind == "layer" else "fastlayers.rms_norm (backward)"
    M, N = src.shape
    need_dx, need_dw, need_db = needs[0], needs[1] and weight is not None, len(needs) > 2 and needs[2]
    dx = torch.empty_like(src, memory_format=torch.contiguous_format) if need_dx else None
    cd = torch.float64 if src.dtype == torch.float64 else torch.float32
    programs = max(1, min(M, _NORM_ROWS_PER_SM * _num_sms(src)))
    rows = triton.cdiv(max(M, 1), programs)
    programs = triton.cdiv(max(M, 1), rows)
    dw_part = torch.zeros((programs, N), device=src.device, dtype=cd) if need_dw else None
    db_part = torch.zeros((programs, N), device=src.device, dtype=cd) if need_db else None
    if M and N and (need_dx or need_dw or need_db):
        one, block, warps = _nk.plan(N, src.dtype == torch.float64)
        _launch(op, src, lambda: _nk.norm_bwd_kernel[(programs,)](
            dy, src if ds is None else ds, src, src if weight is None else weight, rstd if mean is None else mean,
            rstd, src if dx is None else dx, rstd if dw_part is None else dw_part,
            rstd if db_part is None else db_part, M, N, rows,
            HAS_DS=ds is not None, HAS_W=weight is not None, KIND=_NORM_KINDS[kind], NEED_DX=need_dx,
            NEED_DW=need_dw, NEED_DB=need_db, ONE_BLOCK=one, BLOCK_N=block, COMPUTE_DTYPE=_compute_dtype(src.dtype),
            num_warps=warps))
    dw = _column_sums(op, dw_part, src.dtype) if need_dw else None
    db = _column_sums(op, db_part, src.dtype) if need_db else None
    return dx, dw, db


# --- rotary (kernels/rotary.py): q and k in one launch, strided views read and written in place
from ..kernels import rotary as _rk  # noqa: E402  (kept with its section)


def rotary(q: Tensor, k: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor, sin_k: Tensor, out_q: Tensor,
           out_k: Tensor, interleaved: bool, inverse: bool) -> None:
    """out = x * cos + rotate(x) * sin (inverse: x * cos + rotate^T(x * sin)) for x = q, k: 4-D views,
    last dim contiguous; cos_* / sin_* (*x.shape[:3], R) broadcast views. One launch over the rows
    of both. Bytes: reads D + 2R per row (cos / sin from L2 when broadcast), writes D per row."""
    r = cos_q.shape[-1]
    rows_q, rows_k = math.prod(q.shape[:3]), math.prod(k.shape[:3])
    block_rows, block_h, block_p, warps = _rk.plan(r, max(q.shape[3], k.shape[3]), q.dtype == torch.float64)
    progs_q, progs_k = triton.cdiv(rows_q, block_rows), triton.cdiv(rows_k, block_rows)
    if not progs_q + progs_k:
        return

    def strides(*ts):
        return [s for t in ts for s in t.stride()[:3]]

    _launch("fastlayers.rotary", q, lambda: _rk.rotary_kernel[(progs_q + progs_k,)](
        q, out_q, cos_q, sin_q, k, out_k, cos_k, sin_k,
        rows_q, q.shape[1], q.shape[2], *strides(q, out_q, cos_q, sin_q), q.shape[3],
        rows_k, k.shape[1], k.shape[2], *strides(k, out_k, cos_k, sin_k), k.shape[3],
        r, progs_q, INTERLEAVED=bool(interleaved), INVERSE=bool(inverse), BLOCK_ROWS=block_rows, BLOCK_H=block_h,
        BLOCK_P=block_p, COMPUTE_DTYPE=_compute_dtype(q.dtype), num_warps=warps))
