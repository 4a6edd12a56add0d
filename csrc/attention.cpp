// Fused scaled-dot-product attention for the CPU: out = softmax(scale q k^T [causal]) v, and its
// backward, without the (L, S) probabilities in memory (one row block's scores at a time).
//
// Built for small head dims (D <= 64), where PyTorch's CPU flash attention runs thin GEMMs (K = D)
// and spends most of its time around them. Here one block of R = 4 query rows walks the keys:
//   scores   s[r, j] = q_r . k_j          keys 16 (fp32) at a time from k transposed (D, S):
//                                         per key block D vector loads, R*D broadcast FMAs
//   softmax  two passes over the block's scores in L1 (max, then exp and sum)
//   output   o_r = sum_j p[r, j] v_j / l_r  per key: D/16 vector loads, R*D/16 FMAs
// Causal rows stop at their diagonal (no masked work beyond the block's last row).
// Backward (FlashAttention-2's equations): with delta_r = dout_r . o_r (= sum_j p dp), per row block
//   p = exp(scale s - lse), dp = dout_r . v_j (v transposed), ds = p (dp - delta_r),
//   dq_r = scale sum_j ds[r, j] k_j, dk_j += scale sum_r ds[r, j] q_r, dv_j += sum_r p[r, j] dout_r
// with dk, dv accumulated in fp32 (fp64) buffers of (S, D) per thread.
//
// Layout: (B, H, rows, D) operands with any strides on the leading dims, D contiguous. Work is split
// by (batch, head): the forward over (b, h, row block) items in contiguous ranges per thread (each
// thread transposes k and converts v once per (b, h) it meets), the backward over (b, h) (its dk /
// dv sums stay in one thread: no atomics, deterministic). Flops: 4 L S D (2 L S D causal) forward,
// 2.5x that backward; bytes: the operands once per (b, h) and thread.
#include <cmath>
#include <limits>
#include <vector>

#include "activations.h"
#include "attention.h"

