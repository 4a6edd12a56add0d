"""CPU backend: GEMMs through PyTorch's BLAS (MKL / oneDNN), everything around them fused in
fastlayers._C (csrc/): the bias + activation epilogue, the backward's dy * act'(.) with the bias
gradient, and softmax / log_softmax. Inputs arrive validated and laid out per the contract in
fastlayers/backends/contract.py; here we only allocate, call BLAS and call the kernels.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import SAVE_INPUT, SAVE_OUTPUT, Activation

try:
    from .. import _C
except ImportError as e:  # never fall back silently to something slower
    raise ImportError(
        "the C++ extension fastlayers._C is not built; build it with `make build` "
        "(or `python setup.py build_ext --inplace`, or `pip install .`)") from e

NAME = "cpp"
# dtype codes of the extension's buffers (csrc/common.h), checked against _C below.
_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
DTYPES = frozenset(_CODES)


def _check_codes() -> None:
    """The extension's activation and dtype codes must be the Python tables' (one source of
    truth: fastlayers/activations.py and _CODES above); a stale build fails loudly here."""
    from ..activations import ACTIVATIONS
    acts = {name: a.code for name, a in ACTIVATIONS.items()}
    dtypes = {str(d).replace("torch.", ""): c for d, c in _CODES.items()}
    if dict(_C.ACTIVATION_CODES) != acts or dict(_C.DTYPE_CODES) != dtypes:
        raise ImportError(
            "fastlayers._C was built with other activation/dtype codes than this fastlayers "
            f"(extension: {dict(_C.ACTIVATION_CODES)}, {dict(_C.DTYPE_CODES)}; python: {acts}, "
            f"{dtypes}); rebuild it with `make build`")


_check_codes()


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else "the cpp backend runs on CPU tensors only"


def _buf(t: Optional[Tensor]):
    """A tensor as the extension's buffer descriptor (data_ptr, dtype code, shape, strides);
    the extension checks it against what each kernel reads (csrc/bindings.cpp)."""
    return None if t is None else (t.data_ptr(), _CODES[t.dtype], t.shape, t.stride())


# glibc serves allocations from 32 MiB up (its largest mmap threshold) with fresh mmaps, faulted in
# page by page on first write; smaller ones are usually recycled heap memory, where the advice
# measured slower (8 MiB GEMM output: 23 ms advised vs 18 ms plain).
_HUGE_MIN_BYTES = 32 << 20


def _mkl_sgemm_is_generic() -> bool:
    """Whether PyTorch's fp32 mm runs MKL's generic code here: MKL takes its AVX-512 sgemm kernels
    on Intel CPUs only. Measured on this project's AMD EPYC (AVX-512), 2 threads, 2026-12-02:
    torch.mm fp32 30-55 GFLOP/s against oneDNN's 76-106 on the backward's dz @ W and dz^T @ x
    (1024x768x3072, 2048x1024x4096, 256x4096x4096, 8192x256x1024: 1.3-2.9x, except dW at
    8192x256x1024, 0.8-0.9x). On Intel CPUs fp32 GEMMs stay with MKL (not measured here)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return False
    return bool(vendor) and "GenuineIntel" not in vendor


_FP32_MM_ONEDNN = _mkl_sgemm_is_generic()  # fp32 GEMMs from ONEDNN_MIN_MACS up go to oneDNN (see _mm)
# _FP32_ROUTE: where MKL runs its own sgemm (Intel CPUs), the fp32 forward takes the "mkl" route at
# every size (unless a prepacked weight is at hand), fused post-ops included. Measured 2026-12-07 on
# this project's Xeon (AVX-512, AMX), 1 thread, interleaved, MKL route / oneDNN route time:
# linear+tanh (fused) / +gelu (oneDNN + our pass) without grad 0.89 / 0.81 at 256x64->256, 1.00 /
# 0.89 at 256x256->1024, 0.93 / 0.90 at 1024x256->1024, 0.88 / 0.79 at 2048x1024->4096; with grad
# 0.81-1.04 (oneDNN won nowhere by more than 4%).


def _mm(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """a (M, K) @ b (K, N) (+ bias (N,), added in the GEMM) -> (M, N) contiguous, any strides in.
    PyTorch's mm / addmm (MKL sgemm for fp32, oneDNN matmul for 16-bit), a large result in a
    huge-page-backed buffer (see _empty); fp32 GEMMs of ONEDNN_MIN_MACS and more on oneDNN's
    inner product instead where MKL's sgemm is its generic code (_mkl_sgemm_is_generic): the
    backward's dx and dW, the gated GEMMs, and the forward's "mkl" route (linear_ce_chunk_grads
    writes into given buffers with torch.mm / addmm_ directly)."""
    m, n = a.shape[0], b.shape[1]
    if (_FP32_MM_ONEDNN and a.dtype == torch.float32 and ROUTE != "mkl"
            and m * a.shape[1] * n >= ONEDNN_MIN_MACS and not _long_transposed_source(a, n)
            and _probe_onednn(torch.float32)):
        return _linear_pointwise(a, b.t(), bias, "none", [], "")  # b.t(): the (N, K) "weight"
    if m * n * a.element_size() < _HUGE_MIN_BYTES:
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    out = _empty(m, n, dtype=a.dtype)
    return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)


