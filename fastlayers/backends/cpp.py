"""CPU backend: GEMMs through PyTorch's BLAS (MKL / oneDNN), everything around them fused in
fastlayers._C (csrc/): the bias + activation epilogue, the backward's dy * act'(.) with the bias
gradient, and softmax / log_softmax. Inputs arrive validated and laid out per the contract in
fastlayers/backends/__init__.py; here we only allocate, call BLAS and call the kernels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
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


def _mm(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """a @ b (+ bias, added in the GEMM by addmm) in PyTorch's BLAS; a large result goes into a
    huge-page-backed buffer (see _empty), a small one skips the out= plumbing."""
    m, n = a.shape[0], b.shape[1]
    if m * n * a.element_size() < _HUGE_MIN_BYTES:
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    out = _empty(m, n, dtype=a.dtype)
    return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)


def _empty(*shape: int, dtype: torch.dtype) -> Tensor:
    """A new contiguous CPU tensor. From 32 MiB up it is backed by transparent huge pages where the
    OS allows (madvise): such fresh buffers are otherwise paid for with one page fault per 4 KiB,
    measured as 10 ms of a 76 ms GEMM (2048x1024 @ 1024x4096) and half of a 4096x4096 softmax."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes >= _HUGE_MIN_BYTES:
        _C.advise_hugepages(t.data_ptr(), nbytes)
    return t


def linear_act_forward(x: Tensor, w: Tensor, b: Optional[Tensor], act: Activation, slope: float,
                       save: bool) -> Tuple[Tensor, Optional[Tensor]]:
    # x: (M, K), w: (N, K) -> z: (M, N). BLAS takes the transposed view of w without a copy.
    if b is not None and x.dtype in (torch.bfloat16, torch.float16):
        # Low precision: add the bias inside the GEMM's fp32 accumulator, like F.linear, so z is
        # rounded once; the epilogue then only applies the activation.
        z, bias = _mm(x, w.t(), b), None
    else:
        z, bias = _mm(x, w.t()), b  # bias joins the activation in one pass over z
    kind = act.saves(slope) if save else None
    m, n = z.shape
    if act.name == "none" and bias is None:
        return z, None
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

# --- cross entropy (contract in fastlayers/backends/__init__.py; kernels in csrc/loss.cpp)
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
                           scale: Tensor, ignore_index: int, eps: float, out: Optional[Tensor]) -> Tensor:
    n, nc = x.shape
    if out is None:
        out = _empty(n, nc, dtype=x.dtype)
    if n == 0 or nc == 0:
        return out
    t, q = _ce_targets(target)
    _C.cross_entropy_backward(_buf(x), t, q, _buf(weight), _buf(stats), _buf(scale), _buf(out), ignore_index,
                              eps, torch.get_num_threads())
    return out


def linear_ce_chunk_grads(dz: Tensor, h: Tensor, w: Tensor, dh: Optional[Tensor], dw: Optional[Tensor],
                          db: Optional[Tensor]) -> None:
    """dh = dz @ w, dw += dz^T @ h, db += colsum(dz): PyTorch's BLAS, writing into dh's rows and
    accumulating into dw in place (addmm: one read + write of dw per chunk, no temporary)."""
    if dh is not None:
        torch.mm(dz, w, out=dh) if dh.is_contiguous() else dh.copy_(torch.mm(dz, w))
    if dw is not None:
        if dw.dtype == dz.dtype:
            dw.addmm_(dz.t(), h)
        else:  # 16-bit data: fp32 accumulator
            dw.add_(torch.mm(dz.t(), h))
    if db is not None:
        db.add_(dz.sum(0, dtype=db.dtype))