namespace fl {

namespace {

constexpr int R = 4;  // query rows per block

template <class V> static inline auto hmax(V v) {
  auto m = v[0];
  for (int i = 1; i < (int)(sizeof(V) / sizeof(v[0])); ++i) m = (v[i] > m || v[i] != v[i]) ? v[i] : m;
  return m;
}

template <class C> static inline C neg_inf() { return -std::numeric_limits<C>::infinity(); }

// v with the lanes of keys j + l >= n replaced by `fill` (a key vector starting at j).
static inline vf keys_below(vf v, int64_t j, int64_t n, float fill) {
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return lane < (int32_t)std::min<int64_t>(n - j, 16) ? v : splat<vf>(fill);
}
static inline vd keys_below(vd v, int64_t j, int64_t n, double fill) {
  const vl lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return lane < std::min<int64_t>(n - j, 8) ? v : splat<vd>(fill);
}

// exp(d), d <= 0 (masked keys: -inf), results below exp(-87) flushed to 0: a subnormal or an
// underflowing vscalefps costs a microcode assist (~150 cycles), and every causal row's last key
// vector has masked lanes (measured: 43% of the forward's time in that one instruction). A flushed
// probability is below 1.6e-38 of the row's largest.
static inline vd vexp_nonpos_any(vd d) { return vexp(d); }
static inline vf vexp_nonpos_any(vf d) { return vexp_nonpos_flush(d); }

// Per-thread scratch of one (b, h): k transposed and v (and for the backward k, v transposed) in C.
template <class T>
struct KV {
  using C = typename io<T>::C;
  static constexpr int W = io<T>::W;
  int64_t S, D, Sp, Dp;  // Sp, Dp: S and D rounded up to whole vectors (zero padding)
  std::vector<C> kt, vt, kr, vr;  // (D, Sp) transposed; (S, Dp) rows
  KV(int64_t S_, int64_t D_, bool backward)
      : S(S_), D(D_), Sp((S_ + W - 1) / W * W), Dp((D_ + W - 1) / W * W),
        kt((size_t)D_ * Sp, C(0)), vt(backward ? (size_t)D_ * Sp : 0, C(0)),
        kr(backward ? (size_t)S_ * Dp : 0, C(0)), vr((size_t)S_ * Dp, C(0)) {}
  static C at(const T* p) {
    if constexpr (std::is_same_v<T, bf16>) { uint32_t u = (uint32_t)p->bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
    else return (C)*p;
  }
  // Loads (b, h)'s keys and values; returns whether they are all finite.
  bool load(const AttnOperand<const T>& k, const AttnOperand<const T>& v, int64_t b, int64_t h) {
    bool finite = true;
    for (int64_t j = 0; j < S; ++j) {
      const T* kj = k.row(b, h, j);
      const T* vj = v.row(b, h, j);
      for (int64_t d = 0; d < D; ++d) {
        C kv = at(kj + d), vv = at(vj + d);
        finite &= std::isfinite(kv) & std::isfinite(vv);
        kt[d * Sp + j] = kv;
        vr[j * Dp + d] = vv;
        if (!vt.empty()) { vt[d * Sp + j] = vv; kr[j * Dp + d] = kv; }
      }
    }
    return finite;
  }
};

// Row r's scores against the keys j < jend at s[r * ls + j]: scale * q_r . k_j, from the transposed
// keys kt (D, Sp). q: R rows of D values in C, lq apart (rows past `rows` unused). Keys j >= m[r] (causal, and
// the zero padding past S) are masked: -inf, or with `add` (Mask below) score + -inf, as PyTorch's
// math adds its mask (NaN where the score is NaN or +inf). m null: nothing masked. Each row's max in
// mx. Two key vectors at a time: 2R independent FMA chains (R alone would wait on the FMA latency).
template <class C, class V, int W>
static inline void block_scores(const C* q, int64_t lq, int64_t D, const C* kt, int64_t S, int64_t Sp, int64_t jend,
                                const int64_t* m, bool add, int rows, C scale, C* s, int64_t ls, C* mx) {
  V vmx[R];
  for (int r = 0; r < R; ++r) vmx[r] = splat<V>(neg_inf<C>());
  auto finish = [&](int64_t j, const V* acc) {
    for (int r = 0; r < rows; ++r) {
      V sv = acc[r] * scale;
      if (m && j + W > m[r]) {
        if (add) {
          sv += keys_below(V{}, j, m[r], neg_inf<C>());
          if (j + W > S) sv = keys_below(sv, j, S, neg_inf<C>());  // the padding (inf * 0 there is NaN)
        } else {
          sv = keys_below(sv, j, m[r], neg_inf<C>());
        }
      }
      std::memcpy(s + r * ls + j, &sv, sizeof sv);
      vmx[r] = (sv > vmx[r] || sv != sv) ? sv : vmx[r];
    }
  };
  int64_t j = 0;
  for (; j + W < jend; j += 2 * W) {
    V a0[R] = {}, a1[R] = {};
    const C* col = kt + j;
    for (int64_t d = 0; d < D; ++d) {
      V k0, k1;
      std::memcpy(&k0, col + d * Sp, sizeof k0);
      std::memcpy(&k1, col + d * Sp + W, sizeof k1);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const C qr = q[r * lq + d];
        a0[r] += qr * k0;
        a1[r] += qr * k1;
      }
    }
    finish(j, a0);
    finish(j + W, a1);
  }
  if (j < jend) {
    V a0[R] = {};
    const C* col = kt + j;
    for (int64_t d = 0; d < D; ++d) {
      V k0;
      std::memcpy(&k0, col + d * Sp, sizeof k0);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a0[r] += q[r * lq + d] * k0;
    }
    finish(j, a0);
  }
  for (int r = 0; r < rows; ++r) mx[r] = hmax(vmx[r]);
}

// sum_j w[r, j] x_j for j < n[r] into out (R rows of Dp values), x: (S, Dp) rows. Rows share the
// loads of x_j up to the shortest row; the rest row by row (weights of keys a row does not see are
// never multiplied, so an inf there cannot make a NaN). NV vectors of columns at a time (the
// accumulators stay in registers: R * NV <= 16).
template <int NV, class C, class V, int W>
static inline void combine_cols(const C* w, int64_t lw, const C* x, int64_t Dp, const int64_t* n, int64_t nmin,
                                int rows, C* out) {
  V acc[R][NV], odd[R][NV];  // odd keys' sums apart: twice the independent FMA chains
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = odd[r][c] = V{};
  int64_t j = 0;
  for (; NV <= 2 && j + 1 < nmin; j += 2) {  // (NV > 2: R * NV chains already, no registers to spare)
    V x0[NV], x1[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) {
      std::memcpy(&x0[c], x + j * Dp + c * W, sizeof(V));
      std::memcpy(&x1[c], x + (j + 1) * Dp + c * W, sizeof(V));
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const C w0 = w[r * lw + j], w1 = w[r * lw + j + 1];
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) {
        acc[r][c] += w0 * x0[c];
        odd[r][c] += w1 * x1[c];
      }
    }
  }
  for (; j < nmin; ++j) {
    V xv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) std::memcpy(&xv[c], x + j * Dp + c * W, sizeof(V));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const C wr = w[r * lw + j];
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] += wr * xv[c];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] += odd[r][c];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
    for (int64_t j = nmin; j < n[r]; ++j) {
      const C wr = w[r * lw + j];
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) {
        V xv;
        std::memcpy(&xv, x + j * Dp + c * W, sizeof xv);
        acc[r][c] += wr * xv;
      }
    }
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) std::memcpy(out + r * Dp + c * W, &acc[r][c], sizeof(V));
  }
}

