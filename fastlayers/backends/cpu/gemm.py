"""The CPU backend's GEMMs and the linear + bias + activation op around them: PyTorch's BLAS (MKL
sgemm, oneDNN matmul) or oneDNN's inner product with the bias and activation as post-ops, the
choice of route per call, prepacked weights, and the tunables that steer all of it.

Every tunable below is defined and read here only (tests patch them on this module; the package
forwards reads and writes of the public ones, see __init__.py). Their measurements:
bench/results/cpu-routes.md.

Three ways to run the forward GEMM + bias + activation (chosen per call by _forward_route):

  "fused"     oneDNN's inner product with the bias and the activation as post-ops, applied while
              the GEMM writes its output: one pass, no separate epilogue.
              torch.ops.mkldnn._linear_pointwise (PyTorch's bundled oneDNN; a private op, so probed
              once per dtype before first use (postops.py) and never used when missing or wrong).
  "onednn"    the same oneDNN GEMM with the bias post-op only, then our C++ activation pass: for
              activations oneDNN has no exact post-op for, and in training when the backward needs
              the pre-activation z (it is then kept apart from y).
  "mkl"       PyTorch's mm / addmm (MKL sgemm for fp32, oneDNN matmul for bf16) + the C++ bias +
              activation pass: small GEMMs, dtypes oneDNN lacks (fp64; fp16 on CPUs without fp16
              GEMMs), and whenever oneDNN is unavailable.

The rule: oneDNN's routes from ONEDNN_MIN_MACS multiply-adds up (below, its per-call cost -- primitive
cache lookup, OpenMP team wake-up, its own output allocation -- outweighs the epilogue pass), fp32
included where MKL's sgemm is its generic code (_FP32_MM_ONEDNN); on Intel CPUs fp32 stays on MKL.
Training, activations that save z (gelu, gelu_tanh, silu): "onednn" (GEMM + bias, then our pass
writing y and keeping z), never "fused + recompute z in the backward", which adds a whole GEMM to the
backward. Activations that save y (sigmoid, tanh, leaky_relu with slope >= 0) or nothing use "fused"
in training too: y is what the backward needs.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...activations import ACTIVATIONS, SAVE_INPUT, SAVE_OUTPUT, Activation
from .. import forced
from ._ext import _C, _buf, _empty, _HUGE_MIN_BYTES
from .activation import _epilogue
from .postops import ONEDNN_POSTOPS, exact_postops


def _mkl_sgemm_is_generic() -> bool:
    """Whether PyTorch's fp32 mm runs MKL's generic code here: MKL takes its AVX-512 sgemm kernels
    on Intel CPUs only, and oneDNN's fp32 GEMMs measured faster on AMD (see
    bench/results/cpu-routes.md)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return False
    return bool(vendor) and "GenuineIntel" not in vendor


NONE_ACT = ACTIVATIONS["none"]

# ----------------------------------------------------------------------------- tunables
# Each: the rule in one line; the measurements behind the value in bench/results/cpu-routes.md.
_FP32_MM_ONEDNN = _mkl_sgemm_is_generic()  # fp32 on oneDNN from ONEDNN_MIN_MACS up; False: MKL (Intel)
ONEDNN_MIN_MACS = 1 << 22  # M*K*N from which the oneDNN routes are used
PACKED_MIN_MACS = 1 << 20  # M*K*N from which oneDNN on a prepacked weight (no grad) is used, ...
PACKED_MIN_K = 256         # ... when K is at least this
TORCH_OPS_MAX_OUT = 1 << 12  # up to M*N outputs, the forward is PyTorch's F.linear + activation, ...
TORCH_OPS_MAX_MACS = PACKED_MIN_MACS  # ... when M*K*N is below this (a tiny output can be a large GEMV)
FUSED_MIN_MACS = 1 << 30  # a linear (+ activation) is ours from M*K*N up; below, PyTorch's ops (not prepacked)
_TRANSPOSED_MAX_LEN = 2048  # oneDNN takes a non-contiguous source up to this reduction length ...
_TRANSPOSED_MIN_N = 1024    # ... or from this output width (else MKL's mm: see _long_transposed_source)
# Test switch: "auto" (the rule above), or force "fused" / "onednn" / "mkl" wherever that route can
# run (a forced oneDNN route still falls back to "mkl" where oneDNN cannot run the dtype).
ROUTE = "auto"

_onednn_ok: dict = {}  # dtype -> frozenset of activation names oneDNN gets right, by _probe_onednn


