"""Softmax cross-entropy kernels, forward and backward (the math is in fastlayers/ops/_loss.py).

Layout: x (N, C) contiguous logits; target (N,) int64 class indices or q (N, C) contiguous class
probabilities; weight (C,) in the compute dtype or absent; stats (N, 3) = (M, log S, A).
One program per row, walking it in chunks of BLOCK classes, so rows of any length work (a
128K-class vocabulary is 32 chunks of 4096):
* forward: one streaming pass keeps the running max M and reference R (M, or 0 while the row has
  seen only -inf), S = sum exp(x - R) and T = sum c (x - R), rescaling both when R grows; then
  loss = sum_j c_j (log S - (x_j - M)) = A log S - T, with the class target's term read once.
  Reads N*C*itemsize bytes (+ the same for q); writes 4 numbers per row. ~6 flops per element.
* backward: one pass, dx = scale * (exp((x - M) - log S) * A - c). Reads x (+ q) and writes dx:
  2 * N*C*itemsize bytes. ~5 flops per element.
Math in fp32 for fp16/bf16/fp32 data, fp64 for fp64 (COMPUTE_DTYPE). eps arrives as two fp32
halves (eps_hi + eps_lo) so fp64 kernels see it at full precision.
"""
import triton
import triton.language as tl

from . import next_pow2

# Classes per chunk of a row.
MAX_BLOCK = 4096


def block_for(num_classes: int) -> int:
    return max(16, min(MAX_BLOCK, next_pow2(num_classes)))