template <class C, class V, int W>
static inline void block_combine(const C* w, int64_t lw, const C* x, int64_t Dp, const int64_t* n, int rows,
                                 C* out) {
  int64_t nmin = n[0];
  for (int r = 1; r < rows; ++r) nmin = std::min(nmin, n[r]);
  for (int64_t d0 = 0; d0 < Dp; d0 += 4 * W) {
    switch (std::min<int64_t>(4, (Dp - d0) / W)) {
      case 1: combine_cols<1, C, V, W>(w, lw, x + d0, Dp, n, nmin, rows, out + d0); break;
      case 2: combine_cols<2, C, V, W>(w, lw, x + d0, Dp, n, nmin, rows, out + d0); break;
      case 3: combine_cols<3, C, V, W>(w, lw, x + d0, Dp, n, nmin, rows, out + d0); break;
      default: combine_cols<4, C, V, W>(w, lw, x + d0, Dp, n, nmin, rows, out + d0); break;
    }
  }
}

// dk_j += sc sum_r ds[r, j] q_r and dv_j += sum_r p[r, j] dout_r for the keys j < jend, over the
// rows r that see key j (j < n[r]); q, dout: R rows of Dp values (zeros past `rows`); ds, p: R rows
// of ls values. NV vectors of columns at a time, the block's rows of q and dout in registers.
template <int NV, class C, class V, int W>
static inline void scatter_cols(const C* ds, const C* p, int64_t ls, const C* q, const C* dout, int64_t Dp,
                                const int64_t* n, int64_t nmin, int64_t jend, int rows, C sc, C* dk, C* dv) {
  V qv[R][NV], ov[R][NV];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int c = 0; c < NV; ++c) {
      std::memcpy(&qv[r][c], q + r * Dp + c * W, sizeof(V));
      std::memcpy(&ov[r][c], dout + r * Dp + c * W, sizeof(V));
    }
  auto key = [&](int64_t j, auto&& sees) {
    V tk[NV] = {}, tv[NV] = {};
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      if (!sees(r)) continue;
      const C a = ds[r * ls + j], b = p[r * ls + j];
#pragma GCC unroll 2
      for (int c = 0; c < NV; ++c) {
        tk[c] += a * qv[r][c];
        tv[c] += b * ov[r][c];
      }
    }
#pragma GCC unroll 2
    for (int c = 0; c < NV; ++c) {
      V ak, av;
      std::memcpy(&ak, dk + j * Dp + c * W, sizeof ak);
      std::memcpy(&av, dv + j * Dp + c * W, sizeof av);
      ak += tk[c] * sc;
      av += tv[c];
      std::memcpy(dk + j * Dp + c * W, &ak, sizeof ak);
      std::memcpy(dv + j * Dp + c * W, &av, sizeof av);
    }
  };
  if (rows == R)
    for (int64_t j = 0; j < nmin; ++j) key(j, [](int) { return true; });
  else
    nmin = 0;
  for (int64_t j = nmin; j < jend; ++j) key(j, [&](int r) { return r < rows && j < n[r]; });
}

