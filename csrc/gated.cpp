// The elementwise work of the gated linear unit h = act(g) * u, with g = x Wg^T + bg and
// u = x Wu^T + bu (the two GEMMs run in PyTorch's BLAS, called from Python):
//
//   forward   h = act(g + bg) * (u + bu)                          one pass over g and u
//   backward  dg = dh * u * act'(g),  du = dh * act(g)            one pass over dh, g and u,
//             dbg = sum_rows(dg), dbu = sum_rows(du)              fused into the same pass
//
// Layout: row-major (M, N) buffers; h and dh contiguous, g and u with row stride ld, dg and du
// with row stride ldd (ld = ldd = N; or 2N when g | u and dg | du are the two halves of one
// (M, 2N) buffer: the output of one GEMM on the weights [Wg; Wu]). bg, bu, dbg, dbu are (N,). Threads own
// contiguous blocks of whole rows (parallel_for); each bias gradient is summed per thread into its
// own fp64 buffer, then the buffers are added in thread order: deterministic, no atomics.
#include <stdexcept>
#include <vector>

#include "activations.h"
#include "kernels.h"

namespace fl {

// Forward for rows [r0, r1). keep: write g + bg and u + bu back into g and u (the backward's
// saved pre-activations). h may be g itself (in place) when nothing is kept.
// Bytes: reads 2*M*N (+2N), writes M*N (3*M*N when keeping biased g, u).
template <class T, int ACT>
static void gated_rows(T* g, const T* bg, T* u, const T* bu, T* h, bool keep, int64_t r0, int64_t r1,
                       int64_t n, int64_t ld, double slope) {
  using V = typename io<T>::V;
  using C = typename io<T>::C;
  for_row_vectors<T>(r0, r1, n, [=](int64_t r, int64_t j, int64_t k) {
    T* gj = g + r * ld + j;
    T* uj = u + r * ld + j;
    V gv = load_k(gj, k);
    V uv = load_k(uj, k);
    if (bg) gv += load_k(bg + j, k);
    if (bu) uv += load_k(bu + j, k);
    if (keep && bg) store_k(gj, gv, k);
    if (keep && bu) store_k(uj, uv, k);
    // fp16 / bf16: act(g) rounded to T before the product, as eager's act(gate) * up rounds it
    store_k(h + r * n + j, round_to<T>(act_forward<ACT>(gv, (C)slope)) * uv, k);
  });
}

template <class T>
void gated_forward(T* g, const T* bg, T* u, const T* bu, T* h, int64_t m, int64_t n, int64_t ld, int act,
                   double slope, bool keep, int nthreads) {
  dispatch_act(act, [&]<int ACT>() {
    parallel_for(m, 2 * n, nthreads, [&](int64_t r0, int64_t r1, int) {
      gated_rows<T, ACT>(g, bg, u, bu, h, keep, r0, r1, n, ld, slope);
    });
  });
}

// Backward for rows [r0, r1): a = act(g); dg = act'(g) * (dh * u) (act' from g, or from a for
// the activations whose backward reads their output, see activations.h, a rounded to fp16 / bf16
// first as PyTorch saves it); du = dh * a. fp16 / bf16 round a and dh * u to T first, as eager's
// composition does (its forward too: h = rnd(rnd(act(g)) * u)). sums_g and
// sums_u collect the column sums of dg and du (two-stage, see ColumnSums in common.h).
// Bytes: reads 3*M*N, writes 2*M*N.
template <class T, int ACT>
static void gated_grad_rows(const T* dh, const T* g, const T* u, T* dg, T* du, const ColumnSums<T>& sums_g,
                            const ColumnSums<T>& sums_u, int64_t r0, int64_t r1, int64_t n, int64_t ld,
                            int64_t ldd, double slope, bool from_output) {
  using V = typename io<T>::V;
  using C = typename io<T>::C;
  for_summed_row_vectors<T>(r0, r1, n, [&](int64_t r, int64_t j, int64_t k, bool first) {
    V dhv = load_k(dh + r * n + j, k);
    V gv = load_k(g + r * ld + j, k);
    V uv = load_k(u + r * ld + j, k);
    V a = act_forward<ACT>(gv, (C)slope);
    // From the output: for fp16 / bf16 rounded to T first, as PyTorch's composition saves it
    // (tanh(g) rounding to 1 gives tanh' = 0 there: inf * 0 = NaN for an infinite dh * u).
    V saved = from_output ? round_to<T>(a) : gv;
    // fp16 / bf16: eager's autograd rounds dh * u (the gradient of act(g)) and multiplies dh by the
    // rounded act(g) it saved; both roundings are the identity for fp32 / fp64.
    V dgv = act_backward<ACT>(round_to<T>(dhv * uv), saved, (C)slope);
    V duv = dhv * round_to<T>(a);
    store_k(dg + r * ldd + j, dgv, k);
    store_k(du + r * ldd + j, duv, k);
    // Bias gradients: sums of the unrounded gradients (fp32 for bf16 / fp16 storage), one
    // rounding at the end.
    sums_g.add(first, j, dgv, k);
    sums_u.add(first, j, duv, k);
  }, sums_g, sums_u);
}

template <class T>
void gated_backward(const T* dh, const T* g, const T* u, T* dg, T* du, T* dbg, T* dbu, int64_t m,
                    int64_t n, int64_t ld, int64_t ldd, int act, double slope, bool from_output, int nthreads) {
  int nt = threads_for(m, 3 * n, nthreads);
  ColumnSumBuffers<T> sums_g(dbg != nullptr, nt, n), sums_u(dbu != nullptr, nt, n);
  dispatch_act(act, [&]<int ACT>() {
    parallel_for(m, 3 * n, nthreads, [&](int64_t r0, int64_t r1, int t) {
      gated_grad_rows<T, ACT>(dh, g, u, dg, du, sums_g.of(t), sums_u.of(t), r0, r1, n, ld, ldd, slope,
                              from_output);
    });
  });
  if (dbg) sum_thread_columns(sums_g.acc.data(), nt, n, dbg);
  if (dbu) sum_thread_columns(sums_u.acc.data(), nt, n, dbu);
}

#define FL_INSTANTIATE(T)                                                                               \
  template void gated_forward<T>(T*, const T*, T*, const T*, T*, int64_t, int64_t, int64_t, int, double, bool, \
                                 int);                                                                    \
  template void gated_backward<T>(const T*, const T*, const T*, T*, T*, T*, T*, int64_t, int64_t, int64_t,    \
                                  int64_t, int, double, bool, int);
FL_INSTANTIATE(float)
FL_INSTANTIATE(double)
FL_INSTANTIATE(bf16)
FL_INSTANTIATE(f16)

}  // namespace fl