# oneDNN's linear copies a non-contiguous source (the weight gradient's dz^T) into its own layout
# first: a transposing copy of the whole (K, M) operand, which pays off only when the GEMM is long
# in its output width. Measured 2026-12-02 (AMD EPYC, 2 threads, fp32 dW = dz^T @ x, dz (M, N),
# x (M, K)), MKL's mm vs oneDNN, ms: M x K x N = 8192x256x1024 26 vs 47, 8192x512x1024 48 vs 57,
# 4096x256x4096 49 vs 82, 16384x768x768 107 vs 121 (MKL), against 2048x256x1024 7.4 vs 6.1,
# 2048x1024x4096 95 vs 71, 256x4096x4096 74 vs 49, 1024x768x3072 32 vs 21 (oneDNN).
_TRANSPOSED_MAX_LEN = 2048  # reduction length up to which oneDNN takes a transposed source ...
_TRANSPOSED_MIN_N = 1024    # ... or output width from which it does


def _long_transposed_source(a: Tensor, n: int) -> bool:
    """Whether a (M, K) @ (K, n) with a non-contiguous `a` runs faster in MKL than in oneDNN."""
    return not a.is_contiguous() and a.shape[1] > _TRANSPOSED_MAX_LEN and n < _TRANSPOSED_MIN_N


def _empty(*shape: int, dtype: torch.dtype) -> Tensor:
    """A new contiguous CPU tensor. From 32 MiB up it is backed by transparent huge pages where the
    OS allows (madvise): such fresh buffers are otherwise paid for with one page fault per 4 KiB,
    measured as 10 ms of a 76 ms GEMM (2048x1024 @ 1024x4096) and half of a 4096x4096 softmax."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes >= _HUGE_MIN_BYTES:
        _C.advise_hugepages(t.data_ptr(), nbytes)
    return t


# ----------------------------------------------------------------------------- GEMM routes
# Three ways to run the forward GEMM + bias + activation (chosen per call by _forward_route):
#
#   "fused"     oneDNN's inner product with the bias and the activation as post-ops, applied
#               while the GEMM writes its output: one pass, no separate epilogue.
#               torch.ops.mkldnn._linear_pointwise (PyTorch's bundled oneDNN; a private op, so
#               probed once per dtype before first use and never used when missing or wrong).
#   "onednn"    the same oneDNN GEMM with the bias post-op only, then our C++ activation pass: for
#               activations oneDNN has no exact post-op for, and in training when the backward
#               needs the pre-activation z (it is then kept apart from y).
#   "mkl"       PyTorch's mm / addmm (MKL sgemm for fp32, oneDNN matmul for bf16) + the C++
#               bias + activation pass: small GEMMs, dtypes oneDNN lacks (fp64; fp16 on CPUs
#               without fp16 GEMMs), and whenever oneDNN is unavailable.
#
# The rule, measured on the 2-core AVX-512 machine (bf16 via avx512_bf16; no AMX there), torch
# 2.13, 2026-12-01, interleaved rounds, median of per-round ratios vs the "mkl" route, linear+GELU
# forward without grad (the machine was shared: absolute times were 5-10x inflated, ratios held):
#                         bf16: fused / onednn     fp32: fused / onednn
#   2048x1024 -> 4096       1.18x / 1.13x            1.17x / 1.13x
#   8192x256  -> 1024       1.36x / 1.23x            1.42x / 1.33x
#   256x4096  -> 4096       1.29x / 1.17x            1.79x / 1.69x
#   1024x768  -> 3072       1.43x / 1.17x            1.55x / 1.42x
#   32x512    -> 512        1.43x / 1.37x            1.53x / 1.69x
# (oneDNN's AVX-512 GEMM beats MKL's sgemm for fp32 here too, so fp32 goes through oneDNN as well).
# Below ~2^22 multiply-adds oneDNN's per-call cost (primitive cache lookup, OpenMP team wake-up,
# its own output allocation) outweighs the epilogue pass: the "mkl" route, one ATen call + one pass.
# Training, activations that save z (gelu, gelu_tanh, silu): "onednn" (GEMM + bias, then our pass
# writing y and keeping z) beats "fused + recompute z in the backward", which adds a whole GEMM
# (~10x the epilogue's cost) to the backward. Activations that save y (sigmoid, tanh, leaky_relu
# with slope >= 0) or nothing use "fused" in training too: y is what the backward needs.
#
# relu has no post-op here: oneDNN's relu maps NaN to 0, PyTorch's keeps NaN; so does its
# leaky_relu with slope 0 (and +0 where PyTorch's gives -0). Each post-op is probed
# per dtype (_probe_onednn) before first use, special values included, and one that differs from
# PyTorch's is not fused: with torch 2.13, fp32 "gelu" (erf) writes +0 for z <= -8 where
# F.gelu gives -0, so fp32 GELU takes the "onednn" route (GEMM + bias, our pass).
_ONEDNN_POSTOPS = {  # activation name -> (attr, takes negative_slope as its scalar, algorithm)
    "none": ("none", False, ""),
    "leaky_relu": ("leaky_relu", True, ""),
    "gelu": ("gelu", False, "none"),
    "gelu_tanh": ("gelu", False, "tanh"),
    "silu": ("swish", False, ""),
    "sigmoid": ("sigmoid", False, ""),
    "tanh": ("tanh", False, ""),
}
ONEDNN_MIN_MACS = 1 << 22  # M*K*N from which oneDNN routes are used (see above)
# With a prepacked weight (FusedLinear without grad) oneDNN pays from 2^20 multiply-adds when
# K >= 256: no weight reorder per call, and MKL's generic sgemm is slowest on few rows. Measured
# 2026-12-02 on this project's AMD EPYC, fp32 linear+ReLU without grad, F.linear + relu_ vs
# oneDNN on the packed weight (interleaved, median of 5): 1.56x at 1x256->4096, 1.58x at
# 1x1024->1024, 1.22x at 1x4096->256, 2.25x at 4x256->1024, 2.16x at 4x1024->256, 1.07x at
# 16x256->256, 1.18x at 8x512->256; 2.6-13x from 2^22 up (4x1024->4096: 2092 vs 158 us);
# below 2^20 or with K = 64 F.linear won (0.36-0.84x, 0.78x at 16x64->1024).
PACKED_MIN_MACS = 1 << 20
PACKED_MIN_K = 256
# Up to this many output elements, a no-grad forward is PyTorch's own F.linear + activation: the
# C++ pass's fixed cost per call (buffer descriptors, the extension call, ~3 us) is more than a
# tiny output's whole second pass (torch's relu on 64 floats: ~1.3 us). Measured 2026-12-02,
# linear+ReLU without grad, (our GEMM + pass) vs torch's two ops: 0.68x at 1x64->64, 0.56x at
# 8x256->256, 1.23x at 32x512->512 (busy machine, 5 rounds).
TORCH_OPS_MAX_OUT = 1 << 12
# ... and fewer multiply-adds than this (a tiny output can still be a large GEMV: 1x4096->1024 ran
# 2x faster on oneDNN than in F.linear, see PACKED_MIN_MACS).
TORCH_OPS_MAX_MACS = PACKED_MIN_MACS

# Softmax / log_softmax of fewer elements than this, when no backend is forced, is PyTorch's own
# kernel (fastlayers._dispatch.tiny_cpu_softmax): the general path's fixed cost (checks, the
# autograd Function, buffer descriptors, the extension call: ~7.5 us) is more than such a whole op.
# Measured 2026-12-02 (AMD EPYC, 2 threads, fp32 over the last dim), torch.softmax vs fastlayers'
# general path, us: (1, 64) 1.5 vs 9.0; (8, 256) 2.4 vs 9.6; (32, 512) 6.7 vs 12.2; (512, 32) 8.3
# vs 22.7; (1, 32768) 15.5 vs 15.6; at 2^16: (64, 1024) 16.8 vs 17.0, (1, 65536) 29.2 vs 24.1,
# (1024, 64) 21.5 vs 26.6; at 2^17: (128, 1024) 32.3 vs 23.2, (1, 131072) 56.8 vs 39.9.
TORCH_SOFTMAX_MAX_NUMEL = 1 << 16

# Test switch: "auto" (the rule above), or force "fused" / "onednn" / "mkl" wherever that route can
# run (a forced oneDNN route still falls back to "mkl" where oneDNN cannot run the dtype).
ROUTE = "auto"

_onednn_ok: dict = {}  # dtype -> frozenset of activation names oneDNN gets right, by _probe_onednn

# Probe inputs: pre-activations where activations are easy to get wrong (signs of zero, NaN,
# +-inf, under/overflow), next to ordinary values. Accepted at +-inf: PyTorch's value or the
# mathematical limit (PyTorch's own values there are IEEE artefacts of its formulas).
_PROBE_Z = [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 8.0, -8.0, 13.0, -13.0,
            20.0, -20.0, 88.0, -88.0, 100.0, -100.0, 1e20, -1e20, 3e38, -3e38, float("nan")]
_LIMITS = {"none": (float("inf"), float("-inf")), "leaky_relu": (float("inf"), float("-inf")),
           "gelu": (float("inf"), 0.0), "gelu_tanh": (float("inf"), 0.0), "silu": (float("inf"), 0.0),
           "sigmoid": (1.0, 0.0), "tanh": (1.0, -1.0)}


def _linear_pointwise(x: Tensor, w, b: Optional[Tensor], attr: str, scalars: list, algorithm: str) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, scalars, algorithm)


def _probe_matches(y: Tensor, ref: Tensor, tol: float) -> bool:
    """y (oneDNN) vs ref (PyTorch, same dtype): same NaNs, same signs of zero, values within tol
    (absolute 1e-30 for results PyTorch keeps as tiny non-zeros)."""
    y, ref = y.double(), ref.double()
    if not torch.equal(y.isnan(), ref.isnan()):
        return False
    zero = ref == 0
    if not torch.equal(torch.signbit(y[zero]), torch.signbit(ref[zero])) or (y[zero] != 0).any():
        return False
    ok = ~ref.isnan()
    return bool(torch.isclose(y[ok], ref[ok], rtol=tol, atol=1e-30).all())


def _probe_onednn(dtype: torch.dtype) -> frozenset:
    """The activations (keys of _ONEDNN_POSTOPS) that oneDNN's fused linear in this torch gets
    exactly right for `dtype` -- the values at special points above, and a small random case with
    a bias -- checked against PyTorch's own ops. Empty when the op is missing or fails for the
    dtype, or "none" (the plain GEMM + bias) is wrong. Once per dtype per process, outside the
    caller's autocast and autograd (a first call under autocast must probe the dtype it names)."""
    ok = _onednn_ok.get(dtype)
    if ok is not None:
        return ok
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        ok = _probe_uncached(dtype)
    _onednn_ok[dtype] = ok
    return ok


