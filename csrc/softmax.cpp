// softmax / log_softmax over dim 1 of a contiguous (outer, len, inner) tensor, forward and backward.
//
// inner == 1 (rows, the common case): threads own blocks of whole rows. A row is worked on in
//   chunks of 2048 elements that sit in L1 (see softmax_row): per chunk its max, then exp and sum
//   into a per-thread scratch row; the chunks are rescaled to the row's max when the row is done,
//   in the pass that writes y. So x is read from memory once, there is one exp per element, and
//   y is written once (with streaming stores when the output is >= 4 MiB). Sums accumulate in
//   fp32 vectors for at most 256 elements, then in fp64: a 1M-element row keeps fp32 accuracy.
// inner > 1 (softmax over a non-last dim): vectorised across `inner` instead; threads own
//   (outer, column-block) tiles of up to 64 columns, sums in fp64.
// A row whose max is -inf (all -inf) gives NaN, like torch: exp(-inf - -inf) = exp(NaN).
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "activations.h"
#include "kernels.h"

namespace fl {

template <class V> static inline V lane_mask_keep(V v, int64_t k, decltype(V{}[0]) fill) {
  // lanes >= k become `fill` (tails must not disturb a max or a sum)
  constexpr int W = sizeof(V) / sizeof(v[0]);
  V out = v;
  for (int l = (int)k; l < W; ++l) out[l] = fill;
  return out;
}

template <class V> static inline V vmax(V a, V b) { return a > b ? a : b; }

template <class V> static inline auto hmax(V v) {  // NaN lanes are ignored, like vmax
  auto m = v[0];
  for (int i = 1; i < (int)(sizeof(V) / sizeof(v[0])); ++i) m = v[i] > m ? v[i] : m;
  return m;
}
#ifdef __AVX512F__
template <> inline auto hmax<vf>(vf v) {
  // log-depth shuffles instead of 15 dependent compares (this runs once per chunk of a row)
  __m512 m = (__m512)v;
  m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, 0x4E));
  m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, 0xB1));
  m = _mm512_max_ps(m, _mm512_permute_ps(m, 0x4E));
  m = _mm512_max_ps(m, _mm512_permute_ps(m, 0xB1));
  return _mm512_cvtss_f32(m);
}
#endif


// ----------------------------------------------------------------------------- rows (inner == 1)
// Full vectors run branch-free; the last partial vector goes through a padded buffer (load_n),
// with its padding lanes forced to a neutral value before they can reach a max or a sum.

// One row of length n, in chunks of kChunk elements that sit in L1 while they are worked on:
//   per chunk c: m_c = max, e = exp(x - m_c) into the scratch row, s_c = sum(e)
//   M = max_c m_c, S = sum_c s_c exp(m_c - M)
//   softmax: y = e * exp(m_c - M) / S;  log_softmax: y = x - M - log S (no e kept)
// so x is read from memory once, one exp per element (plus one per chunk), y written once. The
// exp loop prefetches `pf_dist` elements ahead so the next chunk arrives while this one computes.
// A chunk that is all -inf contributes nothing; a row that is all -inf gives NaN, like torch
// (exp(-inf - -inf)); +inf or NaN anywhere makes the sum, hence the row, NaN, like torch.
constexpr int64_t kChunk = 2048;

