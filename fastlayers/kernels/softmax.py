"""softmax / log_softmax kernels, forward and backward.

Layout (the backend contract): x is (outer, L, inner) contiguous and the softmax runs over dim 1.
A "row" r in [0, outer * inner) is o = r // inner, i = r % inner; its L elements sit at
    o * L * inner + i + l * inner,   l = 0 .. L-1
so inner == 1 is the usual contiguous row, and inner > 1 a strided one. Every kernel works on a
(BLOCK_R rows) x (BLOCK_L positions) tile; for inner > 1, neighbouring rows are neighbouring
addresses, so a tile of BLOCK_R >= 16 neighbouring inner indices (of one outer index: see
``_row_offsets``) reads memory coalesced.

Three paths, chosen by ``plan()`` (the boundary is ``uses_single_pass``) and ``split_plan``:
* single pass (BLOCK_R * next_pow2(L) <= SINGLE_PASS_MAX_ELEMS, halved for fp64 and halved
  for strided rows): the whole row in registers;
  forward reads x once and writes y once (2 * numel * itemsize bytes), backward reads dy and y
  and writes dx (3 * numel * itemsize).
* streaming (longer rows, no length cap): forward makes an online pass over chunks of BLOCK_L
  (running max m and the sum s of exp(x - m), rescaled whenever m grows), then a normalising pass
  (3 * numel * itemsize bytes); backward makes one pass for the row's dot product / sum and one
  for dx (5 * numel * itemsize).
* split rows (streaming-length rows too few to fill the GPU, ``split_plan``: 8 rows of 128K would
  be 8 programs on a 132-SM GPU): each row is cut into S segments, one program per (row tile,
  segment). Forward: kernel 1 writes each segment's (max, sum exp) partials; kernel 2 combines
  the S partials of its rows into the row's (max, sum) and writes y over its segment. Backward:
  kernel 1 writes each segment's sum(dy * y) (sum(dy)), kernel 2 sums the S partials and writes
  dx over its segment. Same bytes as streaming (+ 2 * R * S or R * S partials); the combine is in
  a fixed order, so results do not depend on scheduling.
Math is fp32 for fp16/bf16/fp32 data and fp64 for fp64 (COMPUTE_DTYPE). -inf behaves as in
torch: a partly -inf row is fine, a fully -inf row (max = -inf) gives NaN everywhere.
About 5 flops per element forward (sub, exp, add, div or sub/log), 4 backward.
"""
from typing import Tuple

import triton
import triton.language as tl

from . import next_pow2

# Longest tile (rows x positions) held in registers by the single-pass kernels; longer rows take
# the streaming path. For inner == 1 this is the longest single-pass row.
SINGLE_PASS_MAX_ELEMS = 16384
# Elements per chunk of the streaming path (BLOCK_R * BLOCK_L).
STREAM_CHUNK_ELEMS = 4096
# Short rows are packed into tiles of at least this many elements (several rows per program).
MIN_TILE_ELEMS = 2048
# Split rows: a streaming launch of fewer than SPLIT_PROGRAMS_PER_SM * SMs programs is split into
# segments of at least SPLIT_MIN_SEGMENT positions (two chunks, so each program still streams),
# at most SPLIT_MAX_SEGMENTS per row, to reach about that many programs.
SPLIT_PROGRAMS_PER_SM = 2
SPLIT_MIN_SEGMENT = 8192
SPLIT_MAX_SEGMENTS = 128


def rows_per_tile_min(inner: int) -> int:
    """Rows one program must hold at once: 1 for contiguous rows; for strided rows (inner > 1)
    enough neighbouring rows (up to 16) that each load touches contiguous memory."""
    return 1 if inner == 1 else min(16, next_pow2(inner))


def _max_elems(inner: int, fp64: bool) -> int:
    """Largest single-pass tile: halved for fp64 (two registers per value) and halved for strided
    rows (their reduction crosses warps), else the kernels spill at 16 warps (compile gate)."""
    return SINGLE_PASS_MAX_ELEMS >> (int(fp64) + int(inner > 1))


def uses_single_pass(length: int, inner: int, fp64: bool = False) -> bool:
    """The dispatch boundary: True when a row of `length` fits one single-pass tile."""
    return rows_per_tile_min(inner) * next_pow2(length) <= _max_elems(inner, fp64)


