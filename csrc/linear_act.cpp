// Everything around the linear layer's GEMMs (which run in PyTorch's BLAS, called from Python):
//
//   forward epilogue   y = act(z + b)           one pass over z, in place when y == z
//   backward prologue  dz = dy * act'(saved),   one pass, fused with db = sum_rows(dz)
//
// Layout: row-major (M, N) buffers, contiguous; b and db are (N,). Threads own contiguous blocks
// of whole rows (parallel_for); the bias gradient sums each thread's rows into its own fp64
// buffer, then adds the buffers in thread order: deterministic for a given thread count, no atomics.
#include <stdexcept>
#include <vector>

#include "activations.h"
#include "kernels.h"

namespace fl {

// Forward epilogue for rows [r0, r1). Bytes: reads M*N (+N) elements, writes M*N (2*M*N when z is
// kept apart from y because the backward needs the biased pre-activation).
template <class T, int ACT>
static void bias_act_rows(T* z, const T* b, T* y, int64_t r0, int64_t r1, int64_t n, double slope) {
  using IO = io<T>;
  using V = typename IO::V;
  using C = typename IO::C;
  constexpr int W = IO::W;
  const bool keep_z = (y != z) && b != nullptr;  // z must hold z + b for the backward
  for (int64_t r = r0; r < r1; ++r) {
    T* zr = z + r * n;
    T* yr = y + r * n;
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      V v = IO::load(zr + j);
      if (b) v += IO::load(b + j);
      if (keep_z) IO::store(zr + j, v);
      IO::store(yr + j, act_forward<ACT>(v, (C)slope));
    }
    if (j < n) {
      int64_t k = n - j;
      V v = load_n(zr + j, k);
      if (b) v += load_n(b + j, k);
      if (keep_z) store_n(zr + j, v, k);
      store_n(yr + j, act_forward<ACT>(v, (C)slope), k);
    }
  }
}

template <class T>
void bias_act_forward(T* z, const T* b, T* y, int64_t m, int64_t n, int act, double slope, int nthreads) {
  dispatch_act(act, [&]<int ACT>() {
    parallel_for(m, n, nthreads, [&](int64_t r0, int64_t r1, int) {
      bias_act_rows<T, ACT>(z, b, y, r0, r1, n, slope);
    });
  });
}

// Backward prologue for rows [r0, r1): dz = dy * act'(s), and the bias gradient's column sums
// (two-stage, see ColumnSums in common.h). Bytes: reads 2*M*N, writes M*N (dz is skipped for act
// NONE, where dz is dy itself).
template <class T, int ACT>
static void act_grad_rows(const T* dy, const T* s, T* dz, const ColumnSums<T>& sums, int64_t r0,
                          int64_t r1, int64_t n, double slope) {
  using V = typename io<T>::V;
  using C = typename io<T>::C;
  for_summed_row_vectors<T>(r0, r1, n, [&](int64_t r, int64_t j, int64_t k, bool first) {
    V g = load_k(dy + r * n + j, k);
    if constexpr (ACT != NONE) {
      T* dzj = dz + r * n + j;
      g = act_backward<ACT>(g, load_k(s + r * n + j, k), (C)slope);
      store_k(dzj, g, k);
      // db is the sum of dz as stored (rounded to T), like summing the dz tensor.
      g = load_k(dzj, k);
    }
    sums.add(first, j, g, k);
  }, sums);
}

template <class T>
void act_grad(const T* dy, const T* s, T* dz, T* db, int64_t m, int64_t n, int act, double slope,
                  int nthreads) {
  int nt = threads_for(m, n, nthreads);
  ColumnSumBuffers<T> sums(db != nullptr, nt, n);
  dispatch_act(act, [&]<int ACT>() {
    parallel_for(m, n, nthreads, [&](int64_t r0, int64_t r1, int t) {
      act_grad_rows<T, ACT>(dy, s, dz, sums.of(t), r0, r1, n, slope);
    });
  });
  if (db) sum_thread_columns(sums.acc.data(), nt, n, db);
}

#define FL_INSTANTIATE(T)                                                                            \
  template void bias_act_forward<T>(T*, const T*, T*, int64_t, int64_t, int, double, int);           \
  template void act_grad<T>(const T*, const T*, T*, T*, int64_t, int64_t, int, double, int);
FL_INSTANTIATE(float)
FL_INSTANTIATE(double)
FL_INSTANTIATE(bf16)
FL_INSTANTIATE(f16)

}  // namespace fl
