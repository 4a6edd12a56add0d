// Softmax cross-entropy over the rows of a contiguous (n, C) logits matrix x, forward and backward.
//
// Per row (fastlayers/loss.py has the derivation): M = max x, log S = log sum exp(x - M),
//   loss = sum_j c_j (log S - (x_j - M)),   dloss/dx_j = p_j A - c_j,   A = sum_j c_j,
// with c_j = (1 - eps) w_t [j == t] + (eps / C) w_j for a class target t (c = 0 for an ignored
// row), or c_j = w_j q'_j for class probabilities q (q' = q (1 - eps) + eps / C when eps > 0).
//
// Forward: one pass over each row from memory, in chunks of kChunk elements that sit in L1:
//   per chunk its max m_c, then (from L1) sum exp(x - R) and sum c_j (x_j - R) against the running
//   reference R = max so far (0 while that is -inf), rescaling the running sums when R grows.
//   Writes the row's loss and stats = (M, log S, A). Sums: fp32 vectors within a chunk (<= 64
//   elements per lane), fp64 across chunks; fp64 throughout for fp64 data. Every summed term has
//   one sign (x - R <= 0, c >= 0), so nothing cancels, and c_j (x_j - R) is formed per element, so a
//   -inf logit with c_j = 0 gives NaN exactly where torch's (logp * weight) does.
// Backward: one pass, dx_j = scale_i (exp((x_j - M) - log S) A - c_j), in x's dtype; x may be the
//   columns [col0, col0 + nc) of rows with `classes` classes (a vocabulary block of
//   linear_cross_entropy; class-index targets), stats those of the whole rows.
// Threads own contiguous blocks of whole rows (parallel_for): deterministic, no atomics.
// Traffic: forward reads x (and q) once, n*C*sizeof(T); backward reads x (and q) and writes dx.
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "activations.h"
#include "kernels.h"

