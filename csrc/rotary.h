// Entry point of the rotary-embedding kernel (csrc/rotary.cpp), instantiated for T in
// {float, double, bf16, f16}.
#pragma once

#include <cstdint>

#include "common.h"

namespace fl {

// One operand (q or k) of the rotary kernel. x and out: (n0, n1, n2, d) with element strides
// (xs / os, 1): any strides for the three leading dims, the last dim contiguous. cos and sin:
// (n0, n1, n2, r), already broadcast to x's leading dims (strides cs / ss, 0 on broadcast dims;
// last dim contiguous). The first r <= d dims of each row rotate, the rest are copied.
template <class T>
struct RotaryOperand {
  const T* x;
  T* out;
  const T* cos;
  const T* sin;
  int64_t n[3], xs[3], os[3], cs[3], ss[3];
  int64_t d;
};

// out = rot(x) for q and k in one parallel pass over all their rows (q's rows, then k's).
// rotate_half layout (interleaved false; pairs (i, i + r/2)) or GPT-J's (interleaved; pairs (2i, 2i+1)):
//   forward (inverse false): out = x * cos + rotate(x) * sin            (Hugging Face's formula)
//   inverse (the backward):  out = x * cos + rotate^T(x * sin)          (dq from dq_embed)
// Math in io<T>::C (fp32 for 16-bit T). fp32 / fp64: one rounding per element; bf16 / fp16: eager's
// roundings in T -- each product rounded to T, then the sum (bit for bit PyTorch's CPU result).
template <class T>
void rotary_apply(const RotaryOperand<T>& q, const RotaryOperand<T>& k, int64_t r, bool interleaved, bool inverse,
                  int nthreads);

}  // namespace fl
