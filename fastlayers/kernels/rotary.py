"""Rotary position embedding kernel (Hugging Face's ``apply_rotary_pos_emb``), q and k in one launch.

Layout: each operand x (q or k) and its output are (N0, N1, N2, D) views with any strides on the
leading dims and a contiguous last dim (e.g. (B, H, S, D) from ``.view(B, S, H, D).transpose(1, 2)``);
cos / sin are (N0, N1, N2, R) views broadcast to x's leading dims (stride 0 over heads), last dim
contiguous. The first R dims of each row rotate in pairs -- (i, i + R/2) for rotate_half, (2i, 2i+1)
for GPT-J's layout (INTERLEAVED) -- and dims [R, D) are copied.

    forward (INVERSE False): out = x * cos + rotate(x) * sin
    backward (INVERSE True): dx = g * cos + rotate^T(g * sin)    (the rotation by -sin)

``rotary_kernel``: program p < PROGS_Q handles BLOCK_ROWS rows of q, the others rows of k; per row
block the rotated half-pairs are (BLOCK_ROWS, BLOCK_H) tiles, the pass-through (BLOCK_ROWS, BLOCK_P).
Math in COMPUTE_DTYPE (fp32 for 16-bit data, fp64 for fp64). fp32 / fp64: one rounding per element.
bf16 / fp16: eager's roundings -- each product rounded to the data dtype, then the sum -- so the result
is PyTorch's bit for bit (its 16-bit ops round each op's result once); the casts between the products
and the sum keep the compiler from fusing them into FMAs. (The CPU interpreter's fp32 -> 16-bit casts
truncate, so only a GPU gives these bits.)
    Bytes: reads D per row of x plus R of cos and R of sin per row (from L2 when broadcast over
    heads), writes D per row. ~3 flops per rotated element: memory-bound.
"""
import triton
import triton.language as tl

# Elements of one (BLOCK_ROWS, BLOCK_H) tile (fp64: half), 4 per thread at 8 warps: six such tiles
# (x, cos, sin at both pair positions) and their 64-bit addresses live at once. 2048 spilled on
# sm_80 / sm_90 (scripts/compile_gate.py).
ROWS_TILE = 1024
NUM_WARPS = 8


