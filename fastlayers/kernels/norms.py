"""RMSNorm / LayerNorm kernels with the residual add, forward and backward.

Layout: x, residual, s (= x + residual), y, dy, ds, dx are (M, N) contiguous; w, b (N,); mean,
rstd (M,) in the compute dtype (COMPUTE_DTYPE: fp32 for fp16/bf16/fp32 data, fp64 for fp64).
KIND: 0 = F.rms_norm (weight applied in the compute dtype, one rounding), 1 = Hugging Face
LlamaRMSNorm (normalised row rounded to the data dtype, then * weight, rounded again),
2 = F.layer_norm.

Forward (``norm_fwd_kernel``): one program per row. Rows of N <= BLOCK_N (ONE_BLOCK) sit in
registers: read x [and residual] once, write s [and y] once. Longer rows loop over chunks of
BLOCK_N: pass 1 writes s and sums (sum or sum of squares), pass 2 (layer only) the centred sum of
squares, pass 3 writes y; the re-reads come from L2 for rows of a few hundred KB.
    Bytes: reads (1|2) * M*N + 2N, writes (1|2) * M*N + 8M (ONE_BLOCK; + up to 2 re-reads per
    element from L2 for long rows). ~5 flops per element.
Backward (``norm_bwd_kernel``): program p owns rows [p * ROWS, (p + 1) * ROWS); per row,
c1 = mean(dxhat), c2 = mean(dxhat * xhat) with dxhat = dy * w, then
dx = rstd * (dxhat - c1 - xhat * c2) [+ ds]; the weight / bias gradients' partial sums over the
program's rows go to row p of the (P, N) fp32/fp64 workspaces (kept in registers for ONE_BLOCK;
read-modify-written by the owning program otherwise), reduced afterwards in a fixed order by
linear_act's sum_rows_kernel (deterministic, no atomics).
    Bytes: reads (2|3) * M*N (+ one L2 re-read of dy and src for long rows), writes M*N + 2*P*N.
"""
import triton
import triton.language as tl

# Longest row held in registers by one program (fp64: half); longer rows loop over chunks of it.
ONE_BLOCK_MAX = 8192
# Chunk of the looped path.
CHUNK = 4096