template <class T, bool LOG>
static void softmax_row(const T* x, T* y, typename io<T>::C* e, int64_t n, int64_t pf_dist, bool stream) {
  using IO = io<T>;
  using V = typename IO::V;
  using C = typename IO::C;
  constexpr int W = IO::W;
  const C ninf = -std::numeric_limits<C>::infinity();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  C mc_small[64];  // per-chunk max and sum; rows of > 64 chunks (131072 elements) use the heap
  double sc_small[64];
  std::unique_ptr<C[]> mc_big;
  std::unique_ptr<double[]> sc_big;
  if (nchunks > 64) { mc_big.reset(new C[nchunks]); sc_big.reset(new double[nchunks]); }
  C* mc = nchunks > 64 ? mc_big.get() : mc_small;
  double* sc = nchunks > 64 ? sc_big.get() : sc_small;

  C big_m = ninf;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t j0 = c * kChunk, j1 = std::min(n, j0 + kChunk);
    const int64_t jfull = j0 + (j1 - j0) / W * W, tail = j1 - jfull;
    V m0 = splat<V>(ninf), m1 = m0;  // two accumulators: max latency, not loads, bounds this
    int64_t j = j0;
    for (; j + 2 * W <= jfull; j += 2 * W) {
      m0 = vmax(m0, IO::load(x + j));
      m1 = vmax(m1, IO::load(x + j + W));
    }
    if (j < jfull) m0 = vmax(m0, IO::load(x + j));
    if (tail) m1 = vmax(m1, lane_mask_keep(load_n(x + jfull, tail), tail, ninf));
    const C m = hmax(vmax(m0, m1));
    mc[c] = m;
    big_m = m > big_m ? m : big_m;
    if (m == ninf) {  // nothing here but -inf: zero weight (and finite scratch for the scale pass)
      sc[c] = 0;
      if constexpr (!LOG) std::fill(e + j0, e + j1, C(0));
      continue;
    }
    double sum = blocked_sum<T>(j0, jfull, [&](int64_t jj) {
      __builtin_prefetch(x + jj + pf_dist);
      V ex = vexp_nonpos(IO::load(x + jj) - m);
      if constexpr (!LOG) std::memcpy(e + jj, &ex, sizeof ex);
      return ex;
    });
    if (tail) {
      V ex = lane_mask_keep(vexp_nonpos(load_n(x + jfull, tail) - m), tail, C(0));
      if constexpr (!LOG) std::memcpy(e + jfull, &ex, tail * sizeof(C));
      sum += hsum(ex);
    }
    sc[c] = sum;
  }

  const C nan = std::numeric_limits<C>::quiet_NaN();
  double total = 0;
  // exp(m_c - M) is 1 for the chunk holding the max (every chunk of a short row): no libm call
  auto rescale = [&](int64_t c) { return mc[c] == big_m ? 1.0 : std::exp((double)mc[c] - (double)big_m); };
  for (int64_t c = 0; c < nchunks; ++c)
    if (sc[c] != 0) total += sc[c] * rescale(c);
  if (big_m == ninf) total = nan;  // an all -inf row

  const int64_t nfull = n / W * W, tail = n - nfull;
  if constexpr (LOG) {
    // (x - M) - log S, in this order: M + log S would lose log S next to a huge M
    const C lse = (C)std::log(total);  // NaN for an all -inf row
    for (int64_t j = 0; j < nfull; j += W) store_out(y + j, (IO::load(x + j) - big_m) - lse, stream);
    if (tail) store_n(y + nfull, (load_n(x + nfull, tail) - big_m) - lse, tail);
  } else {
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t j0 = c * kChunk, j1 = std::min(n, j0 + kChunk);
      const int64_t jfull = j0 + (j1 - j0) / W * W, t = j1 - jfull;
      // A chunk of only -inf has weight 0 -- unless the row's sum is NaN (a NaN or +inf in it):
      // then every output is NaN, like torch, and rescale / total carries the NaN.
      const C f = sc[c] == 0 && big_m != ninf && !std::isnan(total) ? C(0) : (C)(rescale(c) / total);
      for (int64_t j = j0; j < jfull; j += W) {
        V ex;
        std::memcpy(&ex, e + j, sizeof ex);
        store_out(y + j, ex * f, stream);
      }
      if (t) {
        V ex{};
        std::memcpy(&ex, e + jfull, t * sizeof(C));
        store_n(y + jfull, ex * f, t);
      }
    }
  }
}

template <class T, bool LOG>
static void softmax_backward_row(const T* dy, const T* y, T* dx, int64_t n) {
  using IO = io<T>;
  using V = typename IO::V;
  using C = typename IO::C;
  constexpr int W = IO::W;
  const int64_t nfull = n / W * W, tail = n - nfull;
  auto term = [](V g, V yv) { if constexpr (LOG) return g; else return g * yv; };
  double s = 0;  // softmax: sum(dy * y); log_softmax: sum(dy)
  for (int64_t j0 = 0; j0 < nfull; j0 += 256) {
    const int64_t j1 = std::min<int64_t>(nfull, j0 + 256);
    V acc{};
    for (int64_t j = j0; j < j1; j += W) acc += term(IO::load(dy + j), IO::load(y + j));
    s += hsum(acc);
  }
  if (tail) s += hsum(term(load_n(dy + nfull, tail), load_n(y + nfull, tail)));  // padding is 0
  const C sc = (C)s;
  auto grad = [sc](V g, V yv) { if constexpr (LOG) return g - vexp_nonpos(yv) * sc; else return yv * (g - sc); };
  for (int64_t j = 0; j < nfull; j += W) IO::store(dx + j, grad(IO::load(dy + j), IO::load(y + j)));
  if (tail) store_n(dx + nfull, grad(load_n(dy + nfull, tail), load_n(y + nfull, tail)), tail);
}

