// Entry points of the attention-score softmax (csrc/attention_softmax.cpp). Scores x and the
// outputs are contiguous (B, H, L, S); softmax over S for each of the B*H*L rows. Instantiated for
// (T, U) = (float, float), (double, double), (bf16, bf16), (f16, f16), (bf16, float), (f16, float):
// T the scores' (and dscores') storage, U the probabilities' (y, dy).
#pragma once

#include <cstdint>

#include "common.h"

namespace fl {

// The mask, read by strides (elements; 0 on broadcast dims), never expanded: kind 0 none, 1 bool
// (uint8: nonzero = takes part), 2 floating in T (added). strides: b, h, l, s.
enum AttnMaskKind { kAttnMaskNone = 0, kAttnMaskBool = 1, kAttnMaskFloat = 2 };
struct AttnMask {
  const void* p = nullptr;
  int kind = kAttnMaskNone;
  int64_t sb = 0, sh = 0, sl = 0, ss = 0;
};

// y = softmax over S of z, z = round_T(round_T(x * scale) + mask) (the mask add only for a float mask),
// -inf where a bool mask is false or (causal) column j > row i; computed in io<T>::C, rounded once to U.
template <class T, class U>
void attention_softmax_forward(const T* x, AttnMask mask, U* y, int64_t B, int64_t H, int64_t L, int64_t S,
                               double scale, bool causal, int nthreads);

// dx = keep ? y * (dy - sum_row(dy * y)) * scale : 0, keep = the bool mask (a float mask is not
// read: pass kind 0) and causal. Computed in io<T>::C, rounded once to T.
template <class T, class U>
void attention_softmax_backward(const U* dy, const U* y, AttnMask mask, T* dx, int64_t B, int64_t H, int64_t L,
                                int64_t S, double scale, bool causal, int nthreads);

}  // namespace fl