def _probe_uncached(dtype: torch.dtype) -> frozenset:
    good = set()
    if dtype in (torch.float32, torch.bfloat16, torch.float16) and torch.backends.mkldnn.is_available():
        refs = {"none": lambda z, s: z, "leaky_relu": lambda z, s: F.leaky_relu(z, s),
                "gelu": lambda z, s: F.gelu(z), "gelu_tanh": lambda z, s: F.gelu(z, approximate="tanh"),
                "silu": lambda z, s: F.silu(z), "sigmoid": lambda z, s: torch.sigmoid(z),
                "tanh": lambda z, s: torch.tanh(z)}
        # x (S, 16) with the probe values in column 0, w (37, 16) with ones in column 0:
        # z = x @ w.T is each probe value across 37 columns (vectorised main part and tail), and
        # (S, 1) @ (1, 1) (oneDNN's kernels differ by shape: fp32 gelu's signs of zero differed
        # only in the second). The sign of a zero z is the GEMM's (+0 for -0 + 0), so the
        # reference runs on PyTorch's own GEMM.
        special = torch.zeros(len(_PROBE_Z), 16, dtype=dtype)
        special[:, 0] = torch.tensor(_PROBE_Z, dtype=dtype)
        picker = torch.zeros(37, 16, dtype=dtype)
        picker[:, 0] = 1
        cases = [(special, picker), (special[:, :1].contiguous(), picker[:1, :1].contiguous())]
        inf = torch.tensor([[float("inf")], [float("-inf")]], dtype=dtype)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(37, 19, generator=g).to(dtype)
        w = (torch.randn(23, 19, generator=g) / 4).to(dtype)
        b = torch.randn(23, generator=g).to(dtype)
        z = F.linear(x.float(), w.float(), b.float())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for name, (attr, scalar, alg) in _ONEDNN_POSTOPS.items():
            for slope in ([0.01, -0.2] if scalar else [0.0]):  # (slope 0 is never fused: below)
                scalars = [slope] if scalar else []
                try:
                    ys = [_linear_pointwise(a, p, None, attr, scalars, alg) for a, p in cases]
                    yi = _linear_pointwise(inf, torch.ones(1, 1, dtype=dtype), None, attr, scalars, alg)
                    yr = _linear_pointwise(x, w, b, attr, scalars, alg)
                except Exception:  # a torch without the op, or oneDNN without this dtype
                    break
                ref_s = [refs[name](F.linear(a, p), slope) for a, p in cases]
                ref_i = refs[name](inf, slope).flatten().tolist()
                limits = _LIMITS[name] if slope >= 0 else (float("inf"), float("inf"))
                if (yr.dtype != dtype or yr.shape != z.shape
                        or not all(y.dtype == dtype and _probe_matches(y, r, tol) for y, r in zip(ys, ref_s))
                        or not torch.allclose(yr.float(), refs[name](z, slope), rtol=tol, atol=tol)
                        or not all(v in (r, lim) or (v != v and r != r)
                                   for v, r, lim in zip(yi.flatten().tolist(), ref_i, limits))):
                    break
            else:
                good.add(name)
    return frozenset(good) if "none" in good else frozenset()


