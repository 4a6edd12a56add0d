// softmax / log_softmax over dim 1 of a contiguous (outer, len, inner) tensor, forward and backward.
//
// inner == 1 (rows, the common case): threads own blocks of whole rows. Per row, three passes:
//   max -> e = exp(x - max) and its sum -> scale (or x - max - log(sum) for log_softmax).
//   The row is read from memory once when it fits in cache (L2: ~2 MB here); longer rows are
//   still exact, just streamed three times. Sums accumulate in fp32 vectors for at most 256
//   elements, then in fp64, so a row of 1M elements keeps fp32 accuracy.
// inner > 1 (softmax over a non-last dim): vectorised across `inner` instead; threads own
//   (outer, column-block) tiles of up to 64 columns, sums in fp64.
// A row whose max is -inf (all -inf) gives NaN, like torch: exp(-inf - -inf) = exp(NaN).
#include <cmath>
#include <limits>
#include <vector>

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

template <class V> static inline auto hmax(V v) {
  auto m = v[0];
  for (int i = 1; i < (int)(sizeof(V) / sizeof(v[0])); ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Full vector or masked tail load of k <= W elements.
template <class T> static inline typename io<T>::V ld(const T* p, int64_t k) {
  return k == io<T>::W ? io<T>::load(p) : load_n(p, k);
}
template <class T> static inline void st(T* p, typename io<T>::V v, int64_t k) {
  if (k == io<T>::W) io<T>::store(p, v); else store_n(p, v, k);
}

// ----------------------------------------------------------------------------- rows (inner == 1)
// One row of length n. `e` is a scratch row of n math values (may alias y when T is the math type).
template <class T, bool LOG>
static void softmax_row(const T* x, T* y, typename io<T>::C* e, int64_t n) {
  using IO = io<T>;
  using V = typename IO::V;
  using C = typename IO::C;
  constexpr int W = IO::W;
  const C ninf = -std::numeric_limits<C>::infinity();

  V mv = splat<V>(ninf);
  for (int64_t j = 0; j < n; j += W) {
    int64_t k = std::min<int64_t>(W, n - j);
    mv = vmax(mv, lane_mask_keep(ld(x + j, k), k, ninf));
  }
  const C m = hmax(mv);

  double sum = 0;
  for (int64_t j0 = 0; j0 < n; j0 += 256) {  // fp32 partial sums over <= 256 elements
    V acc{};
    int64_t j1 = std::min<int64_t>(n, j0 + 256);
    for (int64_t j = j0; j < j1; j += W) {
      int64_t k = std::min<int64_t>(W, j1 - j);
      V ex = vexp(ld(x + j, k) - m);
      if (k < W) ex = lane_mask_keep(ex, k, C(0));
      if constexpr (!LOG) std::memcpy(e + j, &ex, k * sizeof(C));
      acc += ex;
    }
    sum += hsum(acc);
  }

  if constexpr (LOG) {
    const C lse = (C)std::log(sum);
    for (int64_t j = 0; j < n; j += W) {
      int64_t k = std::min<int64_t>(W, n - j);
      st(y + j, (ld(x + j, k) - m) - lse, k);
    }
  } else {
    const C inv = (C)(1.0 / sum);
    for (int64_t j = 0; j < n; j += W) {
      int64_t k = std::min<int64_t>(W, n - j);
      V ex;
      std::memcpy(&ex, e + j, k * sizeof(C));
      st(y + j, ex * inv, k);
    }
  }
}

template <class T, bool LOG>
static void softmax_backward_row(const T* dy, const T* y, T* dx, int64_t n) {
  using IO = io<T>;
  using V = typename IO::V;
  using C = typename IO::C;
  constexpr int W = IO::W;
  double s = 0;  // softmax: sum(dy * y); log_softmax: sum(dy)
  for (int64_t j0 = 0; j0 < n; j0 += 256) {
    V acc{};
    int64_t j1 = std::min<int64_t>(n, j0 + 256);
    for (int64_t j = j0; j < j1; j += W) {
      int64_t k = std::min<int64_t>(W, j1 - j);
      if constexpr (LOG) acc += ld(dy + j, k);
      else acc += ld(dy + j, k) * ld(y + j, k);  // padded lanes are 0 * 0
    }
    s += hsum(acc);
  }
  const C sc = (C)s;
  for (int64_t j = 0; j < n; j += W) {
    int64_t k = std::min<int64_t>(W, n - j);
    V g = ld(dy + j, k), yv = ld(y + j, k);
    if constexpr (LOG) st(dx + j, g - vexp(yv) * sc, k);
    else st(dx + j, yv * (g - sc), k);
  }
}

// ----------------------------------------------------------------------------- columns (inner > 1)
// Columns [c0, c0 + nc) of one (len, inner) slab, nc <= kCols; each step along len is a vector.
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
    for (int v = 0; v < nv; ++v) m[v] = vmax(m[v], ld(x + l * inner + c0 + v * W, width(v)));
  for (int64_t l = 0; l < len; ++l)
    for (int v = 0; v < nv; ++v) {
      V ex = vexp(ld(x + l * inner + c0 + v * W, width(v)) - m[v]);
      for (int i = 0; i < W; ++i) sum[v * W + i] += (double)ex[i];
    }
  for (int v = 0; v < nv; ++v)
    for (int i = 0; i < W; ++i)
      inv[v][i] = LOG ? (C)std::log(sum[v * W + i]) : (C)(1.0 / sum[v * W + i]);
  for (int64_t l = 0; l < len; ++l)
    for (int v = 0; v < nv; ++v) {
      int64_t off = l * inner + c0 + v * W;
      V d = ld(x + off, width(v)) - m[v];
      st(y + off, LOG ? d - inv[v] : vexp(d) * inv[v], width(v));
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
      V t = LOG ? ld(dy + off, width(v)) : ld(dy + off, width(v)) * ld(y + off, width(v));
      for (int i = 0; i < W; ++i) s[v * W + i] += (double)t[i];
    }
  for (int v = 0; v < nv; ++v)
    for (int i = 0; i < W; ++i) sv[v][i] = (C)s[v * W + i];
  for (int64_t l = 0; l < len; ++l)
    for (int v = 0; v < nv; ++v) {
      int64_t off = l * inner + c0 + v * W;
      V g = ld(dy + off, width(v)), yv = ld(y + off, width(v));
      st(dx + off, LOG ? g - vexp(yv) * sv[v] : yv * (g - sv[v]), width(v));
    }
}

// ----------------------------------------------------------------------------- entry points
template <class T>
void softmax_forward(const T* x, T* y, int64_t outer, int64_t len, int64_t inner, bool log, int nthreads) {
  using C = typename io<T>::C;
  constexpr bool kInPlaceScratch = sizeof(C) == sizeof(T);  // float/double: e lives in y
  if (inner == 1) {
    int nt = threads_for(outer, len, nthreads);
    std::vector<C> scratch(kInPlaceScratch || log ? 0 : (size_t)nt * len);
    parallel_for(outer, len, nthreads, [&](int64_t r0, int64_t r1, int t) {
      for (int64_t r = r0; r < r1; ++r) {
        C* e = kInPlaceScratch ? reinterpret_cast<C*>(y + r * len) : scratch.data() + (size_t)t * len;
        if (log) softmax_row<T, true>(x + r * len, y + r * len, e, len);
        else softmax_row<T, false>(x + r * len, y + r * len, e, len);
      }
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
