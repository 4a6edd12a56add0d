"""Attention-score softmax kernels, forward and backward: y = softmax(mask(x * scale [+ mask])).

Layout: x, y, dy, dx are (B, H, L, S) contiguous; the R = B*H*L rows of S elements are rows
r = (b, h, i) at offset r * S. The mask is read through its strides (SB, SH, SL, SS in elements,
0 on broadcast dims; never expanded in memory): MASK_KIND 0 none, 1 bool (bytes, nonzero = takes
part), 2 floating in x's dtype (added). CAUSAL masks column j > row i (top-left aligned), from the
indices. A tile is BLOCK_R rows x BLOCK_L columns; the plans are softmax's (kernels/softmax.py
``plan`` with inner == 1): rows up to its single-pass limit in registers, longer rows streamed.

z = x * scale, rounded to x's dtype for 16-bit x (ROUND), + mask, rounded again -- the roundings
eager's ``scores * scale + mask`` makes --, -inf where masked; the softmax in COMPUTE_DTYPE (fp32,
fp64 for fp64), y stored in y's dtype (x's, or float32 for 16-bit x), rounded once. A fully
masked row, a NaN or a +inf in a row make it NaN, as torch.

* single pass: forward reads x once (causal: only columns <= i are loaded) and writes y once;
  backward reads dy, y and writes dx = keep ? y * (dy - sum(dy * y)) * scale : 0.
  Bytes: fwd R*S*(sizeof x + sizeof y) (+ mask), bwd R*S*(2 sizeof y + sizeof x) (+ mask).
* streaming (rows past the single-pass limit): forward makes an online pass (running max and
  rescaled sum of exp) and a writing pass that recomputes z (x read twice); backward one pass for
  sum(dy * y), one for dx. ~6 flops per element forward, 4 backward.
Scales are passed as two fp32 halves (hi + lo): fp64 kernels recombine them at near fp64
precision; in fp32 hi + lo rounds to hi, the fp32 rounding of the scale eager's fp32 / 16-bit mul uses.
"""
import triton
import triton.language as tl


@triton.jit
def _rows(pid, R, L, H, BLOCK_R: tl.constexpr):
    """This tile's row indices r (int64), their mask, query index i and (b, h)."""
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < R
    i = r % L
    bh = r // L
    return r, row_ok, i, bh // H, bh % H