def onednn_pays(m: int, k: int, n: int, packed: bool = False) -> bool:
    """Whether an (M, K) x (N, K)^T GEMM is large enough for oneDNN's per-call cost to pay
    (packed: on a prepacked weight; see ONEDNN_MIN_MACS and PACKED_MIN_MACS)."""
    macs = m * k * n
    return macs >= ONEDNN_MIN_MACS or (packed and macs >= PACKED_MIN_MACS and k >= PACKED_MIN_K)


def _mkl_sgemm_wins(dtype: torch.dtype, packed: bool) -> bool:
    """fp32 on a CPU where MKL runs its own sgemm (Intel), without a prepacked weight: MKL beats
    oneDNN's routes, fused or not (see _FP32_ROUTE)."""
    return dtype == torch.float32 and not _FP32_MM_ONEDNN and not packed


def _forward_route(x: Tensor, w: Tensor, act: Activation, slope: float, packed: bool = False) -> str:
    """"fused", "onednn" or "mkl" for this call (packed: the caller has a prepacked weight for the
    oneDNN routes). Not "fused" for an activation whose backward needs the pre-activation z, with
    or without grad: oneDNN's post-op rounds once where GEMM + pass round twice, and a no-grad
    call must give the bits of the same call with grad (which needs z apart from y)."""
    route = ROUTE
    if route == "mkl":
        return "mkl"
    m, k = x.shape
    n = w.shape[0]
    if m == 0 or k == 0 or n == 0 or (route == "auto" and not onednn_pays(m, k, n, packed)):
        return "mkl"
    if route == "auto" and _mkl_sgemm_wins(x.dtype, packed):
        return "mkl"
    exact = _probe_onednn(x.dtype)
    if not exact:
        return "mkl"
    if (act.name in exact and act.saves(slope) != SAVE_INPUT and route != "onednn"
            and not (slope == 0 and act.name == "leaky_relu")):  # oneDNN's slope 0 is its relu
        return "fused"
    return "onednn"


def plain_linear_gain(m: int, k: int, n: int, dtype: torch.dtype, packed: bool = False) -> bool:
    """Whether a linear with no activation, (M, K) x (N, K)^T, runs faster here than F.linear:
    only where the oneDNN routes apply (oneDNN's GEMM, prepacked without grad when `packed`,
    against F.linear's MKL sgemm / per-call weight reorder); below that there is nothing to fuse
    and F.linear is one ATen call."""
    if _mkl_sgemm_wins(dtype, packed):
        return False
    return ROUTE != "mkl" and onednn_pays(m, k, n, packed) and bool(_probe_onednn(dtype))


def linear_act_forward(x: Tensor, w: Tensor, b: Optional[Tensor], act: Activation, slope: float,
                       save: bool) -> Tuple[Tensor, Optional[Tensor]]:
    # x: (M, K), w: (N, K) -> z: (M, N).
    # Every choice below depends on the shapes, dtype and activation only, never on `save`: a
    # forward with grad and one without take the same route and the same pass, so they give the
    # same bits (an evaluation and a training step of one model agree).
    kind = act.saves(slope) if save else None
    m, n = x.shape[0], w.shape[0]
    if ROUTE == "auto" and m * n <= TORCH_OPS_MAX_OUT and m * x.shape[1] * n < TORCH_OPS_MAX_MACS:
        # Tiny: PyTorch's own F.linear + activation, as the no-grad gate (_dispatch.tiny_cpu_linear).
        z = F.linear(x, w, b)
        if kind == SAVE_INPUT:
            return act.ref(z, slope), z
        y = act.ref_(z, slope)
        return y, (y if kind == SAVE_OUTPUT else None)
    route = _forward_route(x, w, act, slope)
    if route == "fused":
        attr, scalar, alg = _ONEDNN_POSTOPS[act.name]
        y = _linear_pointwise(x, w, b, attr, [slope] if scalar else [], alg)  # (M, N) contiguous
        return y, (y if kind == SAVE_OUTPUT else None)
    if route == "onednn":
        z, bias = _linear_pointwise(x, w, b, "none", [], ""), None  # bias added in the GEMM
    else:
        z, bias = _mm_bias(x, w, b)
    return _epilogue(z, bias, act, slope, kind)


