// RMSNorm and LayerNorm over the last dim of a row-major (m, n) tensor, with the residual add
// fused in front: forward one pass per row, backward one pass per row (csrc/norms.h).
//
// Parallelism: threads own contiguous blocks of whole rows (parallel_for): no atomics, results
// independent of the schedule. The weight / bias gradients are column sums over rows, made per
// thread in two stages (fp32 blocks of 16 rows, then fp64, ColumnSums in common.h) and added in
// thread order at the end: deterministic.
//
// A row (n elements, in L1/L2 for n up to tens of thousands) is read from memory once per
// direction; the later passes over it re-read it from cache:
//   forward:  [res: s = x + res, stored, rounded to T] -> sums (fp32 blocks of 256, then fp64)
//             -> (LAYER: centred sum of squares) -> y written once.
//             Bytes: reads (1 or 2) * m*n + 2n, writes (1 or 2) * m*n + stats.
//   backward: pass 1 reads dy, src: c1 = mean(dxhat), c2 = mean(dxhat * xhat) with
//             dxhat = dy * w, and the dw / db partial sums; pass 2 (from cache) writes
//             dx = rstd * (dxhat - c1 - xhat * c2) [+ ds].
//             Bytes: reads (2 or 3) * m*n + n, writes m*n (+ 2n).
// Statistics: rstd = 1 / sqrt(mean(x^2) + eps) (RMS) or 1 / sqrt(var + eps) (LAYER, biased var,
// two passes: mean, then sum (x - mean)^2: no cancellation), in double, stored in C.
// Special values follow PyTorch's formulas: an inf in a row makes its sum of squares inf,
// rstd 0, x * 0 = 0 for finite x and NaN for the inf (RMS); a NaN makes the row NaN.
#include <cmath>
#include <limits>
#include <type_traits>

#include "norms.h"

namespace fl {

namespace {

// Lanes >= k set to 0 (tails must not add to a sum).
template <class V> inline V zero_tail(V v, int64_t k) {
  constexpr int W = sizeof(V) / sizeof(v[0]);
  if (k == W) return v;
  V out = v;
  for (int l = (int)k; l < W; ++l) out[l] = 0;
  return out;
}

// sum over the row of f(v) where v is the row's k-lane vectors (tail lanes zeroed after f):
// fp32 vector partial sums of 256 elements, then fp64.
template <class T, class F> inline double row_sum(const T* p, int64_t n, F&& f) {
  using IO = io<T>;
  using V = typename IO::V;
  constexpr int W = IO::W;
  const int64_t nfull = n / W * W;
  double total = 0;
  for (int64_t b0 = 0; b0 < nfull; b0 += 256) {
    const int64_t b1 = std::min(nfull, b0 + 256);
    V a0{}, a1{};
    int64_t j = b0;
    for (; j + 2 * W <= b1; j += 2 * W) {
      a0 += f(IO::load(p + j));
      a1 += f(IO::load(p + j + W));
    }
    if (j < b1) a0 += f(IO::load(p + j));
    total += hsum(a0 + a1);
  }
  if (n > nfull) total += hsum(zero_tail(f(load_n(p + nfull, n - nfull)), n - nfull));
  return total;
}

template <class T>
void forward_row(const T* x, const T* res, T* s, const T* w, const T* b, T* y, typename io<T>::C* mean_out,
                 typename io<T>::C* rstd_out, int64_t n, int kind, double eps) {
  using IO = io<T>;
  using V = typename IO::V;
  using C = typename IO::C;
  constexpr int W = IO::W;
  const T* src = x;
  if (res) {  // s = x + res in T: the returned sum, and what is normalised (as eager rounds it)
    for (int64_t j = 0; j < n; j += W) {
      const int64_t k = std::min<int64_t>(W, n - j);
      store_k(s + j, load_k(x + j, k) + load_k(res + j, k), k);
    }
    src = s;
  }
  double mu = 0, r;
  if (kind == kNormLayer) {
    mu = row_sum(src, n, [](V v) { return v; }) / (double)n;
    const C mc = (C)mu;
    const double var = row_sum(src, n, [mc](V v) { V d = v - mc; return d * d; }) / (double)n;
    r = 1.0 / std::sqrt(var + eps);
  } else {
    const double ms = row_sum(src, n, [](V v) { return v * v; }) / (double)n;
    r = 1.0 / std::sqrt(ms + eps);
  }
  const C rc = (C)r, mc = (C)mu;
  if (mean_out) *mean_out = mc;
  if (rstd_out) *rstd_out = rc;
  const bool hf16 = kind == kNormRmsHf && !std::is_same_v<C, T>;
  for (int64_t j = 0; j < n; j += W) {
    const int64_t k = std::min<int64_t>(W, n - j);
    V v = load_k(src + j, k);
    V h = kind == kNormLayer ? (v - mc) * rc : v * rc;
    if (hf16) h = round_to<T>(h);  // LlamaRMSNorm: .to(input_dtype), then weight * that in T
    if (w) h = h * load_k(w + j, k);
    if (b) h = h + load_k(b + j, k);
    store_k(y + j, h, k);
  }
}

template <class T>
void backward_row(const T* dy, const T* ds, const T* src, const T* w, typename io<T>::C mc, typename io<T>::C rc,
                  T* dx, const ColumnSums<T>& sw, const ColumnSums<T>& sb, bool first, int64_t n, int kind) {
  using IO = io<T>;
  using V = typename IO::V;
  using C = typename IO::C;
  constexpr int W = IO::W;
  const bool layer = kind == kNormLayer;
  const bool hf16 = kind == kNormRmsHf && !std::is_same_v<C, T>;
  auto xhat_of = [&](V v) { return layer ? (v - mc) * rc : v * rc; };
  // pass 1: c1 = sum(dxhat), c2 = sum(dxhat * xhat), and the column sums of dy * xhat and dy
  double s1 = 0, s2 = 0;
  for (int64_t b0 = 0; b0 < n; b0 += 256) {
    const int64_t b1 = std::min(n, b0 + 256);
    V a1{}, a2{};
    for (int64_t j = b0; j < b1; j += W) {
      const int64_t k = std::min<int64_t>(W, b1 - j);
      V g = load_k(dy + j, k);  // padding lanes are 0: they add nothing below
      V xh = zero_tail(xhat_of(load_k(src + j, k)), k);
      V dxh = w ? g * load_k(w + j, k) : g;
      if (layer) a1 += dxh;
      a2 += dxh * xh;
      // dweight: dy * (what the weight multiplied: xhat, rounded to T in the HF semantics)
      sw.add(first, j, g * (hf16 ? round_to<T>(xh) : xh), k);
      sb.add(first, j, g, k);
    }
    s1 += hsum(a1);
    s2 += hsum(a2);
  }
  if (!dx) return;
  const C c1 = (C)(s1 / (double)n), c2 = (C)(s2 / (double)n);
  for (int64_t j = 0; j < n; j += W) {
    const int64_t k = std::min<int64_t>(W, n - j);
    V g = load_k(dy + j, k);
    V xh = xhat_of(load_k(src + j, k));
    V dxh = w ? g * load_k(w + j, k) : g;
    V d = (dxh - c1 - xh * c2) * rc;
    if (ds) d += load_k(ds + j, k);
    store_k(dx + j, d, k);
  }
}

}  // namespace

template <class T>
void norm_forward(const T* x, const T* res, T* s, const T* w, const T* b, T* y, typename io<T>::C* mean,
                  typename io<T>::C* rstd, int64_t m, int64_t n, int kind, double eps, int nthreads) {
  if (m == 0) return;
  if (n == 0) {  // an empty row: mean(empty) is NaN in torch
    const auto nan = std::numeric_limits<typename io<T>::C>::quiet_NaN();
    for (int64_t r = 0; r < m; ++r) {
      if (mean) mean[r] = nan;
      if (rstd) rstd[r] = nan;
    }
    return;
  }
  parallel_for(m, (res ? 4 : 3) * n, nthreads, [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r)
      forward_row<T>(x + r * n, res ? res + r * n : nullptr, res ? s + r * n : nullptr, w, b, y + r * n,
                     mean ? mean + r : nullptr, rstd ? rstd + r : nullptr, n, kind, eps);
  });
}