@triton.jit
def _z(x_ptr, m_ptr, r, row_ok, i, b, h, cols, S, scale_hi, scale_lo, SB, SH, SL, SS,
       MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, ROUND: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """z over columns `cols` (int64) of rows r: -inf where masked or outside the row. Also returns
    `keep`, the positions that take part (in the row, bool mask, causal)."""
    inb = row_ok[:, None] & (cols < S)[None, :]
    keep = inb
    if CAUSAL:
        keep = keep & (cols[None, :] <= i[:, None])
    moff = b * SB + h * SH + i * SL
    moffs = moff[:, None] + cols[None, :] * SS
    if MASK_KIND == 1:
        keep = keep & (tl.load(m_ptr + moffs, mask=keep, other=0) != 0)
    x = tl.load(x_ptr + r[:, None] * S + cols[None, :], mask=keep, other=0.0)
    z = x.to(COMPUTE_DTYPE) * (tl.cast(scale_hi, COMPUTE_DTYPE) + tl.cast(scale_lo, COMPUTE_DTYPE))
    if ROUND:
        z = z.to(x_ptr.dtype.element_ty).to(COMPUTE_DTYPE)
    if MASK_KIND == 2:
        z = z + tl.load(m_ptr + moffs, mask=keep, other=0.0).to(COMPUTE_DTYPE)
        if ROUND:
            z = z.to(x_ptr.dtype.element_ty).to(COMPUTE_DTYPE)
    return tl.where(keep, z, float("-inf")), keep, inb


@triton.jit
def attn_softmax_fwd_kernel(x_ptr, m_ptr, y_ptr, R, L, H, S, scale_hi, scale_lo, SB, SH, SL, SS,
                            MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, ROUND: tl.constexpr,
                            COMPUTE_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Single pass: rows of S <= BLOCK_L elements, BLOCK_R rows per program."""
    r, row_ok, i, b, h = _rows(tl.program_id(0), R, L, H, BLOCK_R)
    cols = tl.arange(0, BLOCK_L).to(tl.int64)
    z, keep, inb = _z(x_ptr, m_ptr, r, row_ok, i, b, h, cols, S, scale_hi, scale_lo, SB, SH, SL, SS,
                      MASK_KIND, CAUSAL, ROUND, COMPUTE_DTYPE)
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])  # NaN everywhere in a fully masked row (-inf - -inf), like torch
    s = tl.sum(tl.where(inb, e, 0.0), axis=1)
    y = e / s[:, None]
    tl.store(y_ptr + r[:, None] * S + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inb)


@triton.jit
def attn_softmax_fwd_streaming_kernel(x_ptr, m_ptr, y_ptr, R, L, H, S, scale_hi, scale_lo, SB, SH, SL, SS,
                                      MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, ROUND: tl.constexpr,
                                      COMPUTE_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
                                      BLOCK_L: tl.constexpr):
    """Rows of any length, BLOCK_L columns at a time: pass 1 keeps the running max m and
    s = sum exp(z - m) (rescaled when m grows), pass 2 recomputes z and writes y."""
    r, row_ok, i, b, h = _rows(tl.program_id(0), R, L, H, BLOCK_R)
    m = tl.full((BLOCK_R,), float("-inf"), COMPUTE_DTYPE)
    s = tl.zeros((BLOCK_R,), COMPUTE_DTYPE)
    for c0 in range(0, S, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L).to(tl.int64)
        z, keep, inb = _z(x_ptr, m_ptr, r, row_ok, i, b, h, cols, S, scale_hi, scale_lo, SB, SH, SL, SS,
                          MASK_KIND, CAUSAL, ROUND, COMPUTE_DTYPE)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # While a row has seen only -inf, shift by 0 so exp(-inf - 0) = 0 (not exp(NaN)).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    inv_s = 1.0 / s
    for c0 in range(0, S, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L).to(tl.int64)
        z, keep, inb = _z(x_ptr, m_ptr, r, row_ok, i, b, h, cols, S, scale_hi, scale_lo, SB, SH, SL, SS,
                          MASK_KIND, CAUSAL, ROUND, COMPUTE_DTYPE)
        y = tl.exp(z - m[:, None]) * inv_s[:, None]  # all-masked row: m = -inf, NaN
        tl.store(y_ptr + r[:, None] * S + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _keep(m_ptr, row_ok, i, b, h, cols, S, SB, SH, SL, SS, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """(keep, in-bounds): the positions that take part in the forward (bool mask, causal)."""
    inb = row_ok[:, None] & (cols < S)[None, :]
    keep = inb
    if CAUSAL:
        keep = keep & (cols[None, :] <= i[:, None])
    if MASK_KIND == 1:
        moffs = (b * SB + h * SH + i * SL)[:, None] + cols[None, :] * SS
        keep = keep & (tl.load(m_ptr + moffs, mask=keep, other=0) != 0)
    return keep, inb


@triton.jit
def attn_softmax_bwd_kernel(dy_ptr, y_ptr, m_ptr, dx_ptr, R, L, H, S, scale_hi, scale_lo, SB, SH, SL, SS,
                            MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Single pass backward: dx = keep ? y * (dy - sum(dy * y)) * scale : 0 (exact zeros where
    masked, as masked_fill's backward; the sum runs over the whole row, as eager's)."""
    r, row_ok, i, b, h = _rows(tl.program_id(0), R, L, H, BLOCK_R)
    cols = tl.arange(0, BLOCK_L).to(tl.int64)
    keep, inb = _keep(m_ptr, row_ok, i, b, h, cols, S, SB, SH, SL, SS, MASK_KIND, CAUSAL)
    offs = r[:, None] * S + cols[None, :]
    dy = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(COMPUTE_DTYPE)
    y = tl.load(y_ptr + offs, mask=inb, other=0.0).to(COMPUTE_DTYPE)
    s = tl.sum(dy * y, axis=1)
    scale = tl.cast(scale_hi, COMPUTE_DTYPE) + tl.cast(scale_lo, COMPUTE_DTYPE)  # fp32: == hi
    dx = tl.where(keep, (y * (dy - s[:, None])) * scale, 0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inb)


@triton.jit
def attn_softmax_bwd_streaming_kernel(dy_ptr, y_ptr, m_ptr, dx_ptr, R, L, H, S, scale_hi, scale_lo, SB, SH, SL,
                                      SS, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                                      COMPUTE_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
                                      BLOCK_L: tl.constexpr):
    """Streaming backward: pass 1 sums dy * y over the row, pass 2 writes dx."""
    r, row_ok, i, b, h = _rows(tl.program_id(0), R, L, H, BLOCK_R)
    s = tl.zeros((BLOCK_R,), COMPUTE_DTYPE)
    for c0 in range(0, S, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L).to(tl.int64)
        inb = row_ok[:, None] & (cols < S)[None, :]
        offs = r[:, None] * S + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(COMPUTE_DTYPE)
        y = tl.load(y_ptr + offs, mask=inb, other=0.0).to(COMPUTE_DTYPE)
        s += tl.sum(dy * y, axis=1)
    scale = tl.cast(scale_hi, COMPUTE_DTYPE) + tl.cast(scale_lo, COMPUTE_DTYPE)  # fp32: == hi
    for c0 in range(0, S, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L).to(tl.int64)
        keep, inb = _keep(m_ptr, row_ok, i, b, h, cols, S, SB, SH, SL, SS, MASK_KIND, CAUSAL)
        offs = r[:, None] * S + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(COMPUTE_DTYPE)
        y = tl.load(y_ptr + offs, mask=inb, other=0.0).to(COMPUTE_DTYPE)
        dx = tl.where(keep, (y * (dy - s[:, None])) * scale, 0.0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inb)