def _mm_bias(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """The "mkl" route's GEMM: (z, the bias still to add in the epilogue or None)."""
    if b is not None and x.dtype in (torch.bfloat16, torch.float16):
        # Low precision: add the bias inside the GEMM's fp32 accumulator, like F.linear, so z is
        # rounded once; the epilogue then only applies the activation.
        return _mm(x, w.t(), b), None  # BLAS takes the transposed view of w without a copy
    return _mm(x, w.t()), b  # bias joins the activation in one pass over z


# Activations whose forward pass runs faster in PyTorch's own kernel than in ours, by dtype: used
# where the pass has nothing else to fuse (the bias already in the GEMM, z kept for the backward).
# Measured 2026-12-02 (AMD EPYC, 2 threads, 8192 x 1024, into an existing output): bf16 GELU (erf)
# 1.2-1.35 ms in ATen vs 2.5-2.9 ms here (our relative-accurate Phi costs ~30 vector ops, and
# rounding to bf16 without avx512_bf16's denormal-flushing convert ~8 more); every other
# activation and dtype measured as fast or faster here (bf16 gelu_tanh 1.9 vs 6.2 ms, silu 1.5 vs 1.8).
_ATEN_PASS = {torch.bfloat16: frozenset({"gelu"})}


def _epilogue(z: Tensor, bias: Optional[Tensor], act: Activation, slope: float,
              kind: Optional[str]) -> Tuple[Tensor, Optional[Tensor]]:
    """y = act(z + bias) by the C++ pass; z (M, N) contiguous, ours to overwrite unless kept."""
    m, n = z.shape
    if act.name == "none" and bias is None:
        return z, None
    if bias is None and act.name in _ATEN_PASS.get(z.dtype, ()):
        # PyTorch's own kernel measured faster: see _ATEN_PASS (with or without grad: same bits)
        if kind == SAVE_INPUT:
            return act.ref(z, slope), z
        y = act.ref_(z, slope)
        return y, (y if kind == SAVE_OUTPUT else None)
    if kind == SAVE_INPUT:
        y = _empty(m, n, dtype=z.dtype)  # z (+ bias) is kept for the backward, y is new
        _C.bias_act_forward(_buf(z), _buf(bias), _buf(y), act.code, slope, torch.get_num_threads())
        return y, z
    zb = _buf(z)
    _C.bias_act_forward(zb, _buf(bias), zb, act.code, slope, torch.get_num_threads())  # in place
    return z, (z if kind == SAVE_OUTPUT else None)


def linear_act_backward(dy: Tensor, x: Optional[Tensor], w: Optional[Tensor], saved: Optional[Tensor],
                        act: Activation, slope: float, needs: Tuple[bool, bool, bool]):
    # dy, saved: (M, N) contiguous; x: (M, K); w: (N, K)
    need_dx, need_dw, need_db = needs
    m, n = dy.shape
    db = torch.empty(n, dtype=dy.dtype) if need_db else None
    if act.name == "none":
        dz = dy
        if need_db:
            _C.act_grad(_buf(dy), None, None, _buf(db), act.code, slope, torch.get_num_threads())
    else:
        dz = _empty(m, n, dtype=dy.dtype)
        _C.act_grad(_buf(dy), _buf(saved.contiguous()), _buf(dz), _buf(db), act.code, slope, torch.get_num_threads())
    dx = _mm(dz, w) if need_dx else None        # (M, K)
    dw = _mm(dz.t(), x) if need_dw else None    # (N, K)
    return dx, dw, db


def softmax_forward(x: Tensor, log: bool) -> Tensor:
    outer, length, inner = x.shape
    y = _empty(outer, length, inner, dtype=x.dtype)
    _C.softmax_forward(_buf(x), _buf(y), log, torch.get_num_threads())
    return y


def softmax_backward(dy: Tensor, y: Tensor, log: bool) -> Tensor:
    outer, length, inner = y.shape
    dx = _empty(outer, length, inner, dtype=y.dtype)
    _C.softmax_backward(_buf(dy), _buf(y), _buf(dx), log, torch.get_num_threads())
    return dx


# ----------------------------------------------------------------------------- prepacked weights
# Inference only (FusedLinear keeps the packed copy and decides when it may be used). oneDNN's
# blocked weight layout, reordered once instead of inside every call; measured against the same
# oneDNN call on the plain weight, linear+GELU without grad: bf16 1.01-1.19x, fp32 0.99-1.07x on
# the shapes of the table above (largest gain at M=8192, K=256). MKL's packed sgemm
# (torch.ops.mkl._mkl_linear) measured slower than oneDNN on every fp32 shape (0.91-1.05x of
# the "mkl" route vs 1.14-1.79x), so it is not used.
def prepack_weight(w: Tensor, batch_hint: int) -> Optional[Tensor]:
    """w (N, K) in oneDNN's blocked layout for linear_act_forward_packed (N*K elements of w's
    dtype, an opaque mkldnn tensor), or None where this backend has no packed path for w."""
    if ROUTE == "mkl" or w.numel() == 0 or not _probe_onednn(w.dtype):  # (empty set: no oneDNN)
        return None
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), max(int(batch_hint), 1))