// ----------------------------------------------------------------------------- columns (inner > 1)
// Columns [c0, c0 + nc) of one (len, inner) slab, nc <= kColVecs * W; each step along len is a vector.
constexpr int kColVecs = 4;

template <class T, bool LOG>
static void softmax_cols(const T* x, T* y, int64_t len, int64_t inner, int64_t c0, int64_t nc) {
  using IO = io<T>;
  using V = typename IO::V;
  using C = typename IO::C;
  constexpr int W = IO::W;
  const C ninf = -std::numeric_limits<C>::infinity();
  const int nv = (int)((nc + W - 1) / W);
  V m[kColVecs], inv[kColVecs];
  double sum[kColVecs * W] = {};
  for (int v = 0; v < nv; ++v) m[v] = splat<V>(ninf);
  auto width = [&](int v) { return std::min<int64_t>(W, nc - (int64_t)v * W); };
  for (int64_t l = 0; l < len; ++l)
    for (int v = 0; v < nv; ++v) m[v] = vmax(m[v], load_k(x + l * inner + c0 + v * W, width(v)));
  for (int64_t l = 0; l < len; ++l)
    for (int v = 0; v < nv; ++v) {
      V ex = vexp_nonpos(load_k(x + l * inner + c0 + v * W, width(v)) - m[v]);
      for (int i = 0; i < W; ++i) sum[v * W + i] += (double)ex[i];
    }
  for (int v = 0; v < nv; ++v)
    for (int i = 0; i < W; ++i)
      inv[v][i] = LOG ? (C)std::log(sum[v * W + i]) : (C)(1.0 / sum[v * W + i]);
  for (int64_t l = 0; l < len; ++l)
    for (int v = 0; v < nv; ++v) {
      int64_t off = l * inner + c0 + v * W;
      V d = load_k(x + off, width(v)) - m[v];
      store_k(y + off, LOG ? d - inv[v] : vexp_nonpos(d) * inv[v], width(v));
    }
}

template <class T, bool LOG>
static void softmax_backward_cols(const T* dy, const T* y, T* dx, int64_t len, int64_t inner, int64_t c0,
                                  int64_t nc) {
  using IO = io<T>;
  using V = typename IO::V;
  using C = typename IO::C;
  constexpr int W = IO::W;
  const int nv = (int)((nc + W - 1) / W);
  double s[kColVecs * W] = {};
  V sv[kColVecs];
  auto width = [&](int v) { return std::min<int64_t>(W, nc - (int64_t)v * W); };
  for (int64_t l = 0; l < len; ++l)
    for (int v = 0; v < nv; ++v) {
      int64_t off = l * inner + c0 + v * W;
      V t = LOG ? load_k(dy + off, width(v)) : load_k(dy + off, width(v)) * load_k(y + off, width(v));
      for (int i = 0; i < W; ++i) s[v * W + i] += (double)t[i];
    }
  for (int v = 0; v < nv; ++v)
    for (int i = 0; i < W; ++i) sv[v][i] = (C)s[v * W + i];
  for (int64_t l = 0; l < len; ++l)
    for (int v = 0; v < nv; ++v) {
      int64_t off = l * inner + c0 + v * W;
      V g = load_k(dy + off, width(v)), yv = load_k(y + off, width(v));
      store_k(dx + off, LOG ? g - vexp_nonpos(yv) * sv[v] : yv * (g - sv[v]), width(v));
    }
}