def plan(r: int, d_max: int, fp64: bool = False):
    """(BLOCK_ROWS, BLOCK_H, BLOCK_P, num_warps) for rotary dim r and the larger head dim d_max:
    BLOCK_H covers half a rotary dim (up to 128 pairs per step), the pass-through tile
    (BLOCK_ROWS, BLOCK_P) is no larger than the rotary one."""
    tile = ROWS_TILE >> int(fp64)
    block_h = min(triton.next_power_of_2(max(r // 2, 1)), 128, tile)
    block_rows = max(1, tile // block_h)
    block_p = min(triton.next_power_of_2(max(d_max - r, 1)), max(1, tile // block_rows))
    return block_rows, block_h, block_p, NUM_WARPS


@triton.jit
def _rnd(v, dtype: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """v rounded to the data dtype and back (eager's rounding between two 16-bit ops); a no-op for
    fp32 / fp64 data."""
    return v.to(dtype).to(COMPUTE_DTYPE)


@triton.jit
def _rotate_rows(x_ptr, o_ptr, c_ptr, s_ptr, row0, n_rows, N1, N2, XS0, XS1, XS2, OS0, OS1, OS2,
                 CS0, CS1, CS2, SS0, SS1, SS2, D, R,
                 INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    rmask = rows < n_rows
    i2 = rows % N2
    t = rows // N2
    i1 = t % N1
    i0 = t // N1
    xb = (i0 * XS0 + i1 * XS1 + i2 * XS2)[:, None]
    ob = (i0 * OS0 + i1 * OS1 + i2 * OS2)[:, None]
    cb = (i0 * CS0 + i1 * CS1 + i2 * CS2)[:, None]
    sb = (i0 * SS0 + i1 * SS1 + i2 * SS2)[:, None]
    dtype = o_ptr.dtype.element_ty
    half = R // 2
    for j in range(0, half, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H)
        m = rmask[:, None] & (cols < half)[None, :]
        if INTERLEAVED:
            lo = (2 * cols)[None, :]
            hi = lo + 1
        else:
            lo = cols[None, :]
            hi = lo + half
        x1 = tl.load(x_ptr + xb + lo, mask=m, other=0.0).to(COMPUTE_DTYPE)
        x2 = tl.load(x_ptr + xb + hi, mask=m, other=0.0).to(COMPUTE_DTYPE)
        c1 = tl.load(c_ptr + cb + lo, mask=m, other=0.0).to(COMPUTE_DTYPE)
        c2 = tl.load(c_ptr + cb + hi, mask=m, other=0.0).to(COMPUTE_DTYPE)
        s1 = tl.load(s_ptr + sb + lo, mask=m, other=0.0).to(COMPUTE_DTYPE)
        s2 = tl.load(s_ptr + sb + hi, mask=m, other=0.0).to(COMPUTE_DTYPE)
        if INVERSE:
            o1 = _rnd(x1 * c1, dtype, COMPUTE_DTYPE) + _rnd(x2 * s2, dtype, COMPUTE_DTYPE)
            o2 = _rnd(x2 * c2, dtype, COMPUTE_DTYPE) - _rnd(x1 * s1, dtype, COMPUTE_DTYPE)
        else:
            o1 = _rnd(x1 * c1, dtype, COMPUTE_DTYPE) - _rnd(x2 * s1, dtype, COMPUTE_DTYPE)
            o2 = _rnd(x2 * c2, dtype, COMPUTE_DTYPE) + _rnd(x1 * s2, dtype, COMPUTE_DTYPE)
        tl.store(o_ptr + ob + lo, o1.to(dtype), mask=m)
        tl.store(o_ptr + ob + hi, o2.to(dtype), mask=m)
    for j in range(R, D, BLOCK_P):  # pass-through dims (partial rotary)
        cols = (j + tl.arange(0, BLOCK_P))[None, :]
        m = rmask[:, None] & (cols < D)
        tl.store(o_ptr + ob + cols, tl.load(x_ptr + xb + cols, mask=m), mask=m)


@triton.jit
def rotary_kernel(q_ptr, oq_ptr, cq_ptr, sq_ptr, k_ptr, ok_ptr, ck_ptr, sk_ptr,
                  ROWS_Q, Q1, Q2, QS0, QS1, QS2, OQS0, OQS1, OQS2, CQS0, CQS1, CQS2, SQS0, SQS1, SQS2, DQ,
                  ROWS_K, K1, K2, KS0, KS1, KS2, OKS0, OKS1, OKS2, CKS0, CKS1, CKS2, SKS0, SKS1, SKS2, DK,
                  R, PROGS_Q,
                  INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """out = x * cos + rotate(x) * sin (INVERSE: x * cos + rotate^T(x * sin)) for BLOCK_ROWS rows of
    q (programs [0, PROGS_Q)) or of k (the rest). ROWS_*: N0 * N1 * N2 rows of each operand;
    Q1, Q2 / K1, K2: its N1, N2; *S0..2: element strides of x, out, cos, sin; DQ / DK: head dims."""
    pid = tl.program_id(0)
    if pid < PROGS_Q:
        _rotate_rows(q_ptr, oq_ptr, cq_ptr, sq_ptr, pid.to(tl.int64) * BLOCK_ROWS, ROWS_Q, Q1, Q2,
                     QS0, QS1, QS2, OQS0, OQS1, OQS2, CQS0, CQS1, CQS2, SQS0, SQS1, SQS2, DQ, R,
                     INTERLEAVED, INVERSE, BLOCK_ROWS, BLOCK_H, BLOCK_P, COMPUTE_DTYPE)
    else:
        _rotate_rows(k_ptr, ok_ptr, ck_ptr, sk_ptr, (pid - PROGS_Q).to(tl.int64) * BLOCK_ROWS, ROWS_K, K1, K2,
                     KS0, KS1, KS2, OKS0, OKS1, OKS2, CKS0, CKS1, CKS2, SKS0, SKS1, SKS2, DK, R,
                     INTERLEAVED, INVERSE, BLOCK_ROWS, BLOCK_H, BLOCK_P, COMPUTE_DTYPE)