def linear_act_forward_packed(x: Tensor, w: Tensor, b: Optional[Tensor], act: Activation, slope: float,
                              packed: Callable[[ModuleType, Tensor, int], Optional[Tensor]]) -> Tensor:
    """linear_act_forward(x, w, b, act, slope, save=False)[0] for FusedLinear's no-grad fast path:
    one route decision, nothing for autograd. x: (M, K) -> y: (M, N). packed(backend, w, M): w's
    prepacked copy (from prepack_weight, cached by the caller) or None; asked only where a packed
    weight would pay (onednn_pays(packed=True)), so small calls pay nothing for it."""
    m, k = x.shape
    n = w.shape[0]
    if b is not None and not b.is_contiguous():
        b = b.contiguous()
    if ROUTE == "auto" and not onednn_pays(m, k, n, packed=True):  # small: nothing packed to use
        return linear_act_forward(x, w, b, act, slope, False)[0]
    wp = packed(_SELF, w, m) if ROUTE != "mkl" else None
    route = _forward_route(x, w, act, slope, packed=wp is not None)
    if route == "mkl":
        return _epilogue(*_mm_bias(x, w, b), act, slope, None)[0]
    if wp is None:
        wp = w
    if route == "fused":
        attr, scalar, alg = _ONEDNN_POSTOPS[act.name]
        return _linear_pointwise(x, wp, b, attr, [slope] if scalar else [], alg)
    z = _linear_pointwise(x, wp, b, "none", [], "")
    return _epilogue(z, None, act, slope, None)[0]


_SELF = sys.modules[__name__]  # this backend, as the packed-weight cache keys it


# --- gated linear
# h = act(x Wg^T + bg) * (x Wu^T + bu): the GEMMs in PyTorch's BLAS, then one fused C++ pass for the
# biases, the activation and the product. Backward: one fused pass for dg, du and both bias
# gradients, then the GEMMs dx = dg Wg + du Wu, dWg = dg^T x, dWu = du^T x.
# When Wu lies right after Wg in memory (FusedGatedMLP allocates them so), [Wg; Wu] is one (2N, K)
# operand without a copy: one GEMM gives gu = [g | u] (M, 2N), the backward pass writes
# dgu = [dg | du], and dx = dgu [Wg; Wu] and [dWg; dWu] = dgu^T x are one GEMM each (measured 10-17%
# faster than two in fp32 at 512 x 1024 -> 2 x 2752, 2026-12-01). Otherwise: two GEMMs each (a copy
# of the weights per call would cost more than it saves), dx accumulated by addmm.
def _stacked(wg: Tensor, wu: Tensor) -> Optional[Tensor]:
    """[wg; wu] as a (2N, K) view when wu starts where wg ends in one row-major buffer, else None."""
    n, k = wg.shape
    if (n == 0 or k == 0 or not wg.is_contiguous() or not wu.is_contiguous()
            or wu.data_ptr() != wg.data_ptr() + wg.numel() * wg.element_size()
            or wu.untyped_storage().data_ptr() != wg.untyped_storage().data_ptr()):
        return None
    return wg.as_strided((2 * n, k), (k, 1))


def _halves(g: Tensor, u: Tensor) -> Optional[Tensor]:
    """gu = [g | u] (M, 2N) when g and u are the two column halves of one contiguous buffer."""
    m, n = g.shape
    if (m == 0 or n == 0 or g.stride() != (2 * n, 1) or u.stride() != (2 * n, 1)
            or u.data_ptr() != g.data_ptr() + n * g.element_size()
            or u.untyped_storage().data_ptr() != g.untyped_storage().data_ptr()):
        return None
    return g.as_strided((m, 2 * n), (2 * n, 1))


def gated_forward(x: Tensor, wg: Tensor, wu: Tensor, bg: Optional[Tensor], bu: Optional[Tensor],
                  act: Activation, slope: float, save: bool):
    # x: (M, K), wg / wu: (N, K) -> h: (M, N); saved = (g, u), the biased pre-activations (M, N).
    low = x.dtype in (torch.bfloat16, torch.float16)
    nthreads = torch.get_num_threads()
    w2 = _stacked(wg, wu)
    if w2 is not None:
        m, n = x.shape[0], wg.shape[0]
        if low and (bg is not None or bu is not None):  # biases in the GEMM's accumulator, as F.linear
            b2 = torch.cat([bg if bg is not None else wg.new_zeros(n), bu if bu is not None else wu.new_zeros(n)])
            gu, bg, bu = _mm(x, w2.t(), b2), None, None
        else:
            gu = _mm(x, w2.t())  # (M, 2N) = [g | u]
        h = _empty(m, n, dtype=x.dtype)
        _C.gated_forward_paired(_buf(gu), _buf(bg), _buf(bu), _buf(h), act.code, slope, save, nthreads)
        return h, ((gu[:, :n], gu[:, n:]) if save else None)
    if low:
        # Low precision: the bias joins the GEMM's fp32 accumulator, as in F.linear (one rounding).
        g, u, bg, bu = _mm(x, wg.t(), bg), _mm(x, wu.t(), bu), None, None
    else:
        g, u = _mm(x, wg.t()), _mm(x, wu.t())  # biases join the elementwise pass
    m, n = g.shape
    h = _empty(m, n, dtype=g.dtype) if save else g  # in place over g when nothing is saved
    gb = _buf(g)
    _C.gated_forward(gb, _buf(bg), _buf(u), _buf(bu), _buf(h) if save else gb, act.code, slope, save, nthreads)
    return h, ((g, u) if save else None)