template <class C, class V, int W>
static inline void block_scatter(const C* ds, const C* p, int64_t ls, const C* q, const C* dout, int64_t Dp,
                                 const int64_t* n, int64_t jend, int rows, C sc, C* dk, C* dv) {
  int64_t nmin = n[0];
  for (int r = 1; r < rows; ++r) nmin = std::min(nmin, n[r]);
  for (int64_t d0 = 0; d0 < Dp; d0 += 2 * W) {
    if (Dp - d0 >= 2 * W)
      scatter_cols<2, C, V, W>(ds, p, ls, q + d0, dout + d0, Dp, n, nmin, jend, rows, sc, dk + d0, dv + d0);
    else
      scatter_cols<1, C, V, W>(ds, p, ls, q + d0, dout + d0, Dp, n, nmin, jend, rows, sc, dk + d0, dv + d0);
  }
}

// The block's query rows (scaled by nothing) in C: q (R, D); rows past `rows` are zeros.
template <class T, class C>
static inline void load_rows(const AttnOperand<const T>& x, int64_t b, int64_t h, int64_t i0, int rows, int64_t D,
                             C* out, int64_t ld) {
  for (int r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) out[r * ld + d] = r < rows ? KV<T>::at(x.row(b, h, i0 + r) + d) : C(0);
}

template <class T>
static inline void store_row(T* dst, const typename io<T>::C* src, int64_t D) {
  constexpr int W = io<T>::W;
  for (int64_t d = 0; d < D; d += W) {
    typename io<T>::V v;
    std::memcpy(&v, src + d, sizeof v);  // src is padded to whole vectors
    store_k(dst + d, v, std::min<int64_t>(W, D - d));
  }
}

// Whether rows [0, L) of x's (b, h) are all finite (exact mode also looks at q -- an inf there can
// make a masked score +inf, and +inf + -inf NaN -- and, in the backward, at dout: a NaN there
// reaches every key through PyTorch's masked 0 * NaN).
template <class T>
static bool rows_finite(const AttnOperand<const T>& x, int64_t b, int64_t h, int64_t L, int64_t D) {
  bool finite = true;
  for (int64_t i = 0; i < L; ++i) {
    const T* xi = x.row(b, h, i);
    for (int64_t d = 0; d < D; ++d) finite &= std::isfinite(KV<T>::at(xi + d));
  }
  return finite;
}

// Keys row i sees: causal top-left (j <= i), else all.
static inline int64_t keys_of(int64_t i, int64_t S, bool causal) { return causal ? std::min(S, i + 1) : S; }

// The block's rows from i0: n[r] = the keys its loops visit, m[r] = the first key masked (padding
// past S included). Causal rows visit only the keys they see -- except in `exact` mode, taken for a
// (b, h) whose keys or values are not all finite: there every row visits all S keys and the masked
// ones get score + -inf, as PyTorch's math path computes them, so an inf / NaN in a query, key or
// value past a row's diagonal makes NaN where PyTorch's does (0 * inf, +inf + -inf). Rows past the
// last (r >= rows) repeat the last row's.
static inline void keys(int64_t i0, int rows, int64_t S, bool causal, bool exact, int64_t* n, int64_t* m) {
  for (int r = 0; r < R; ++r) {
    m[r] = keys_of(i0 + std::min(r, rows - 1), S, causal);
    n[r] = exact ? S : m[r];
  }
}

}  // namespace

