// Entry points of the fused attention kernel (csrc/attention.cpp), instantiated for T in
// {float, double, bf16, f16}.
#pragma once

#include <cstdint>

#include "common.h"

namespace fl {

// One (B, H, rows, D) operand: element strides of its three leading dims; the last dim contiguous.
template <class T>
struct AttnOperand {
  T* p;
  int64_t s[3];
  T* row(int64_t b, int64_t h, int64_t i) const { return p + b * s[0] + h * s[1] + i * s[2]; }
};

// softmax(scale * q k^T [+ causal mask]) v for q (B, H, L, D), k and v (B, H, S, D):
//   o (B, H, L, D) and lse (B, H, L) contiguous, lse = the rows' log-sum-exp of the scaled scores
//   (what the backward recomputes the probabilities from). causal: query i sees keys j <= i
//   (top-left aligned, PyTorch's is_causal). Math in io<T>::C (fp32 for 16-bit T; fp64 for fp64).
template <class T>
void attention_forward(const AttnOperand<const T>& q, const AttnOperand<const T>& k, const AttnOperand<const T>& v,
                       const AttnOperand<T>& o, typename io<T>::C* lse, int64_t B, int64_t H, int64_t L, int64_t S,
                       int64_t D, double scale, bool causal, int nthreads);

// dq, dk, dv from dout and the forward's o and lse (same layouts; dq / dk / dv written, not added).
template <class T>
void attention_backward(const AttnOperand<const T>& q, const AttnOperand<const T>& k, const AttnOperand<const T>& v,
                        const AttnOperand<const T>& o, const AttnOperand<const T>& dout,
                        const typename io<T>::C* lse, const AttnOperand<T>& dq, const AttnOperand<T>& dk,
                        const AttnOperand<T>& dv, int64_t B, int64_t H, int64_t L, int64_t S, int64_t D,
                        double scale, bool causal, int nthreads);

}  // namespace fl