def gated_backward(dh: Tensor, x: Tensor, wg: Tensor, wu: Tensor, saved: Tuple[Tensor, Tensor],
                   act: Activation, slope: float, needs: Tuple[bool, bool, bool, bool, bool]):
    # dh: (M, N) contiguous; g, u: (M, N); x: (M, K); wg, wu: (N, K). needs: (dx, dwg, dwu, dbg, dbu).
    need_dx, need_dwg, need_dwu, need_dbg, need_dbu = needs
    g, u = saved
    m, n = dh.shape
    dbg = torch.empty(n, dtype=dh.dtype) if need_dbg else None
    dbu = torch.empty(n, dtype=dh.dtype) if need_dbu else None
    from_output = act.saves(slope) == SAVE_OUTPUT
    nthreads = torch.get_num_threads()
    gu, w2 = _halves(g, u), _stacked(wg, wu)
    if gu is not None and w2 is not None:
        dgu = _empty(m, 2 * n, dtype=dh.dtype)  # [dg | du]
        _C.gated_backward_paired(_buf(dh), _buf(gu), _buf(dgu), _buf(dbg), _buf(dbu), act.code, slope,
                                 from_output, nthreads)
        dx = _mm(dgu, w2) if need_dx else None  # (M, K): dg Wg + du Wu in one GEMM
        dwg = dwu = None
        if need_dwg and need_dwu:
            dw2 = _mm(dgu.t(), x)               # (2N, K) = [dWg; dWu]
            dwg, dwu = dw2[:n], dw2[n:]
        elif need_dwg or need_dwu:
            half = dgu[:, :n] if need_dwg else dgu[:, n:]
            dw = _mm(half.t(), x)
            dwg, dwu = (dw, None) if need_dwg else (None, dw)
        return dx, dwg, dwu, dbg, dbu
    g, u = g.contiguous(), u.contiguous()
    dg, du = _empty(m, n, dtype=dh.dtype), _empty(m, n, dtype=dh.dtype)
    _C.gated_backward(_buf(dh), _buf(g), _buf(u), _buf(dg), _buf(du), _buf(dbg), _buf(dbu), act.code, slope,
                      from_output, nthreads)
    dx = None
    if need_dx:
        dx = _mm(dg, wg)       # (M, K)
        dx.addmm_(du, wu)      # += du @ Wu, accumulated in the GEMM
    dwg = _mm(dg.t(), x) if need_dwg else None  # (N, K)
    dwu = _mm(du.t(), x) if need_dwu else None  # (N, K)
    return dx, dwg, dwu, dbg, dbu

# --- cross entropy (contract in fastlayers/backends/contract.py; kernels in csrc/loss.cpp)
_I64_CODE = _C.INT64_CODE  # the extension's buffer code for int64 class-index targets


def _ce_targets(target: Tensor):
    """(class-index buffer, probabilities buffer): exactly one is given."""
    if target.is_floating_point():
        return None, _buf(target)
    return (target.data_ptr(), _I64_CODE, target.shape, target.stride()), None


def cross_entropy_forward(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                          eps: float) -> Tuple[Tensor, Tensor]:
    n, nc = x.shape
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    if n == 0 or nc == 0:  # no rows, or rows without classes (all ignored: checked before)
        return torch.zeros(n, dtype=cd), torch.zeros(n, 3, dtype=cd)
    loss = torch.empty(n, dtype=cd)
    stats = torch.empty(n, 3, dtype=cd)
    t, q = _ce_targets(target)
    _C.cross_entropy_forward(_buf(x), t, q, _buf(weight), _buf(loss), _buf(stats), ignore_index, eps,
                             torch.get_num_threads())
    return loss, stats


def cross_entropy_backward(x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                           scale: Tensor, ignore_index: int, eps: float, out: Optional[Tensor], col0: int = 0,
                           classes: Optional[int] = None) -> Tensor:
    n, nc = x.shape
    if out is None:
        out = _empty(n, nc, dtype=x.dtype)
    if n == 0 or nc == 0:
        return out
    t, q = _ce_targets(target)
    _C.cross_entropy_backward(_buf(x), t, q, _buf(weight), _buf(stats), _buf(scale), _buf(out), ignore_index,
                              eps, col0, nc if classes is None else classes, torch.get_num_threads())
    return out


def linear_ce_chunk_grads(dz: Tensor, h: Tensor, w: Tensor, dh: Optional[Tensor], dw: Optional[Tensor],
                          db: Optional[Tensor], accumulate: bool) -> None:
    """dh, dw, db = (or += when accumulate) dz @ w, dz^T @ h, colsum(dz): PyTorch's BLAS straight into
    the given buffers where the dtypes agree (mm out= / addmm_: no temporary of their size)."""
    for out, a, b in ((dh, dz, w), (dw, dz.t(), h)):
        if out is None:
            continue
        if out.dtype != dz.dtype:  # an fp32 accumulator of 16-bit products
            prod = torch.mm(a, b)
            out.add_(prod) if accumulate else out.copy_(prod)
        elif accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    if db is not None:
        colsum = dz.sum(0, dtype=torch.float64 if db.dtype == torch.float64 else torch.float32)
        db.add_(colsum) if accumulate else db.copy_(colsum)


# ----------------------------------------------------------------------------- norms
# RMSNorm / LayerNorm with the residual add (csrc/norms.cpp: one pass per row each way, threads own
# whole rows, weight / bias gradients as per-thread fp64 partial sums added in thread order).
_NORM_KINDS = {"rms": 0, "rms_hf": 1, "layer": 2}