def single_pass_max_length(inner: int, fp64: bool = False) -> int:
    """Longest row (for this `inner`) that takes the single-pass kernels; tests straddle it."""
    return _max_elems(inner, fp64) // rows_per_tile_min(inner)


def plan(rows: int, length: int, inner: int, fp64: bool = False):
    """(single_pass, BLOCK_R, BLOCK_L, num_warps) for `rows` rows of `length` elements (fp64:
    float64 data). fp64 and strided single-pass tiles get twice the warps per element."""
    r_min = rows_per_tile_min(inner)
    if uses_single_pass(length, inner, fp64):
        block_l = next_pow2(length)
        # a strided tile holds inner indices of one outer index only: at most next_pow2(inner)
        most = next_pow2(rows) if inner == 1 else next_pow2(inner)
        block_r = max(r_min, min(most, max(1, MIN_TILE_ELEMS // block_l)))
        single = True
    else:
        block_r = r_min
        block_l = STREAM_CHUNK_ELEMS // r_min
        single = False
    elems = block_r * block_l
    per_warp = 512 if single and (fp64 or inner > 1) else 1024
    num_warps = min(16, max(4, elems // per_warp))
    return single, block_r, block_l, num_warps


def grid_size(rows: int, inner: int, block_r: int) -> int:
    """Programs of a launch: contiguous rows (inner == 1) are packed BLOCK_R per program; strided
    rows get one program per (outer index, BLOCK_R neighbouring inner indices)."""
    if inner == 1:
        return -(-rows // block_r)
    return (rows // inner) * -(-inner // block_r)


def split_plan(rows: int, length: int, inner: int, block_r: int, block_l: int,
               sms: int) -> Tuple[int, int]:
    """(segments S, segment length SEG) for streaming-path rows (tiles of block_r rows, chunks of
    block_l) on a GPU of `sms` SMs; S == 1: no split (enough row tiles, rows too short, or rows
    of 2^31 positions or more).
    SEG is a multiple of block_l and every segment is non-empty."""
    tiles = grid_size(rows, inner, block_r)
    target = SPLIT_PROGRAMS_PER_SM * sms
    segments = min(-(-target // tiles), length // SPLIT_MIN_SEGMENT, SPLIT_MAX_SEGMENTS)
    if segments <= 1:
        return 1, length
    seg = -(-(-(-length // segments)) // block_l) * block_l
    segments = -(-length // seg)
    if segments * seg >= 2 ** 31:  # the split kernels index positions in a row in int32
        return 1, length
    return segments, seg


@triton.jit
def _row_offsets(pid, R, L, INNER, STRIDED: tl.constexpr, BLOCK_R: tl.constexpr):
    """int64 offset of element 0 of each row of this program's tile, the rows' indices in
    [0, R) (int64) and the row mask.

    not STRIDED (INNER == 1): rows r = pid * BLOCK_R + [0, BLOCK_R), at offsets r * L.
    STRIDED (INNER > 1): the tile is BLOCK_R neighbouring inner indices i of one outer index o, so
    the row offsets o * L * INNER + i are consecutive addresses (an arange the compiler sees as
    contiguous: coalesced, vectorisable loads), never split by a division per element."""
    if STRIDED:
        blocks_per_outer = tl.cdiv(INNER, BLOCK_R)
        o = (pid // blocks_per_outer).to(tl.int64)
        i = (pid % blocks_per_outer) * BLOCK_R + tl.arange(0, BLOCK_R)
        base = o * L * INNER + i
        rows = o * INNER + i
        mask = i < INNER
    else:
        rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        base = rows * L
        mask = rows < R
    return base, rows, mask


@triton.jit
def softmax_fwd_kernel(x_ptr, y_ptr, R, L, INNER, LOG: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                       STRIDED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Single pass: y = softmax(x) (or log_softmax when LOG) over rows of L <= BLOCK_L elements.
    x, y: (outer, L, INNER) contiguous, R = outer * INNER rows; BLOCK_R rows per program."""
    base, _, mask_r = _row_offsets(tl.program_id(0), R, L, INNER, STRIDED, BLOCK_R)
    offs_l = tl.arange(0, BLOCK_L)
    offs = base[:, None] + offs_l.to(tl.int64)[None, :] * INNER
    mask = mask_r[:, None] & (offs_l < L)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(COMPUTE_DTYPE)
    m = tl.max(x, axis=1)
    shifted = x - m[:, None]  # NaN everywhere in a fully -inf row, like torch
    e = tl.exp(shifted)
    s = tl.sum(e, axis=1)
    if LOG:
        y = shifted - tl.log(s)[:, None]
    else:
        y = e / s[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# The loops over positions [lo, hi) below count from 0 (l0 = lo + d): with range(lo, hi, BLOCK_L)
# ptxas spilled a few bytes in some fp64 split kernels (scripts/compile_gate.py).
@triton.jit
def _chunk(base, mask_r, l0, hi, INNER, BLOCK_L: tl.constexpr):
    """Offsets and mask of positions [l0, l0 + BLOCK_L) of the tile's rows, cut at `hi`. The
    positions in int64: in int32, l0 + BLOCK_L - 1 wraps negative for a row within BLOCK_L of
    2^31 elements, and the wrapped positions pass the mask `ll < hi`."""
    ll = tl.cast(l0, tl.int64) + tl.arange(0, BLOCK_L)
    offs = base[:, None] + ll[None, :] * INNER
    return offs, mask_r[:, None] & (ll < hi)[None, :]


@triton.jit
def _max_sum(x_ptr, base, mask_r, lo, hi, INNER, COMPUTE_DTYPE: tl.constexpr,
             BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Online pass over positions [lo, hi) of each row, BLOCK_L at a time: the max m and
    s = sum exp(x - m), s rescaled by exp(m_old - m_new) when the max grows. A row that saw only
    -inf ends with m = -inf, s = 0."""
    m = tl.full((BLOCK_R,), float("-inf"), COMPUTE_DTYPE)
    s = tl.zeros((BLOCK_R,), COMPUTE_DTYPE)
    for d in range(0, tl.cast(hi - lo, tl.int64), BLOCK_L):  # int64: d + BLOCK_L may pass 2^31
        offs, mask = _chunk(base, mask_r, lo + d, hi, INNER, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(COMPUTE_DTYPE)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # While a row has seen only -inf, shift by 0 so exp(-inf - 0) = 0 (not exp(NaN)).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    return m, s


@triton.jit
def _write_y(x_ptr, y_ptr, base, mask_r, lo, hi, INNER, m, s, LOG: tl.constexpr,
             COMPUTE_DTYPE: tl.constexpr, BLOCK_L: tl.constexpr):
    """y = exp(x - m) / s (or x - m - log s) over positions [lo, hi) of each row, given the row's
    max m and s = sum exp(x - m). A fully -inf row (m = -inf, s = 0) gets NaN, like torch."""
    log_s = tl.log(s)
    inv_s = 1.0 / s
    for d in range(0, tl.cast(hi - lo, tl.int64), BLOCK_L):  # int64: d + BLOCK_L may pass 2^31
        offs, mask = _chunk(base, mask_r, lo + d, hi, INNER, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(COMPUTE_DTYPE)
        shifted = x - m[:, None]
        if LOG:
            y = shifted - log_s[:, None]
        else:
            y = tl.exp(shifted) * inv_s[:, None]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_fwd_streaming_kernel(x_ptr, y_ptr, R, L, INNER, LOG: tl.constexpr,
                                 COMPUTE_DTYPE: tl.constexpr,
                                 STRIDED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Streaming: rows of any length L, BLOCK_L positions at a time. Pass 1 keeps the running max
    m and s = sum exp(x - m) (``_max_sum``); pass 2 writes y (``_write_y``)."""
    base, _, mask_r = _row_offsets(tl.program_id(0), R, L, INNER, STRIDED, BLOCK_R)
    m, s = _max_sum(x_ptr, base, mask_r, 0, L, INNER, COMPUTE_DTYPE, BLOCK_R, BLOCK_L)
    _write_y(x_ptr, y_ptr, base, mask_r, 0, L, INNER, m, s, LOG, COMPUTE_DTYPE, BLOCK_L)


@triton.jit
def softmax_bwd_kernel(dy_ptr, y_ptr, dx_ptr, R, L, INNER, LOG: tl.constexpr,
                       COMPUTE_DTYPE: tl.constexpr,
                       STRIDED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Single pass backward (ATen's formulas), y = the forward's output:
    softmax:      dx = y * (dy - sum(dy * y))
    log_softmax:  dx = dy - exp(y) * sum(dy)"""
    base, _, mask_r = _row_offsets(tl.program_id(0), R, L, INNER, STRIDED, BLOCK_R)
    offs_l = tl.arange(0, BLOCK_L)
    offs = base[:, None] + offs_l.to(tl.int64)[None, :] * INNER
    mask = mask_r[:, None] & (offs_l < L)[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    if LOG:
        s = tl.sum(dy, axis=1)
        dx = dy - tl.exp(y) * s[:, None]
    else:
        s = tl.sum(dy * y, axis=1)
        dx = y * (dy - s[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sum(dy_ptr, y_ptr, base, mask_r, lo, hi, INNER, LOG: tl.constexpr,
              COMPUTE_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """sum(dy * y) (softmax) or sum(dy) (log_softmax) over positions [lo, hi) of each row."""
    s = tl.zeros((BLOCK_R,), COMPUTE_DTYPE)
    for d in range(0, tl.cast(hi - lo, tl.int64), BLOCK_L):  # int64: d + BLOCK_L may pass 2^31
        offs, mask = _chunk(base, mask_r, lo + d, hi, INNER, BLOCK_L)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        if LOG:
            s += tl.sum(dy, axis=1)
        else:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            s += tl.sum(dy * y, axis=1)
    return s


@triton.jit
def _write_dx(dy_ptr, y_ptr, dx_ptr, base, mask_r, lo, hi, INNER, s, LOG: tl.constexpr,
              COMPUTE_DTYPE: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx over positions [lo, hi) of each row with the formulas of softmax_bwd_kernel, given the
    row's sum s (``_grad_sum`` over the whole row)."""
    for d in range(0, tl.cast(hi - lo, tl.int64), BLOCK_L):  # int64: d + BLOCK_L may pass 2^31
        offs, mask = _chunk(base, mask_r, lo + d, hi, INNER, BLOCK_L)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        if LOG:
            dx = dy - tl.exp(y) * s[:, None]
        else:
            dx = y * (dy - s[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_bwd_streaming_kernel(dy_ptr, y_ptr, dx_ptr, R, L, INNER, LOG: tl.constexpr,
                                 COMPUTE_DTYPE: tl.constexpr,
                                 STRIDED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Streaming backward: pass 1 accumulates sum(dy * y) (softmax) or sum(dy) (log_softmax)
    over chunks of BLOCK_L; pass 2 writes dx with the formulas of softmax_bwd_kernel."""
    base, _, mask_r = _row_offsets(tl.program_id(0), R, L, INNER, STRIDED, BLOCK_R)
    s = _grad_sum(dy_ptr, y_ptr, base, mask_r, 0, L, INNER, LOG, COMPUTE_DTYPE, BLOCK_R, BLOCK_L)
    _write_dx(dy_ptr, y_ptr, dx_ptr, base, mask_r, 0, L, INNER, s, LOG, COMPUTE_DTYPE, BLOCK_L)


# ----------------------------------------------------------------------------- split rows
# Program (t, j) of a split launch handles segment j, positions [j * SEG, min((j + 1) * SEG, L)),
# of the rows of tile t (the tiles of the streaming path). Kernel 1 writes per (row, segment)
# partials into part (R, S) arrays; kernel 2 combines the S partials of its rows in its prologue
# (a fixed order: deterministic) and writes its segment.
@triton.jit
def _segment(L, SEG):
    lo = tl.program_id(1).to(tl.int64) * SEG  # (split_plan keeps segments * SEG < 2^31; int64 anyway)
    return lo, tl.minimum(lo + SEG, L)


@triton.jit
def _partials(part_ptr, rows, mask_r, S, BLOCK_S: tl.constexpr):
    """Offsets and mask of the S partials of each row of the tile in an (R, S) array."""
    offs_s = tl.arange(0, BLOCK_S)
    offs = rows[:, None] * S + offs_s[None, :]
    return part_ptr + offs, mask_r[:, None] & (offs_s < S)[None, :]


@triton.jit
def softmax_fwd_split_stats_kernel(x_ptr, part_ptr, R, L, INNER, SEG, S,
                                   COMPUTE_DTYPE: tl.constexpr, STRIDED: tl.constexpr,
                                   BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Split forward, kernel 1 (grid (tiles, S)): the segment's max m and s = sum exp(x - m), into
    part[0] and part[1], two (R, S) arrays of COMPUTE_DTYPE (part[1] at part_ptr + R * S)."""
    base, rows, mask_r = _row_offsets(tl.program_id(0), R, L, INNER, STRIDED, BLOCK_R)
    lo, hi = _segment(L, SEG)
    m, s = _max_sum(x_ptr, base, mask_r, lo, hi, INNER, COMPUTE_DTYPE, BLOCK_R, BLOCK_L)
    out = rows * S + tl.program_id(1)
    tl.store(part_ptr + out, m, mask=mask_r)
    tl.store(part_ptr + R * S + out, s, mask=mask_r)


@triton.jit
def softmax_fwd_split_kernel(x_ptr, y_ptr, part_ptr, R, L, INNER, SEG, S, LOG: tl.constexpr,
                             COMPUTE_DTYPE: tl.constexpr, STRIDED: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr):
    """Split forward, kernel 2 (grid (tiles, S)): the row's max M = max m_j and sum
    sum_j s_j exp(m_j - M) from the S partials (BLOCK_S >= S), then y over the segment."""
    base, rows, mask_r = _row_offsets(tl.program_id(0), R, L, INNER, STRIDED, BLOCK_R)
    ptrs, pmask = _partials(part_ptr, rows, mask_r, S, BLOCK_S)
    m_j = tl.load(ptrs, mask=pmask, other=float("-inf"))
    s_j = tl.load(ptrs + R * S, mask=pmask, other=0.0)
    m = tl.max(m_j, axis=1)
    # Segments (and rows) of only -inf have s_j = 0: shift by 0 there, not by -inf (NaN).
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(s_j * tl.exp(m_j - m_safe[:, None]), axis=1)
    lo, hi = _segment(L, SEG)
    _write_y(x_ptr, y_ptr, base, mask_r, lo, hi, INNER, m, s, LOG, COMPUTE_DTYPE, BLOCK_L)


@triton.jit
def softmax_bwd_split_stats_kernel(dy_ptr, y_ptr, part_ptr, R, L, INNER, SEG, S, LOG: tl.constexpr,
                                   COMPUTE_DTYPE: tl.constexpr, STRIDED: tl.constexpr,
                                   BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Split backward, kernel 1 (grid (tiles, S)): the segment's sum(dy * y) (sum(dy) for
    log_softmax) into part, an (R, S) array of COMPUTE_DTYPE."""
    base, rows, mask_r = _row_offsets(tl.program_id(0), R, L, INNER, STRIDED, BLOCK_R)
    lo, hi = _segment(L, SEG)
    s = _grad_sum(dy_ptr, y_ptr, base, mask_r, lo, hi, INNER, LOG, COMPUTE_DTYPE, BLOCK_R, BLOCK_L)
    tl.store(part_ptr + rows * S + tl.program_id(1), s, mask=mask_r)


@triton.jit
def softmax_bwd_split_kernel(dy_ptr, y_ptr, dx_ptr, part_ptr, R, L, INNER, SEG, S, LOG: tl.constexpr,
                             COMPUTE_DTYPE: tl.constexpr, STRIDED: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr):
    """Split backward, kernel 2 (grid (tiles, S)): the row's sum of its S partials, then dx over
    the segment."""
    base, rows, mask_r = _row_offsets(tl.program_id(0), R, L, INNER, STRIDED, BLOCK_R)
    ptrs, pmask = _partials(part_ptr, rows, mask_r, S, BLOCK_S)
    s = tl.sum(tl.load(ptrs, mask=pmask, other=0.0), axis=1)
    lo, hi = _segment(L, SEG)
    _write_dx(dy_ptr, y_ptr, dx_ptr, base, mask_r, lo, hi, INNER, s, LOG, COMPUTE_DTYPE, BLOCK_L)