template <class T>
void attention_forward(const AttnOperand<const T>& q, const AttnOperand<const T>& k, const AttnOperand<const T>& v,
                       const AttnOperand<T>& o, typename io<T>::C* lse, int64_t B, int64_t H, int64_t L, int64_t S,
                       int64_t D, double scale, bool causal, int nthreads) {
  using C = typename io<T>::C;
  using V = typename io<T>::V;
  constexpr int W = io<T>::W;
  const int64_t nblk = (L + R - 1) / R;
  const int64_t cost = std::max<int64_t>(1, R * (causal ? (S + 1) / 2 : S) * D);
  parallel_for(B * H * nblk, cost, nthreads, [&](int64_t it0, int64_t it1, int) {
    KV<T> kv(S, D, false);
    std::vector<C> qf((size_t)R * D), s((size_t)R * kv.Sp), acc((size_t)R * kv.Dp);
    int64_t cur = -1;
    bool exact = false;
    for (int64_t it = it0; it < it1; ++it) {
      const int64_t bh = it / nblk, b = bh / H, h = bh % H, i0 = (it % nblk) * R;
      if (bh != cur) {
        const bool finite = kv.load(k, v, b, h) && rows_finite(q, b, h, L, D);  // (always loads)
        exact = causal && !finite;
        cur = bh;
      }
      const int rows = (int)std::min<int64_t>(R, L - i0);
      int64_t n[R], m[R];
      keys(i0, rows, S, causal, exact, n, m);
      const int64_t jend = n[rows - 1];
      load_rows<T, C>(q, b, h, i0, rows, D, qf.data(), D);
      C mx[R];
      block_scores<C, V, W>(qf.data(), D, D, kv.kt.data(), S, kv.Sp, jend, m, exact, rows, (C)scale, s.data(), kv.Sp,
                            mx);
      C inv[R];
      for (int r = 0; r < rows; ++r) {  // p = exp(s - max) in place, l = sum p
        C* sr = s.data() + r * kv.Sp;
        // a row whose scores are all -inf: output 0, lse -inf (PyTorch's safe softmax; not NaN)
        const C mxr = mx[r] == neg_inf<C>() ? C(0) : mx[r];
        V sum{};
        for (int64_t j = 0; j < n[r]; j += W) {
          V x;
          std::memcpy(&x, sr + j, sizeof x);
          V p = vexp_nonpos_any(x - mxr);
          if (j + W > n[r]) p = keys_below(p, j, n[r], C(0));
          std::memcpy(sr + j, &p, sizeof p);
          sum += p;
        }
        const C l = (C)hsum(sum);
        inv[r] = l == C(0) ? C(0) : C(1) / l;
        lse[bh * L + i0 + r] = mxr + std::log(l);
      }
      block_combine<C, V, W>(s.data(), kv.Sp, kv.vr.data(), kv.Dp, n, rows, acc.data());
      for (int r = 0; r < rows; ++r) {
        C* ar = acc.data() + r * kv.Dp;
        for (int64_t d = 0; d < kv.Dp; ++d) ar[d] *= inv[r];
        store_row<T>(o.row(b, h, i0 + r), ar, D);
      }
    }
  });
}