def _linear_pointwise(x: Tensor, w, b: Optional[Tensor], attr: str, scalars: list, algorithm: str) -> Tensor:
    """oneDNN's fused linear (every oneDNN GEMM here goes through this one name: tests spy on it)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, scalars, algorithm)


def _probe_onednn(dtype: torch.dtype) -> frozenset:
    """The activations that oneDNN's fused linear gets exactly right for `dtype` (postops.py), empty
    where it cannot run the dtype. Once per dtype per process, outside the caller's autocast and
    autograd (a first call under autocast must probe the dtype it names)."""
    ok = _onednn_ok.get(dtype)
    if ok is not None:
        return ok
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        ok = exact_postops(dtype, _linear_pointwise)
    _onednn_ok[dtype] = ok
    return ok


# ----------------------------------------------------------------------------- GEMMs
def _mm(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """a (M, K) @ b (K, N) (+ bias (N,), added in the GEMM) -> (M, N) contiguous, any strides in.
    PyTorch's mm / addmm (MKL sgemm for fp32, oneDNN matmul for 16-bit), a large result in a
    huge-page-backed buffer (see _empty); fp32 GEMMs of ONEDNN_MIN_MACS and more on oneDNN's
    inner product instead where MKL's sgemm is its generic code (_FP32_MM_ONEDNN): the
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


def _long_transposed_source(a: Tensor, n: int) -> bool:
    """Whether a (M, K) @ (K, n) with a non-contiguous `a` runs faster in MKL than in oneDNN."""
    return not a.is_contiguous() and a.shape[1] > _TRANSPOSED_MAX_LEN and n < _TRANSPOSED_MIN_N