template <class T>
void norm_backward(const T* dy, const T* ds, const T* src, const T* w, const typename io<T>::C* mean,
                   const typename io<T>::C* rstd, T* dx, T* dw, T* db, int64_t m, int64_t n, int kind,
                   int nthreads) {
  if (n == 0) return;
  const int64_t cost = 5 * n;
  int nt = threads_for(m, cost, nthreads);
  ColumnSumBuffers<T> sums_w(dw != nullptr, nt, n), sums_b(db != nullptr, nt, n);
  parallel_for(m, cost, nthreads, [&](int64_t r0, int64_t r1, int t) {
    ColumnSums<T> sw = sums_w.of(t), sb = sums_b.of(t);
    for_row_blocks(r0, r1, [&](int64_t b0, int64_t b1) {
      for (int64_t r = b0; r < b1; ++r)
        backward_row<T>(dy + r * n, ds ? ds + r * n : nullptr, src + r * n, w, mean ? mean[r] : 0, rstd[r],
                        dx ? dx + r * n : nullptr, sw, sb, r == b0, n, kind);
      sw.flush(n);
      sb.flush(n);
    });
  });
  if (dw) sum_thread_columns(sums_w.acc.data(), nt, n, dw);
  if (db) sum_thread_columns(sums_b.acc.data(), nt, n, db);
}

#define FL_INSTANTIATE(T)                                                                                    \
  template void norm_forward<T>(const T*, const T*, T*, const T*, const T*, T*, typename io<T>::C*,          \
                                typename io<T>::C*, int64_t, int64_t, int, double, int);                    \
  template void norm_backward<T>(const T*, const T*, const T*, const T*, const typename io<T>::C*,          \
                                 const typename io<T>::C*, T*, T*, T*, int64_t, int64_t, int, int);
FL_INSTANTIATE(float)
FL_INSTANTIATE(double)
FL_INSTANTIATE(bf16)
FL_INSTANTIATE(f16)

}  // namespace fl
