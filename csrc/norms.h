// Entry points of the normalisation kernels (csrc/norms.cpp), instantiated for T in
// {float, double, bf16, f16}. All buffers are contiguous row-major (m, n); per-row statistics
// (mean, rstd) are in the compute type io<T>::C (fp32, or fp64 for double).
#pragma once

#include <cstdint>

#include "common.h"

namespace fl {

// Which normalisation: RMS = torch.nn.functional.rms_norm (fp32 math, weight applied before the one
// rounding to T); RMS_HF = Hugging Face LlamaRMSNorm (fp32 math, rounded to T, then * weight in T);
// LAYER = torch.nn.functional.layer_norm. RMS and RMS_HF differ only for 16-bit T.
enum NormKind { kNormRms = 0, kNormRmsHf = 1, kNormLayer = 2 };

// y = norm(src) * w (+ b), src = x, or x + res when res is not null (then written to s, rounded
// to T as eager `x + res` is: the sum the next block reads, and what the backward reads).
// w, b: (n,) or null (b: LAYER only). mean (LAYER) and rstd: (m,) or null (not saved).
template <class T>
void norm_forward(const T* x, const T* res, T* s, const T* w, const T* b, T* y, typename io<T>::C* mean,
                  typename io<T>::C* rstd, int64_t m, int64_t n, int kind, double eps, int nthreads);

// dx = d norm / d src applied to dy (+ ds, the gradient of the returned sum, when not null);
// dw = sum over rows of dy * xhat, db = sum over rows of dy (each null: not wanted; fp64 per-thread
// partial sums added in thread order). src is what the forward normalised (x, or the sum s).
// dx may be null (only dw / db wanted).
template <class T>
void norm_backward(const T* dy, const T* ds, const T* src, const T* w, const typename io<T>::C* mean,
                   const typename io<T>::C* rstd, T* dx, T* dw, T* db, int64_t m, int64_t n, int kind,
                   int nthreads);

}  // namespace fl