def plan(n: int, fp64: bool):
    """(one_block, BLOCK_N, num_warps) for rows of n elements."""
    limit = ONE_BLOCK_MAX >> int(fp64)
    block = triton.next_power_of_2(max(n, 1))
    if block <= limit:
        return True, block, max(1, min(16, block // 256))
    return False, CHUNK >> int(fp64), 8


@triton.jit
def _load_sum(x_ptr, res_ptr, s_ptr, offs, mask, HAS_RES: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """x [+ res] at offs, in COMPUTE_DTYPE. The sum is rounded to the data dtype first (eager's
    x + res) and stored to s: reads 1|2, writes 0|1 elements per offset."""
    v = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:
        v = (v.to(COMPUTE_DTYPE) + tl.load(res_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)).to(
            s_ptr.dtype.element_ty)
        tl.store(s_ptr + offs, v, mask=mask)
    return v.to(COMPUTE_DTYPE)


@triton.jit
def _store_y(h, y_ptr, w_ptr, b_ptr, offs, cols, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
             KIND: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """y at offs = h [rounded to the data dtype first for KIND 1] * w [+ b] (w, b at cols), rounded
    to the data dtype: reads 0-2 weight elements, writes 1 element per offset."""
    dtype = y_ptr.dtype.element_ty
    if KIND == 1:
        h = h.to(dtype).to(COMPUTE_DTYPE)
    if HAS_W:
        h = h * tl.load(w_ptr + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    if HAS_B:
        h = h + tl.load(b_ptr + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    tl.store(y_ptr + offs, h.to(dtype), mask=mask)


@triton.jit
def norm_fwd_kernel(x_ptr, res_ptr, s_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, N, eps,
                    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, KIND: tl.constexpr,
                    STORE_STATS: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                    COMPUTE_DTYPE: tl.constexpr):
    """One row per program: y = norm(x [+ res]) * w [+ b]; s = x + res (rounded to the data
    dtype, what is normalised); mean (KIND 2) and rstd per row when STORE_STATS.
    x, res, s, y: (M, N) contiguous; w, b: (N,); eps: float."""
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = cols < N
        v = _load_sum(x_ptr, res_ptr, s_ptr, base + cols, mask, HAS_RES, COMPUTE_DTYPE)
        if KIND == 2:
            mean = tl.sum(v, axis=0) / N
            d = tl.where(mask, v - mean, 0.0)
            var = tl.sum(d * d, axis=0) / N
        else:
            mean = 0.0
            d = v
            var = tl.sum(v * v, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        _store_y(d * rstd, y_ptr, w_ptr, b_ptr, base + cols, cols, mask, HAS_W, HAS_B, KIND, COMPUTE_DTYPE)
    else:
        src_ptr = x_ptr
        if HAS_RES:
            src_ptr = s_ptr
        acc = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)
        for j in range(0, N, BLOCK_N):
            c = j + cols
            mask = c < N
            v = _load_sum(x_ptr, res_ptr, s_ptr, base + c, mask, HAS_RES, COMPUTE_DTYPE)
            if KIND == 2:
                acc += v
            else:
                acc += v * v
        if KIND == 2:
            mean = tl.sum(acc, axis=0) / N
            acc2 = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)
            for j in range(0, N, BLOCK_N):
                c = j + cols
                mask = c < N
                v = tl.load(src_ptr + base + c, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                d = tl.where(mask, v - mean, 0.0)
                acc2 += d * d
            var = tl.sum(acc2, axis=0) / N
        else:
            mean = 0.0
            var = tl.sum(acc, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        for j in range(0, N, BLOCK_N):
            c = j + cols
            mask = c < N
            v = tl.load(src_ptr + base + c, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            _store_y((v - mean) * rstd, y_ptr, w_ptr, b_ptr, base + c, c, mask, HAS_W, HAS_B, KIND, COMPUTE_DTYPE)
    if STORE_STATS:
        if KIND == 2:
            tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)


@triton.jit
def norm_bwd_kernel(dy_ptr, ds_ptr, src_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                    M, N, ROWS,
                    HAS_DS: tl.constexpr, HAS_W: tl.constexpr, KIND: tl.constexpr, NEED_DX: tl.constexpr,
                    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, ONE_BLOCK: tl.constexpr,
                    BLOCK_N: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Rows [pid * ROWS, min(M, (pid + 1) * ROWS)): dx = dnorm/dsrc . dy [+ ds]; this program's
    partial column sums of dy * xhat (xhat rounded to the data dtype for KIND 1) and of dy into
    row pid of dw_part / db_part ((P, N), compute dtype). dy, ds, src, dx: (M, N) contiguous."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    dtype = src_ptr.dtype.element_ty
    r0 = pid * ROWS
    r1 = tl.minimum(r0 + ROWS, M)
    part = pid.to(tl.int64) * N
    if ONE_BLOCK:
        mask = cols < N
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        acc_w = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)
        acc_b = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)
        for r in range(r0, r1):
            base = tl.cast(r, tl.int64) * N
            rstd = tl.load(rstd_ptr + r)
            v = tl.load(src_ptr + base + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            if KIND == 2:
                xh = tl.where(mask, (v - tl.load(mean_ptr + r)) * rstd, 0.0)
            else:
                xh = v * rstd
            g = tl.load(dy_ptr + base + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            dxh = g
            if HAS_W:
                dxh = g * w
            if NEED_DW:
                if KIND == 1:
                    acc_w += g * xh.to(dtype).to(COMPUTE_DTYPE)
                else:
                    acc_w += g * xh
            if NEED_DB:
                acc_b += g
            if NEED_DX:
                c2 = tl.sum(dxh * xh, axis=0) / N
                d = dxh - xh * c2
                if KIND == 2:
                    d = d - tl.sum(dxh, axis=0) / N
                d = d * rstd
                if HAS_DS:
                    d = d + tl.load(ds_ptr + base + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                tl.store(dx_ptr + base + cols, d.to(dtype), mask=mask)
        if NEED_DW:
            tl.store(dw_part_ptr + part + cols, acc_w, mask=mask)
        if NEED_DB:
            tl.store(db_part_ptr + part + cols, acc_b, mask=mask)
    else:
        for j in range(0, N, BLOCK_N):  # zero this program's partial rows
            c = j + cols
            if NEED_DW:
                tl.store(dw_part_ptr + part + c, tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE), mask=c < N)
            if NEED_DB:
                tl.store(db_part_ptr + part + c, tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE), mask=c < N)
        for r in range(r0, r1):
            base = tl.cast(r, tl.int64) * N
            rstd = tl.load(rstd_ptr + r)
            mean = 0.0
            if KIND == 2:
                mean = tl.load(mean_ptr + r)
            a1 = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)
            a2 = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)
            for j in range(0, N, BLOCK_N):
                c = j + cols
                mask = c < N
                v = tl.load(src_ptr + base + c, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                xh = tl.where(mask, (v - mean) * rstd, 0.0)
                g = tl.load(dy_ptr + base + c, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                dxh = g
                if HAS_W:
                    dxh = g * tl.load(w_ptr + c, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                a1 += dxh
                a2 += dxh * xh
                if NEED_DW:
                    pw = tl.load(dw_part_ptr + part + c, mask=mask, other=0.0)
                    if KIND == 1:
                        pw += g * xh.to(dtype).to(COMPUTE_DTYPE)
                    else:
                        pw += g * xh
                    tl.store(dw_part_ptr + part + c, pw, mask=mask)
                if NEED_DB:
                    pb = tl.load(db_part_ptr + part + c, mask=mask, other=0.0)
                    tl.store(db_part_ptr + part + c, pb + g, mask=mask)
            if NEED_DX:
                c1 = tl.sum(a1, axis=0) / N
                c2 = tl.sum(a2, axis=0) / N
                for j in range(0, N, BLOCK_N):
                    c = j + cols
                    mask = c < N
                    v = tl.load(src_ptr + base + c, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                    xh = (v - mean) * rstd
                    g = tl.load(dy_ptr + base + c, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                    dxh = g
                    if HAS_W:
                        dxh = g * tl.load(w_ptr + c, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                    d = dxh - xh * c2
                    if KIND == 2:
                        d = d - c1
                    d = d * rstd
                    if HAS_DS:
                        d = d + tl.load(ds_ptr + base + c, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                    tl.store(dx_ptr + base + c, d.to(dtype), mask=mask)