template <class T>
void attention_backward(const AttnOperand<const T>& q, const AttnOperand<const T>& k, const AttnOperand<const T>& v,
                        const AttnOperand<const T>& o, const AttnOperand<const T>& dout,
                        const typename io<T>::C* lse, const AttnOperand<T>& dq, const AttnOperand<T>& dk,
                        const AttnOperand<T>& dv, int64_t B, int64_t H, int64_t L, int64_t S, int64_t D,
                        double scale, bool causal, int nthreads) {
  using C = typename io<T>::C;
  using V = typename io<T>::V;
  constexpr int W = io<T>::W;
  constexpr bool kLowT = std::is_same_v<T, bf16> || std::is_same_v<T, f16>;
  const C sc = (C)scale;
  const int64_t cost = std::max<int64_t>(1, L * (causal ? (S + 1) / 2 : S) * D * 5 / 2);
  parallel_for(B * H, cost, nthreads, [&](int64_t bh0, int64_t bh1, int) {
    KV<T> kv(S, D, true);
    const int64_t Sp = kv.Sp, Dp = kv.Dp;
    std::vector<C> qf((size_t)R * Dp), df((size_t)R * Dp), p((size_t)R * Sp), ds((size_t)R * Sp),
        acc((size_t)R * Dp), dkacc((size_t)S * Dp), dvacc((size_t)S * Dp);
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const bool finite = kv.load(k, v, b, h) && rows_finite(q, b, h, L, D) && rows_finite(dout, b, h, L, D);
      const bool exact = causal && !finite;
      std::fill(dkacc.begin(), dkacc.end(), C(0));
      std::fill(dvacc.begin(), dvacc.end(), C(0));
      for (int64_t i0 = 0; i0 < L; i0 += R) {
        const int rows = (int)std::min<int64_t>(R, L - i0);
        int64_t n[R], m[R];
        keys(i0, rows, S, causal, exact, n, m);
        const int64_t jend = n[rows - 1];
        load_rows<T, C>(q, b, h, i0, rows, D, qf.data(), Dp);
        load_rows<T, C>(dout, b, h, i0, rows, D, df.data(), Dp);
        C lr[R], mx[R], delta[R];
        for (int r = 0; r < rows; ++r) {
          if constexpr (!kLowT) {  // delta = dout . out (D terms; 16-bit T: from p and dp, below)
            C dsum = 0;
            const T* orow = o.row(b, h, i0 + r);
            for (int64_t d = 0; d < D; ++d) dsum += df[r * Dp + d] * KV<T>::at(orow + d);
            delta[r] = dsum;
          }
          lr[r] = lse[bh * L + i0 + r];
          if (lr[r] == neg_inf<C>()) lr[r] = -neg_inf<C>();  // an all -inf row: p = exp(s - inf) = 0
        }
        // scores into p, dp = dout . v_j into ds (qf, df rows are Dp apart)
        block_scores<C, V, W>(qf.data(), Dp, D, kv.kt.data(), S, Sp, jend, m, exact, rows, sc, p.data(), Sp, mx);
        block_scores<C, V, W>(df.data(), Dp, D, kv.vt.data(), S, Sp, jend, exact ? nullptr : m, false, rows, C(1),
                              ds.data(), Sp, mx);
        // p = exp(scale s - lse) (0 past row r's keys), then ds = p (dp - delta). For 16-bit T, delta =
        // sum_j p dp: the row's dout . out without out's rounding to T (dp - delta cancels: a delta
        // from the bf16 output made dq one bf16 ulp off where PyTorch's was not); fp32 / fp64 keep
        // dout . out (D terms: more accurate than a sum over S keys)
        for (int r = 0; r < rows; ++r) {
          C* pr = p.data() + r * Sp;
          C* dr = ds.data() + r * Sp;
          V dsum{};
          for (int64_t j = 0; j < jend; j += W) {
            V x, dpv;
            std::memcpy(&x, pr + j, sizeof x);
            std::memcpy(&dpv, dr + j, sizeof dpv);
            V pv = vexp_nonpos_any(x - lr[r]);
            if (j + W > n[r]) {
              pv = keys_below(pv, j, n[r], C(0));
              dpv = keys_below(dpv, j, n[r], C(0));
              std::memcpy(dr + j, &dpv, sizeof dpv);
            }
            dsum += pv * dpv;
            std::memcpy(pr + j, &pv, sizeof pv);
          }
          if constexpr (kLowT) delta[r] = (C)hsum(dsum);
          for (int64_t j = 0; j < jend; j += W) {
            V pv, dpv;
            std::memcpy(&pv, pr + j, sizeof pv);
            std::memcpy(&dpv, dr + j, sizeof dpv);
            V dsv = pv * (dpv - delta[r]);
            std::memcpy(dr + j, &dsv, sizeof dsv);
          }
        }
        // dq_r = scale sum_j ds[r, j] k_j
        block_combine<C, V, W>(ds.data(), Sp, kv.kr.data(), Dp, n, rows, acc.data());
        for (int r = 0; r < rows; ++r) {
          C* ar = acc.data() + r * Dp;
          for (int64_t d = 0; d < Dp; ++d) ar[d] *= sc;
          store_row<T>(dq.row(b, h, i0 + r), ar, D);
        }
        // dk_j += scale sum_r ds[r, j] q_r, dv_j += sum_r p[r, j] dout_r (rows that see key j)
        block_scatter<C, V, W>(ds.data(), p.data(), Sp, qf.data(), df.data(), Dp, n, jend, rows, sc, dkacc.data(),
                               dvacc.data());
      }
      for (int64_t j = 0; j < S; ++j) {
        store_row<T>(dk.row(b, h, j), dkacc.data() + j * Dp, D);
        store_row<T>(dv.row(b, h, j), dvacc.data() + j * Dp, D);
      }
    }
  });
}

#define FL_INSTANTIATE(T)                                                                                    \
  template void attention_forward<T>(const AttnOperand<const T>&, const AttnOperand<const T>&,               \
                                     const AttnOperand<const T>&, const AttnOperand<T>&, io<T>::C*, int64_t, \
                                     int64_t, int64_t, int64_t, int64_t, double, bool, int);                 \
  template void attention_backward<T>(const AttnOperand<const T>&, const AttnOperand<const T>&,              \
                                      const AttnOperand<const T>&, const AttnOperand<const T>&,              \
                                      const AttnOperand<const T>&, const io<T>::C*, const AttnOperand<T>&,   \
                                      const AttnOperand<T>&, const AttnOperand<T>&, int64_t, int64_t,        \
                                      int64_t, int64_t, int64_t, double, bool, int);
FL_INSTANTIATE(float)
FL_INSTANTIATE(double)
FL_INSTANTIATE(bf16)
FL_INSTANTIATE(f16)

}  // namespace fl