namespace fl {

namespace {

constexpr int64_t kChunk = 1024;

template <class T> inline typename io<T>::C scalar(T v) {
  if constexpr (std::is_same_v<T, bf16>) {
    uint32_t u = uint32_t(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  } else {
    return (typename io<T>::C)v;
  }
}

template <class V> inline V vmax_(V a, V b) { return a > b ? a : b; }

template <class V> inline auto hmax_(V v) {
  auto m = v[0];
  for (int i = 1; i < (int)(sizeof(V) / sizeof(v[0])); ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Loads k <= W elements (k == W: a full vector); lanes >= k are `fill`.
template <class T> inline typename io<T>::V ldk(const T* p, int64_t k, typename io<T>::C fill) {
  using V = typename io<T>::V;
  if (k == io<T>::W) return io<T>::load(p);
  V v = load_n(p, k);
  for (int l = (int)k; l < io<T>::W; ++l) v[l] = fill;
  return v;
}

// The per-row coefficient vector c over lanes [j, j + k): w_j (or 1) times q'_j for probabilities.
template <class T>
inline typename io<T>::V coef(const T* q, const typename io<T>::C* w, int64_t j, int64_t k,
                              typename io<T>::C qa, typename io<T>::C qb) {
  using V = typename io<T>::V;
  using C = typename io<T>::C;
  V c = splat<V>(C(1));
  if (w) {
    V wv{};
    for (int l = 0; l < (int)k; ++l) wv[l] = w[j + l];
    c = wv;
  }
  if (q) c = c * (ldk(q + j, k, C(0)) * qa + qb);
  if (k < io<T>::W)
    for (int l = (int)k; l < io<T>::W; ++l) c[l] = 0;
  return c;
}

template <class T>
void forward_row(const T* x, const T* q, const typename io<T>::C* w, int64_t nc, int64_t t, bool ignored,
                 double eps, typename io<T>::C* loss, typename io<T>::C* st) {
  using IO = io<T>;
  using V = typename IO::V;
  using C = typename IO::C;
  constexpr int W = IO::W;
  const C ninf = -std::numeric_limits<C>::infinity();
  if (nc == 0) {  // no classes: nothing to sum
    *loss = 0;
    st[0] = st[1] = st[2] = 0;
    return;
  }
  const bool probs = q != nullptr;
  const bool need_t = !ignored && (probs || eps > 0);
  // probabilities: q' = q * qa + qb
  const C qa = eps > 0 ? C(1 - eps) : C(1), qb = eps > 0 ? C(eps / double(nc)) : C(0);
  C M = ninf, R = 0;
  double S = 0, Tsum = 0, Csum = 0;
  for (int64_t j0 = 0; j0 < nc; j0 += kChunk) {
    const int64_t j1 = std::min(nc, j0 + kChunk);
    V mv = splat<V>(ninf);
    for (int64_t j = j0; j < j1; j += W) mv = vmax_(mv, ldk(x + j, std::min<int64_t>(W, j1 - j), ninf));
    const C mc = hmax_(mv);
    const C Mn = mc > M ? mc : M;
    const C Rn = Mn == ninf ? C(0) : Mn;
    const double alpha = M == ninf ? 0.0 : std::exp(double(M) - double(Mn));
    V sv{}, tv{}, cv{};
    for (int64_t j = j0; j < j1; j += W) {
      const int64_t k = std::min<int64_t>(W, j1 - j);
      V d = ldk(x + j, k, ninf) - Rn;  // <= 0; padding lanes -inf -> exp 0
      sv += vexp_nonpos(d);
      if (need_t) {
        V c = coef(q, w, j, k, qa, qb);
        d = k == W ? d : ldk(x + j, k, C(0)) - Rn;  // padding: c = 0 times a finite value
        if (k < W)
          for (int l = (int)k; l < W; ++l) d[l] = 0;
        tv += c * d;
        cv += c;
      }
    }
    S = S * alpha + hsum(sv);
    if (need_t) {
      Tsum += (double(R) - double(Rn)) * Csum + hsum(tv);
      Csum += hsum(cv);
    }
    M = Mn;
    R = Rn;
  }
  const double logS = std::log(S);
  double l, A;
  // Tsum = sum_j c_j (x_j - R); with R == M (or M == -inf, a NaN row anyway)
  const double smooth = Csum * logS - Tsum;  // sum_j c_j (log S - (x_j - M))
  if (probs) {
    l = smooth;
    A = Csum;
  } else if (ignored) {
    l = 0;
    A = 0;
  } else {
    const double wt = w ? double(w[t]) : 1.0;
    const double nll = wt * (logS - (double(scalar(x[t])) - double(M)));
    if (eps > 0) {
      l = (1 - eps) * nll + (eps / double(nc)) * smooth;
      A = (1 - eps) * wt + (eps / double(nc)) * Csum;
    } else {
      l = nll;
      A = wt;
    }
  }
  *loss = C(l);
  st[0] = M;
  st[1] = C(logS);
  st[2] = C(A);
}

// One row's columns [0, nc) of a row with `classes` classes in all; w points at those columns'
// weights; t is the target's column among them, or -1 where it lies outside (or the row is ignored).
template <class T>
void backward_row(const T* x, const T* q, const typename io<T>::C* w, int64_t nc, int64_t classes, int64_t t,
                  bool ignored, double eps, const typename io<T>::C* st, typename io<T>::C g, T* dx) {
  using IO = io<T>;
  using V = typename IO::V;
  using C = typename IO::C;
  constexpr int W = IO::W;
  const C M = st[0], logS = st[1], A = st[2];
  const bool probs = q != nullptr;
  const C qa = eps > 0 ? C(1 - eps) : C(1), qb = eps > 0 ? C(eps / double(classes)) : C(0);
  // class rows: c_j = (eps / C) w_j except at t; probability rows: w_j q'_j; ignored rows: 0
  const C cscale = probs ? C(1) : (ignored ? C(0) : C(eps / double(classes)));
  const bool any_c = probs || (!ignored && eps > 0);
  const bool own = !probs && !ignored && t >= 0;                 // the target's column is here
  const double xt = own ? double(scalar(x[t])) : 0.0;  // read before dx may overwrite x
  for (int64_t j = 0; j < nc; j += W) {
    const int64_t k = std::min<int64_t>(W, nc - j);
    V p = vexp_nonpos((ldk(x + j, k, C(0)) - M) - logS);
    V d = p * A;
    if (any_c) d -= coef(q, w, j, k, qa, qb) * cscale;
    d *= g;
    if (k == W) IO::store(dx + j, d); else store_n(dx + j, d, k);
  }
  if (own) {  // the target's own term, (1 - eps) w_t, once
    const double wt = w ? double(w[t]) : 1.0;
    const double p = std::exp((xt - double(M)) - double(logS));
    const double ct = (eps / double(classes)) * wt + (1 - eps) * wt;
    V v = splat<V>(C(double(g) * (p * double(A) - ct)));
    T tmp[W];
    IO::store(tmp, v);
    dx[t] = tmp[0];
  }
}

template <class T>
void check_rows(const int64_t* target, int64_t n, int64_t nc, int64_t ignore_index) {
  if (!target) return;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = target[i];
    if (t != ignore_index && (t < 0 || t >= nc))
      throw std::out_of_range("fastlayers.cross_entropy: target " + std::to_string(t) + " (row " +
                              std::to_string(i) + ") is out of bounds for " + std::to_string(nc) +
                              " classes (expected 0 <= target < " + std::to_string(nc) +
                              " or target == ignore_index)");
  }
}

}  // namespace

template <class T>
void cross_entropy_forward(const T* x, const int64_t* target, const T* probs, const typename io<T>::C* weight,
                           typename io<T>::C* loss, typename io<T>::C* stats, int64_t n, int64_t nc,
                           int64_t ignore_index, double eps, int nthreads) {
  check_rows<T>(target, n, nc, ignore_index);  // before any row is read: no out-of-bounds x[t]
  parallel_for(n, std::max<int64_t>(nc, 1) * 4, nthreads, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const bool ignored = target && target[i] == ignore_index;
      forward_row<T>(x + i * nc, probs ? probs + i * nc : nullptr, weight, nc, target ? target[i] : -1, ignored,
                     eps, loss + i, stats + 3 * i);
    }
  });
}

template <class T>
void cross_entropy_backward(const T* x, const int64_t* target, const T* probs, const typename io<T>::C* weight,
                            const typename io<T>::C* stats, const typename io<T>::C* scale, T* dx, int64_t n,
                            int64_t nc, int64_t col0, int64_t classes, int64_t ignore_index, double eps,
                            int nthreads) {
  check_rows<T>(target, n, classes, ignore_index);
  const typename io<T>::C* wc = weight ? weight + col0 : nullptr;
  parallel_for(n, std::max<int64_t>(nc, 1) * 3, nthreads, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const bool ignored = target && target[i] == ignore_index;
      const int64_t t = target && !ignored && target[i] >= col0 && target[i] < col0 + nc ? target[i] - col0 : -1;
      backward_row<T>(x + i * nc, probs ? probs + i * nc : nullptr, wc, nc, classes, t, ignored, eps,
                      stats + 3 * i, scale[i], dx + i * nc);
    }
  });
}

#define FL_INSTANTIATE(T)                                                                                   \
  template void cross_entropy_forward<T>(const T*, const int64_t*, const T*, const io<T>::C*, io<T>::C*,   \
                                         io<T>::C*, int64_t, int64_t, int64_t, double, int);               \
  template void cross_entropy_backward<T>(const T*, const int64_t*, const T*, const io<T>::C*,             \
                                          const io<T>::C*, const io<T>::C*, T*, int64_t, int64_t, int64_t, \
                                          int64_t, int64_t, double, int);
FL_INSTANTIATE(float)
FL_INSTANTIATE(double)
FL_INSTANTIATE(bf16)
FL_INSTANTIATE(f16)
#undef FL_INSTANTIATE

}  // namespace fl