// ----------------------------------------------------------------------------- entry points
// Scratch rows for the exp values of softmax_row, 64-byte aligned. Rows up to kKeptScratch elements
// use a per-thread buffer kept between calls (OpenMP's pool threads persist: no allocation or page
// faults per call; at most 256 KiB per thread); longer rows get a buffer of their own, freed when
// the call ends, so one huge row does not pin its size in memory.
constexpr int64_t kKeptScratch = 1 << 16;

template <class C> struct Scratch {
  std::unique_ptr<C[]> own;
  C* row;
  explicit Scratch(int64_t n) {
    constexpr int64_t pad = 64 / (int64_t)sizeof(C);
    C* base;
    if (n <= kKeptScratch) {
      thread_local std::unique_ptr<C[]> kept(new C[kKeptScratch + pad]);
      base = kept.get();
    } else {
      own.reset(new C[n + pad]);
      base = own.get();
    }
    row = (C*)(((uintptr_t)base + 63) & ~(uintptr_t)63);
  }
};

template <class T>
void softmax_forward(const T* x, T* y, int64_t outer, int64_t len, int64_t inner, bool log, int nthreads) {
  using C = typename io<T>::C;
  if (inner == 1) {
    const int64_t pf_dist = kChunk;  // the exp loop over one chunk prefetches the next one
    // Stream the output past the caches from 4 MiB (twice this core's L2) when rows are aligned.
    const bool stream = outer * len * (int64_t)sizeof(T) >= (int64_t(4) << 20) &&
                        (len * sizeof(T)) % 64 == 0 && (uintptr_t)y % 64 == 0;
    parallel_for(outer, len, nthreads, [&](int64_t r0, int64_t r1, int) {
      Scratch<C> scratch(log ? 0 : len);
      C* e = log ? nullptr : scratch.row;
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * len;
        if (log) softmax_row<T, true>(xr, y + r * len, e, len, pf_dist, stream);
        else softmax_row<T, false>(xr, y + r * len, e, len, pf_dist, stream);
      }
#ifdef __AVX512F__
      if (stream) _mm_sfence();  // order the streamed stores before the caller reads y
#endif
    });
    return;
  }
  const int64_t cols = kColVecs * io<T>::W, nblk = (inner + cols - 1) / cols;
  parallel_for(outer * nblk, len * cols, nthreads, [&](int64_t b0, int64_t b1, int) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t o = b / nblk, c0 = (b % nblk) * cols, nc = std::min(cols, inner - c0);
      const T* xs = x + o * len * inner;
      T* ys = y + o * len * inner;
      if (log) softmax_cols<T, true>(xs, ys, len, inner, c0, nc);
      else softmax_cols<T, false>(xs, ys, len, inner, c0, nc);
    }
  });
}

template <class T>
void softmax_backward(const T* dy, const T* y, T* dx, int64_t outer, int64_t len, int64_t inner, bool log,
                      int nthreads) {
  if (inner == 1) {
    parallel_for(outer, len, nthreads, [&](int64_t r0, int64_t r1, int) {
      for (int64_t r = r0; r < r1; ++r) {
        if (log) softmax_backward_row<T, true>(dy + r * len, y + r * len, dx + r * len, len);
        else softmax_backward_row<T, false>(dy + r * len, y + r * len, dx + r * len, len);
      }
    });
    return;
  }
  const int64_t cols = kColVecs * io<T>::W, nblk = (inner + cols - 1) / cols;
  parallel_for(outer * nblk, len * cols, nthreads, [&](int64_t b0, int64_t b1, int) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t o = b / nblk, c0 = (b % nblk) * cols, nc = std::min(cols, inner - c0);
      int64_t base = o * len * inner;
      if (log) softmax_backward_cols<T, true>(dy + base, y + base, dx + base, len, inner, c0, nc);
      else softmax_backward_cols<T, false>(dy + base, y + base, dx + base, len, inner, c0, nc);
    }
  });
}

#define FL_INSTANTIATE(T)                                                                               \
  template void softmax_forward<T>(const T*, T*, int64_t, int64_t, int64_t, bool, int);                \
  template void softmax_backward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, bool, int);
FL_INSTANTIATE(float)
FL_INSTANTIATE(double)
FL_INSTANTIATE(bf16)
FL_INSTANTIATE(f16)

}  // namespace fl