def _mm_bias(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """The "mkl" route's GEMM: (z, the bias still to add in the epilogue or None)."""
    if b is not None and x.dtype in (torch.bfloat16, torch.float16):
        # Low precision: add the bias inside the GEMM's fp32 accumulator, like F.linear, so z is
        # rounded once; the epilogue then only applies the activation.
        return _mm(x, w.t(), b), None  # BLAS takes the transposed view of w without a copy
    return _mm(x, w.t()), b  # bias joins the activation in one pass over z


# ----------------------------------------------------------------------------- the route
def onednn_pays(m: int, k: int, n: int, packed: bool = False) -> bool:
    """Whether an (M, K) x (N, K)^T GEMM is large enough for oneDNN's per-call cost to pay
    (packed: on a prepacked weight; see ONEDNN_MIN_MACS and PACKED_MIN_MACS)."""
    macs = m * k * n
    return macs >= ONEDNN_MIN_MACS or (packed and macs >= PACKED_MIN_MACS and k >= PACKED_MIN_K)


def _mkl_sgemm_wins(dtype: torch.dtype, packed: bool) -> bool:
    """fp32 on a CPU where MKL runs its own sgemm (Intel), without a prepacked weight: MKL beats
    oneDNN's routes, fused or not (see _FP32_MM_ONEDNN)."""
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
    if _mkl_sgemm_wins(dtype, packed) or not (packed or fused_pays(m, k, n)):
        return False
    return ROUTE != "mkl" and onednn_pays(m, k, n, packed) and bool(_probe_onednn(dtype))


# ----------------------------------------------------------------------------- linear + activation
def torch_ops_take(mn: int, k: int) -> bool:
    """The tiny-output rule: a linear of M*N = mn outputs over K = k is PyTorch's own F.linear +
    activation when mn <= TORCH_OPS_MAX_OUT and M*K*N < TORCH_OPS_MAX_MACS. Read here for calls
    with grad and by _dispatch.tiny_cpu_linear's Python gate; csrc/torch/fastpath.cpp states it in
    C++ (the gate's fast path, given these two constants per call)."""
    return mn <= TORCH_OPS_MAX_OUT and mn * k < TORCH_OPS_MAX_MACS


def fused_pays(m: int, k: int, n: int) -> bool:
    """Whether a linear (+ activation) of (M, K) x (N, K)^T on the plain weight runs on our routes:
    from FUSED_MIN_MACS multiply-adds (with the "auto" route). Below it, PyTorch's F.linear (+ its
    activation) with or without a gradient -- one route either way, so an evaluation and a
    training step give the same bits. A forced backend (use_backend("cpp"): how tests reach the
    kernels) runs ours at every size. Measured in whole MLP blocks with a gradient: the fused path
    0.73-0.94x of eager at 2^27-2^29 multiply-adds (its fixed costs: the autograd Function, its
    checks, the saved pre-activation, oneDNN's weight reorder per bf16 call), 1.04-1.25x from 2^31
    (bench/results/cpu-routes.md)."""
    return ROUTE != "auto" or m * k * n >= FUSED_MIN_MACS or forced() is not None


def logits_into(h: Tensor, w: Tensor, b: Optional[Tensor]) -> bool:
    """Whether linear_act_forward with act "none" runs one plain BLAS mm here (the "mkl" route, no
    bias, not the tiny rule, not oneDNN's fp32 GEMM): PyTorch's mm, which writes into a given out."""
    m, k, n = h.shape[0], h.shape[1], w.shape[0]
    return (b is None and _forward_route(h, w, NONE_ACT, 0.0) == "mkl"
            and not (_FP32_MM_ONEDNN and h.dtype == torch.float32 and m * k * n >= ONEDNN_MIN_MACS and ROUTE != "mkl")
            and not (ROUTE == "auto" and torch_ops_take(m * n, k)))


def linear_logits(h: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
    """h @ w^T + b: into out where logits_into (the same mm call as linear_act_forward's, so the
    same bits), else linear_act_forward's result."""
    if out is not None and logits_into(h, w, b):
        return torch.mm(h, w.t(), out=out)
    return linear_act_forward(h, w, b, NONE_ACT, 0.0, False)[0]


def linear_act_forward(x: Tensor, w: Tensor, b: Optional[Tensor], act: Activation, slope: float,
                       save: bool) -> Tuple[Tensor, Optional[Tensor]]:
    # x: (M, K), w: (N, K) -> z: (M, N).
    # Every choice below depends on the shapes, dtype and activation only, never on `save`: a
    # forward with grad and one without take the same route and the same pass, so they give the
    # same bits (an evaluation and a training step of one model agree).
    kind = act.saves(slope) if save else None
    m, n = x.shape[0], w.shape[0]
    if ROUTE == "auto" and (torch_ops_take(m * n, x.shape[1]) or not fused_pays(m, x.shape[1], n)):
        # Tiny (as the no-grad gate _dispatch.tiny_cpu_linear) or below FUSED_MIN_MACS (as the op's
        # composite route with a gradient): PyTorch's own F.linear + activation.
        z = F.linear(x, w, b)
        if kind == SAVE_INPUT:
            return act.ref(z, slope), z
        y = act.ref_(z, slope)
        return y, (y if kind == SAVE_OUTPUT else None)
    route = _forward_route(x, w, act, slope)
    if route == "fused":
        attr, scalar, alg = ONEDNN_POSTOPS[act.name]
        y = _linear_pointwise(x, w, b, attr, [slope] if scalar else [], alg)  # (M, N) contiguous
        return y, (y if kind == SAVE_OUTPUT else None)
    if route == "onednn":
        z, bias = _linear_pointwise(x, w, b, "none", [], ""), None  # bias added in the GEMM
    else:
        z, bias = _mm_bias(x, w, b)
    return _epilogue(z, bias, act, slope, kind)


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


# ----------------------------------------------------------------------------- prepacked weights
# Inference only (FusedLinear keeps the packed copy and decides when it may be used). oneDNN's
# blocked weight layout, reordered once instead of inside every call. MKL's packed sgemm
# (torch.ops.mkl._mkl_linear) measured slower than oneDNN on every fp32 shape, so it is not used
# (see bench/results/cpu-routes.md).
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
    if wp is None and not fused_pays(m, k, n):  # nothing packed: the route of the call with grad
        return linear_act_forward(x, w, b, act, slope, False)[0]
    route = _forward_route(x, w, act, slope, packed=wp is not None)
    if route == "mkl":
        return _epilogue(*_mm_bias(x, w, b), act, slope, None)[0]
    if wp is None:
        wp = w
    if route == "fused":
        attr, scalar, alg = ONEDNN_POSTOPS[act.name]
        return _linear_pointwise(x, wp, b, attr, [slope] if scalar else [], alg)
    z = _linear_pointwise(x, wp, b, "none", [], "")
    return _epilogue(z, None, act, slope, None)[0]


# The backend as the packed-weight cache keys it, and as the registry hands it out: the package
# (fastlayers.backends.cpu), whose prepack_weight the cache calls (tests patch it there).
_SELF = sys.modules[__package__]