@triton.jit
def _coef(w_ptr, q_ptr, q_row, offs, mask, qa, qb, HAS_W: tl.constexpr, PROBS: tl.constexpr,
          COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """c over one chunk: w_j (or 1), times q'_j = q_j * qa + qb for probability targets; 0 past C."""
    c = tl.full((BLOCK,), 1.0, COMPUTE_DTYPE)
    if HAS_W:
        c = tl.load(w_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    if PROBS:
        q = tl.load(q_ptr + q_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        c = c * (q * qa + qb)
    return tl.where(mask, c, 0.0)


@triton.jit
def ce_fwd_kernel(x_ptr, t_ptr, q_ptr, w_ptr, loss_ptr, stats_ptr, C, ignore_index, eps_hi, eps_lo,
                  HAS_W: tl.constexpr, PROBS: tl.constexpr, SMOOTH: tl.constexpr,
                  COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Row loss and stats of one row per program (grid (N,))."""
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    zero = tl.sum(tl.zeros((BLOCK,), COMPUTE_DTYPE), 0)   # a 0-d COMPUTE_DTYPE zero
    eps = (zero + eps_hi) + eps_lo
    n_cls = zero + C
    qa = 1.0 - eps
    qb = eps / n_cls
    if not SMOOTH:
        qa = qa * 0.0 + 1.0
        qb = qb * 0.0
    arange = tl.arange(0, BLOCK)
    ninf = float("-inf")
    m = zero + ninf
    r = zero
    s = zero
    t_sum = zero
    c_sum = zero
    for c0 in range(0, C, BLOCK):
        offs = c0 + arange
        mask = offs < C
        x = tl.load(x_ptr + base + offs, mask=mask, other=ninf).to(COMPUTE_DTYPE)
        m_new = tl.maximum(m, tl.max(x, 0))
        r_new = tl.where(m_new == ninf, 0.0, m_new)
        alpha = tl.where(m == ninf, 0.0, tl.exp(m - m_new))
        s = s * alpha + tl.sum(tl.exp(x - r_new), 0)
        if PROBS or SMOOTH:
            c = _coef(w_ptr, q_ptr, base, offs, mask, qa, qb, HAS_W, PROBS, COMPUTE_DTYPE, BLOCK)
            d = tl.where(mask, x - r_new, 0.0)
            t_sum = t_sum + (r - r_new) * c_sum + tl.sum(c * d, 0)
            c_sum = c_sum + tl.sum(c, 0)
        m = m_new
        r = r_new
    log_s = tl.log(s)
    smooth = c_sum * log_s - t_sum
    if PROBS:
        loss = smooth
        a = c_sum
    else:
        t = tl.load(t_ptr + row)
        ignored = t == ignore_index
        tt = tl.where(ignored, 0, t)
        xt = tl.load(x_ptr + base + tt).to(COMPUTE_DTYPE)
        wt = zero + 1.0
        if HAS_W:
            wt = tl.load(w_ptr + tt).to(COMPUTE_DTYPE)
        nll = wt * (log_s - (xt - m))
        if SMOOTH:
            loss = (1.0 - eps) * nll + (eps / n_cls) * smooth
            a = (1.0 - eps) * wt + (eps / n_cls) * c_sum
        else:
            loss = nll
            a = wt
        loss = tl.where(ignored, 0.0, loss)
        a = tl.where(ignored, 0.0, a)
    tl.store(loss_ptr + row, loss)
    tl.store(stats_ptr + 3 * row, m)
    tl.store(stats_ptr + 3 * row + 1, log_s)
    tl.store(stats_ptr + 3 * row + 2, a)


@triton.jit
def ce_bwd_kernel(x_ptr, t_ptr, q_ptr, w_ptr, stats_ptr, scale_ptr, dx_ptr, C, col0, classes, ignore_index,
                  eps_hi, eps_lo, HAS_W: tl.constexpr, PROBS: tl.constexpr, SMOOTH: tl.constexpr,
                  COMPUTE_DTYPE: tl.constexpr, BF16_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """dx = scale * (softmax(x) * A - c) for one row per program (grid (N,)); dx may be x.
    x: the columns [col0, col0 + C) of rows with `classes` classes (class targets; else col0 = 0,
    classes = C), stats those of the whole rows. BF16_OUT: dx is bfloat16 (rounded to nearest even
    explicitly)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    zero = tl.sum(tl.zeros((BLOCK,), COMPUTE_DTYPE), 0)   # a 0-d COMPUTE_DTYPE zero
    eps = (zero + eps_hi) + eps_lo
    n_cls = zero + classes
    m = tl.load(stats_ptr + 3 * row)
    log_s = tl.load(stats_ptr + 3 * row + 1)
    a = tl.load(stats_ptr + 3 * row + 2)
    g = tl.load(scale_ptr + row)
    arange = tl.arange(0, BLOCK)
    qa = 1.0 - eps
    qb = eps / n_cls
    if not SMOOTH:
        qa = qa * 0.0 + 1.0
        qb = qb * 0.0
    if not PROBS:
        t = tl.load(t_ptr + row)
        ignored = t == ignore_index
        tt = tl.where(ignored, 0, t)
        wt = zero + 1.0
        if HAS_W:
            wt = tl.load(w_ptr + tt).to(COMPUTE_DTYPE)
        ct = tl.where(ignored, 0.0, (1.0 - eps) * wt)   # the target's own coefficient
        cs = tl.where(ignored, 0.0, eps / n_cls)        # everyone's smoothing share
    for c0 in range(0, C, BLOCK):
        offs = c0 + arange
        mask = offs < C
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        d = tl.exp((x - m) - log_s) * a
        if PROBS:
            d = d - _coef(w_ptr, q_ptr, base, offs, mask, qa, qb, HAS_W, PROBS, COMPUTE_DTYPE, BLOCK)
        else:
            if SMOOTH:
                d = d - cs * _coef(w_ptr + col0, q_ptr, base, offs, mask, qa, qb, HAS_W, PROBS, COMPUTE_DTYPE,
                                   BLOCK)
            d = d - tl.where(offs + col0 == tt, ct, 0.0)
        out = (g * d).to(tl.float32) if BF16_OUT else g * d
        if BF16_OUT:
            # Round to nearest even in the fp32 bits; the cast below then only drops zero bits.
            # (The interpreter's fp32 -> bf16 cast truncates; on a GPU this is what cvt.rn does.)
            bits = out.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            out = tl.where(out != out, out, bits.to(tl.float32, bitcast=True))
        tl.store(dx_ptr + base + offs, out.to(dx_ptr.dtype.element_ty), mask=mask)