def norm_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float, kind: str, save: bool):
    """x, residual: (M, N) contiguous; weight, bias (N,) contiguous or None -> (y, s, mean, rstd):
    y (M, N); s = x + residual (None without residual); mean ("layer") and rstd (M,) in fp32 (fp64
    for fp64) when save, else None. Bytes: reads (1|2)*M*N, writes (1|2)*M*N (+ 8M)."""
    m, n = x.shape
    y = _empty(m, n, dtype=x.dtype)
    s = _empty(m, n, dtype=x.dtype) if residual is not None else None
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = torch.empty(m, dtype=cd) if save and kind == "layer" else None
    rstd = torch.empty(m, dtype=cd) if save else None
    _C.norm_forward(_buf(x), _buf(residual), _buf(s), _buf(weight), _buf(bias), _buf(y), _buf(mean),
                    _buf(rstd), _NORM_KINDS[kind], float(eps), torch.get_num_threads())
    return y, s, mean, rstd


def norm_backward(dy: Tensor, ds: Optional[Tensor], src: Tensor, weight: Optional[Tensor],
                  mean: Optional[Tensor], rstd: Tensor, kind: str, needs):
    """(dx, dw, db): dy, ds (or None), src (M, N) contiguous; needs = (dx, dw, db).
    Bytes: reads (2|3)*M*N, writes M*N."""
    m, n = src.shape
    dx = _empty(m, n, dtype=src.dtype) if needs[0] else None
    dw = torch.empty(n, dtype=src.dtype) if needs[1] and weight is not None else None
    db = torch.empty(n, dtype=src.dtype) if len(needs) > 2 and needs[2] else None
    if dx is None and dw is None and db is None:
        return None, None, None
    _C.norm_backward(_buf(dy), _buf(ds), _buf(src), _buf(weight), _buf(mean), _buf(rstd), _buf(dx), _buf(dw),
                     _buf(db), _NORM_KINDS[kind], torch.get_num_threads())
    return dx, dw, db


# ----------------------------------------------------------------------------- bare activation
# (fastlayers.ops.activation: an activation module on its own, e.g. Hugging Face's GELU classes)
def act_forward(z: Tensor, act: Activation, slope: float) -> Tensor:
    """y = act(z): z (M, N) contiguous, only read; y new (M, N) contiguous. One pass per row on
    the threads' own rows: reads and writes M*N elements (bf16 GELU: ATen's pass, see _ATEN_PASS)."""
    if act.name == "none":
        return z.clone()
    y, _ = _epilogue(z, None, act, slope, SAVE_INPUT)  # SAVE_INPUT: y is a new buffer, z stays as it is
    return y


def act_grad(dy: Tensor, saved: Tensor, act: Activation, slope: float) -> Tensor:
    """dz = dy * act'(z): dy, saved (M, N) contiguous, saved = y where act.saves(slope) == "output",
    else z. One pass: reads 2*M*N, writes M*N elements."""
    if act.name == "none":
        return dy
    dz = _empty(*dy.shape, dtype=dy.dtype)
    _C.act_grad(_buf(dy), _buf(saved), _buf(dz), None, act.code, slope, torch.get_num_threads())
    return dz


# ----------------------------------------------------------------------------- rotary
# Rotary position embeddings (csrc/rotary.cpp): q's and k's rows in one parallel pass, strided
# (B, H, S, D)-style views read and written in place of copies.
def rotary(q: Tensor, k: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor, sin_k: Tensor, out_q: Tensor,
           out_k: Tensor, interleaved: bool, inverse: bool) -> None:
    """out = x * cos + rotate(x) * sin (inverse: x * cos + rotate^T(x * sin)) for x = q, k.
    q, k, out_q, out_k: 4-D, last dim contiguous, any other strides; cos_* / sin_*: (*x.shape[:3], R)
    broadcast views (last dim contiguous). Bytes: reads (Dq + Dk) per row + the cos / sin rows
    (cached across heads), writes the same D per row."""
    _C.rotary(_buf(q), _buf(k), _buf(cos_q), _buf(sin_q), _buf(cos_k), _buf(sin_k), _buf(out_q), _buf(out_k),
              bool(interleaved), bool(inverse), torch.get_num_threads())

# ----------------------------------------------------------------------------- attention-score softmax
# csrc/attention_softmax.cpp: one pass per row each way, rows handed to threads in blocks of 16
# round robin (causal rows differ in cost), the mask read through its strides.
_ATTN_BOOL_CODE = _C.ATTN_BOOL_CODE


def _mask_buf(mask: Optional[Tensor]):
    """A (B, H, L, S) strided mask view as a buffer descriptor (strides may be 0), or None."""
    if mask is None:
        return None
    code = _ATTN_BOOL_CODE if mask.dtype == torch.bool else _CODES[mask.dtype]
    return (mask.data_ptr(), code, mask.shape, mask.stride())


def attention_softmax_forward(x: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                              out_dtype: torch.dtype) -> Tensor:
    """x: (B, H, L, S) contiguous; mask None or a (B, H, L, S) strided view (bool or x's dtype) -> y
    (B, H, L, S) of out_dtype (x's, or float32 for 16-bit x). Bytes: reads x (about half with causal)
    and the mask, writes y."""
    y = _empty(*x.shape, dtype=out_dtype)
    _C.attention_softmax_forward(_buf(x), _mask_buf(mask), _buf(y), float(scale), bool(causal),
                                 torch.get_num_threads())
    return y


def attention_softmax_backward(dy: Tensor, y: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                               in_dtype: torch.dtype) -> Tensor:
    """dy, y: (B, H, L, S) contiguous (the probabilities' dtype); mask: as the forward's (only a bool
    one is read) -> dscores (B, H, L, S) in in_dtype. Bytes: reads dy, y; writes dscores."""
    dx = _empty(*y.shape, dtype=in_dtype)
    bmask = mask if mask is not None and mask.dtype == torch.bool else None
    _C.attention_softmax_backward(_buf(dy), _buf(y), _mask_buf(bmask), _buf(dx), float(scale), bool(causal),
                                  torch.get_num_threads())
    return dx
