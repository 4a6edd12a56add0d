// Entry points of the CPU kernels, instantiated for T in {float, double, bf16, f16}.
// All buffers are contiguous; `nthreads` is torch.get_num_threads() from the Python launcher.
#pragma once

#include <cstdint>

#include "common.h"

namespace fl {

// y = act(z + b) over a row-major (m, n) z; b is (n,) or null. y == z works in place; otherwise
// z is overwritten with z + b (the backward's saved pre-activation) and y gets act(z + b).
template <class T>
void bias_act_forward(T* z, const T* b, T* y, int64_t m, int64_t n, int act, double slope, int nthreads);

// dz = dy * act'(s) over (m, n) and, if db is not null, db = column sums of dz (fp64 accumulation).
// s is what the forward saved (see activations.h); for act NONE, s and dz are null and only db is made.
template <class T>
void act_grad(const T* dy, const T* s, T* dz, T* db, int64_t m, int64_t n, int act, double slope,
                  int nthreads);

// (log_)softmax over dim 1 of a contiguous (outer, len, inner) x into y.
template <class T>
void softmax_forward(const T* x, T* y, int64_t outer, int64_t len, int64_t inner, bool log, int nthreads);

// dx from dy and the forward's output y, same layout.
template <class T>
void softmax_backward(const T* dy, const T* y, T* dx, int64_t outer, int64_t len, int64_t inner, bool log,
                      int nthreads);

// Gated linear unit, elementwise part (csrc/gated.cpp); g, u, h row-major (m, n) (g and u with row
// stride ld), bg, bu (n,) or null.
// h = act(g + bg) * (u + bu). keep: g and u are overwritten with g + bg and u + bu (the backward's
// saved pre-activations); h may equal g when keep is false (in place).
template <class T>
void gated_forward(T* g, const T* bg, T* u, const T* bu, T* h, int64_t m, int64_t n, int64_t ld, int act,
                   double slope, bool keep, int nthreads);

// dg = dh * u * act'(g), du = dh * act(g) from the biased pre-activations g, u; dbg / dbu (if not
// null) = column sums of dg / du; g, u have row stride ld, dg, du row stride ldd, dh is contiguous.
// from_output: act' is evaluated from act(g) (the activations
// whose backward reads their output) rather than from g.
template <class T>
void gated_backward(const T* dh, const T* g, const T* u, T* dg, T* du, T* dbg, T* dbu, int64_t m, int64_t n,
                    int64_t ld, int64_t ldd, int act, double slope, bool from_output, int nthreads);

// Softmax cross-entropy over the rows of a contiguous (n, nc) x (csrc/loss.cpp has the math).
// Exactly one of target ((n,) class indices, each in [0, nc) or == ignore_index: checked, throws
// std::out_of_range) and probs ((n, nc) class probabilities) is non-null; weight: (nc,) or null.
// loss: (n,) per-row losses; stats: (n, 3) = (row max, log sum exp(x - max), sum of coefficients).
// Weights, losses, stats and scales are in the compute type io<T>::C (fp32, or fp64 for double).
template <class T>
void cross_entropy_forward(const T* x, const int64_t* target, const T* probs, const typename io<T>::C* weight,
                           typename io<T>::C* loss, typename io<T>::C* stats, int64_t n, int64_t nc,
                           int64_t ignore_index, double eps, int nthreads);

// dx = scale_i * dloss_i/dx over (n, nc), from x and the forward's stats; dx may be x (in place).
// x may be the columns [col0, col0 + nc) of rows with `classes` classes (class-index targets, in
// [0, classes); weight (classes,)); stats are then those of the whole rows. Else col0 = 0, classes = nc.
template <class T>
void cross_entropy_backward(const T* x, const int64_t* target, const T* probs, const typename io<T>::C* weight,
                            const typename io<T>::C* stats, const typename io<T>::C* scale, T* dx, int64_t n,
                            int64_t nc, int64_t col0, int64_t classes, int64_t ignore_index, double eps,
                            int nthreads);

}  // namespace fl
