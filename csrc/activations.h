// The CPU activation table: forward act(z) and backward dz = dy * act'(saved), written once over
// math vectors (vf: 16 x fp32, vd: 8 x fp64). Codes match fastlayers/activations.py.
//
// fp32 math is vectorised with our own polynomials (a scalar std::erf/exp loop was measured slower
// than eager PyTorch); fp64 calls the C library per lane (it is the exact, gradcheck path).
// Semantics follow PyTorch's formulas so special values agree: relu(-0) = -0, relu(nan) = nan,
// sigmoid = 1 / (1 + exp(-x)), silu = x / (1 + exp(-x)), NaN in -> NaN out.
#pragma once

#include <cmath>
#include <stdexcept>
#include <type_traits>

#include "common.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace fl {

enum Act {
  NONE = 0, RELU = 1, LEAKY_RELU = 2, GELU = 3, GELU_TANH = 4, SILU = 5, SIGMOID = 6, TANH = 7,
  HARDSWISH = 8, HARDSIGMOID = 9, RELU6 = 10, QUICK_GELU = 11, MISH = 12, kNumActs
};
// Names by code, as in fastlayers/activations.py: exported as _C.ACTIVATION_CODES and checked
// against the Python table when fastlayers.backends.cpu (the cpp backend) is imported.
inline constexpr const char* kActNames[kNumActs] = {"none", "relu", "leaky_relu", "gelu", "gelu_tanh",
                                                    "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
                                                    "relu6", "quick_gelu", "mish"};

// ----------------------------------------------------------------------------- fp32 vector math
// exp: x = n ln2 + r, |r| <= ln2/2; e^r = 1 + r + r^2 P(r) by Horner, 6 FMAs (P: our weighted
// least-squares fit, max rel. error 6.9e-8 in fp32 evaluation); then 2^n. NaN propagates;
// results that are subnormal or overflow to inf come out right.
static inline vf exp_poly(vf r) {
  vf p = splat<vf>(1.381453420e-03f);
  p = p * r + 8.362821492e-03f;
  p = p * r + 4.166788885e-02f;
  p = p * r + 1.666658019e-01f;
  p = p * r + 4.999999803e-01f;
  p = p * r + 1.f;
  return p * r + 1.f;
}

// exp for the activations. Results below exp(-87) (1.6e-38) are flushed to 0: a subnormal result
// costs a microcode assist of ~100+ cycles (measured: GELU's backward 20x slower on pre-activations
// of magnitude ~13), and none of the activations can tell such a value from 0 (1 + e, t * e ...).
// Softmax, whose outputs are these values, uses vexp_nonpos below, which keeps subnormals.
#ifdef __AVX512F__
// AVX-512: vscalefps applies 2^n with IEEE overflow in one instruction, and min/max(bound, x)
// return x when x is NaN, so clamping keeps NaN.
static inline vf vexp(vf x) {
  __mmask16 tiny = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  __m512 xc = _mm512_min_ps(_mm512_set1_ps(89.f), _mm512_max_ps(_mm512_set1_ps(-87.f), (__m512)x));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  return (vf)_mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps((__m512)exp_poly((vf)r), n));
}
#else
static inline vf vexp(vf x) {
  vf xc = x < -87.f ? splat<vf>(-87.f) : x;
  xc = xc > 89.f ? splat<vf>(89.f) : xc;       // exp(89) is inf in fp32
  vf n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = exp_poly(r);
  vi ni = __builtin_convertvector(n, vi);
  vi n1 = ni >> 1, n2 = ni - n1;  // 2^n in two halves: each stays a normal float
  vf s1 = (vf)((vu)(n1 + 127) << 23), s2 = (vf)((vu)(n2 + 127) << 23);
  return x < -87.f ? vf{} : p * s1 * s2;
}
#endif

// exp(d) for d <= 0 (softmax's x - max; NaN passes): exp(d) = 2^t, t = d log2(e) = n + f,
// |f| <= 1/2, 2^f by a degree-6 polynomial (our fit: 9.7e-8 max rel. error). Two operations fewer
// than vexp; t's rounding costs |d| * 6e-8 relative, the same as rounding x - max itself.
static inline vf vexp_nonpos(vf d) {
#ifdef __AVX512F__
  __m512 t = _mm512_max_ps(_mm512_set1_ps(-152.f), _mm512_mul_ps((__m512)d, _mm512_set1_ps(1.44269504088896341f)));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf f = (vf)_mm512_sub_ps(t, n);
  vf p = splat<vf>(1.533766875e-04f);
  p = p * f + 1.339986587e-03f;
  p = p * f + 9.618519236e-03f;
  p = p * f + 5.550328983e-02f;
  p = p * f + 2.402264661e-01f;
  p = p * f + 6.931472056e-01f;
  p = p * f + 1.f;
  return (vf)_mm512_scalef_ps((__m512)p, n);
#else
  return vexp(d);
#endif
}
// exp(d) for d <= 0 inside the activations: the 2^t form of vexp_nonpos, with results below
// exp(-87) flushed to 0 like vexp (no subnormal intermediates). |d| * 6e-8 relative error.
static inline vf vexp_nonpos_flush(vf d) {
#ifdef __AVX512F__
  __mmask16 tiny = _mm512_cmp_ps_mask((__m512)d, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  vf dc = (vf)_mm512_max_ps(_mm512_set1_ps(-87.f), (__m512)d);  // no subnormal is ever formed
  return (vf)_mm512_maskz_mov_ps(~tiny, (__m512)vexp_nonpos(dc));
#else
  return vexp(d);
#endif
}

// 1 / x for finite x >= 1: rcp14 + one Newton step on AVX-512.
static inline vf vrcp_finite(vf x) {
#ifdef __AVX512F__
  vf e = (vf)_mm512_rcp14_ps((__m512)x);
  return e * (2.f - x * e);
#else
  return 1.f / x;
#endif
}

// 1 / x for x >= 1 (x = 1 + exp(.), which may be inf): on AVX-512 a 14-bit estimate refined by
// one Newton step (<= 2 ulp) instead of the divider; 1 / inf = 0 is kept explicitly.
static inline vf vrcp(vf x) {
#ifdef __AVX512F__
  vf e = (vf)_mm512_rcp14_ps((__m512)x);
  vf r = e * (2.f - x * e);
  return x == __builtin_inff() ? vf{} : r;
#else
  return 1.f / x;
#endif
}
static inline vd vrcp(vd x) { return 1.0 / x; }

static inline vf vabs(vf x) { return (vf)((vu)x & 0x7fffffffu); }
static inline vf vcopysign(vf mag, vf sgn) { return (vf)(((vu)mag & 0x7fffffffu) | ((vu)sgn & 0x80000000u)); }

// tanh: odd polynomial for |x| < 0.625, else 1 - 2 / (e^{2|x|} + 1) (never inf / inf).
static inline vf vtanh(vf x) {
  vf a = vabs(x);
  vf z = x * x;
  vf p = splat<vf>(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  vf small = p * z * x + x;
  vf large = vcopysign(1.f - 2.f / (vexp(a + a) + 1.f), x);
  return a < 0.625f ? small : large;
}

// Standard normal CDF Phi(x) = erfc(-x / sqrt2) / 2, with relative accuracy in both tails (no
// 1 - erf cancellation for x << 0), and in *e (when asked) exp(-x^2 / 2), which GELU's derivative
// needs for the density: both from one exp. erfc(a) / 2 = t P(t) exp(-a^2), a = |x| / sqrt2,
// t = 1 / (1 + 0.33 a), P of degree 7 (our weighted fit of erfcx(a) / t on a in [0, 9.4], which
// covers every a whose exp(-a^2) is a normal fp32: max relative error 8.2e-8, halved into the
// coefficients). The exponent is -x^2 / 2 from x itself (one rounding), not -a^2 from the rounded
// a. Measured against libm (2026-12-07, Xeon, AVX-512): GELU fp32 max abs error 3.8e-7, relative
// 7.3e-6 down to 1e-30 in the left tail (PyTorch's: 1.2e-6 abs, 1e-3 relative at x = -3.4);
// 7.2 ns per 16 lanes forward, 7.4 backward, against 9.3 / 13.6 for the degree-9 exp(R(t)) form
// this replaced (bench/results/cpu-routes.md).
static inline vf vnormcdf(vf x, vf* e_out = nullptr) {
  vf a = vabs(x * 0.70710678118654752f);
#ifdef __AVX512F__
  vf ac = (vf)_mm512_min_ps(_mm512_set1_ps(10.f), (__m512)a);  // NaN passes
#else
  vf ac = a > 10.f ? splat<vf>(10.f) : a;
#endif
  // beyond a = 9.4 exp(.) is flushed to 0; the clamp keeps t finite and positive (a = inf)
  vf t = vrcp_finite(1.f + 0.33f * ac);
  vf p = splat<vf>(-0.06796477141820206f);
  p = p * t + 0.23134566655085112f;
  p = p * t - 0.1777221519423759f;
  p = p * t + 0.20627328985116647f;
  p = p * t + 0.022503989990593755f;
  p = p * t + 0.10096232313064421f;
  p = p * t + 0.09141855351411998f;
  p = p * t + 0.09318305944400258f;
  vf e = vexp_nonpos_flush(-0.5f * (x * x));  // exp(-a^2); 0 at |x| = inf, NaN at NaN
  if (e_out) *e_out = e;
  vf half_erfc = t * p * e;  // erfc(a) / 2
  return x < 0.f ? half_erfc : 1.f - half_erfc;
}

// ----------------------------------------------------------------------------- fp64: libm per lane
template <class Fn> static inline vd per_lane(vd x, Fn fn) {
  vd r{};
  for (int i = 0; i < 8; ++i) r[i] = fn(x[i]);
  return r;
}
static inline vd vexp(vd x) { return per_lane(x, [](double v) { return std::exp(v); }); }
static inline vd vexp_nonpos(vd x) { return vexp(x); }
static inline vd vexp_nonpos_flush(vd x) { return vexp(x); }
static inline vd vtanh(vd x) { return per_lane(x, [](double v) { return std::tanh(v); }); }
static inline vd vnormcdf(vd x, vd* e_out = nullptr) {
  if (e_out) *e_out = per_lane(x, [](double v) { return std::exp(-0.5 * v * v); });
  return per_lane(x, [](double v) { return 0.5 * std::erfc(-v * 0.70710678118654752440); });
}

// Mish: t = tanh(softplus(z)) = n / (n + 2) with n = e (e + 2), e = exp(z), since
// tanh(log(1 + e)) = ((1 + e)^2 - 1) / ((1 + e)^2 + 1): one exp and one division, no log or tanh.
// Above z = 20, t is 1 to within 1e-17 (and n would overflow): t = 1 there.
// fp64 evaluates PyTorch's own formula per lane (tanh(log1p(exp(z)))).
static inline vf vmish_t(vf z, vf* one_minus_t2) {
  vf e = vexp(z);
  vf n = e * (e + 2.f);
  vf inv = 1.f / (n + 2.f);
  vf t = z > 20.f ? splat<vf>(1.f) : n * inv;
  if (one_minus_t2) *one_minus_t2 = z > 20.f ? vf{} : 4.f * (n + 1.f) * inv * inv;  // no 1 - t*t cancellation
  return t;
}
static inline vd vmish_t(vd z, vd* one_minus_t2) {
  vd t = per_lane(z, [](double v) { return std::tanh(std::log1p(std::exp(v))); });
  if (one_minus_t2) *one_minus_t2 = 1.0 - t * t;
  return t;
}

// ----------------------------------------------------------------------------- the table
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)
constexpr double kTanhBeta = 0.79788456080286535588;    // sqrt(2 / pi)
constexpr double kTanhKappa = 0.044715;
constexpr double kQuickGelu = 1.702;                     // quick_gelu(z) = z sigmoid(1.702 z)
constexpr float kOneSixthF = 1.0f / 6.0f;                // PyTorch's hardsigmoid' constant (fp32 1/6, all dtypes)

// min(max(z + 3, 0), 6): NaN passes (comparisons with NaN are false), like std::max / std::min.
template <class V, class C>
static inline V relu6_of(V t) {
  t = t < C(0) ? V{} : t;
  return t > C(6) ? splat<V>(C(6)) : t;
}

// y = act(z). slope is used by LEAKY_RELU only.
template <int ACT, class V, class C>
static inline V act_forward(V z, C slope) {
  if constexpr (ACT == NONE) return z;
  if constexpr (ACT == RELU) return z < C(0) ? V{} : z;  // keeps -0 and NaN, like torch
  if constexpr (ACT == LEAKY_RELU) return z > C(0) ? z : z * slope;
  if constexpr (ACT == GELU) return z * vnormcdf(z);
  if constexpr (ACT == GELU_TANH) {
    // 0.5 z (1 + tanh(u)) == z * sigmoid(2u): no inf/inf for large |z|.
    V u = C(kTanhBeta) * (z + C(kTanhKappa) * z * z * z);
    return z * vrcp(C(1) + vexp(C(-2) * u));
  }
  if constexpr (ACT == SILU) return z * vrcp(C(1) + vexp(-z));
  if constexpr (ACT == SIGMOID) return vrcp(C(1) + vexp(-z));
  if constexpr (ACT == TANH) return vtanh(z);
  if constexpr (ACT == HARDSWISH) return z * relu6_of<V, C>(z + C(3)) / C(6);  // z < -3: z * 0 = -0, like torch
  if constexpr (ACT == HARDSIGMOID) return relu6_of<V, C>(z + C(3)) / C(6);
  if constexpr (ACT == RELU6) return relu6_of<V, C>(z);  // keeps -0 and NaN
  if constexpr (ACT == QUICK_GELU) return z * vrcp(C(1) + vexp(C(-kQuickGelu) * z));
  if constexpr (ACT == MISH) return z * vmish_t(z, (V*)nullptr);
}

// dz = dy * act'(.) from `s`, the tensor the forward saved: the output y for RELU, SIGMOID, TANH,
// RELU6 and LEAKY_RELU with slope >= 0; the pre-activation z for GELU, GELU_TANH, SILU,
// HARDSWISH, HARDSIGMOID, QUICK_GELU, MISH and LEAKY_RELU with slope < 0 (for LEAKY_RELU `s > 0` is
// the same test either way; for RELU6 `s <= 0 or s >= 6` too). ATen's formulas (the scalar code of
// its CPU kernels), tests and order of operations included, so NaN, inf * 0 and overflow land where
// PyTorch's do (tests/test_activation_grid.py); ATen's vectorised loop differs from its own formula
// at NaN for hardswish and relu6 (NaN and 0 there), and PyTorch runs it on long tensors only.
// sigmoid(t) = 1 / (1 + e^-t), and 1 - sigmoid(t) in *om without cancellation: as e^-t sigmoid(t)
// where sigmoid(t) >= 1/2 (1 - sg there loses the low bits that the derivatives below multiply by
// z: gelu_tanh' at z = 4 was off by ~2e-6 absolute, twice PyTorch's error, before). e^-t = inf
// gives sg = 0 and om = 1; NaN stays NaN.
template <class V, class C>
static inline V sigmoid_and_complement(V t, V* om) {
  V e = vexp(-t);
  V sg = vrcp(C(1) + e);
  *om = sg < C(0.5) ? C(1) - sg : e * sg;
  return sg;
}

template <int ACT, class V, class C>
static inline V act_backward(V dy, V s, C slope) {
  if constexpr (ACT == NONE) return dy;
  if constexpr (ACT == RELU) return s <= C(0) ? V{} : dy;  // relu'(0) = 0; NaN passes dy, like torch
  if constexpr (ACT == LEAKY_RELU) return s > C(0) ? dy : dy * slope;
  if constexpr (ACT == GELU) {
    V e;  // exp(-s^2 / 2), from vnormcdf's own exp
    V cdf = vnormcdf(s, &e);
    return dy * (cdf + s * (C(kInvSqrt2Pi) * e));
  }
  if constexpr (ACT == GELU_TANH) {
    V x2 = s * s;
    V u = C(kTanhBeta) * (s + C(kTanhKappa) * x2 * s);
    V om;
    V sg = sigmoid_and_complement<V, C>(C(2) * u, &om);  // (1 + tanh u) / 2, and 1 - that
    // d/dz [z sg] with 1 - tanh^2 u = 4 sg (1 - sg)
    V right = C(2) * s * sg * om * C(kTanhBeta) * (C(1) + C(3 * kTanhKappa) * x2);
    return dy * (sg + right);
  }
  if constexpr (ACT == SILU) {
    V om;
    V sg = sigmoid_and_complement<V, C>(s, &om);
    return dy * sg * (C(1) + s * om);
  }
  if constexpr (ACT == SIGMOID) return dy * (C(1) - s) * s;
  if constexpr (ACT == TANH) return dy * (C(1) - s * s);
  if constexpr (ACT == HARDSWISH) {
    // ATen's formula: 0 (z <= -3), dy (z / 3 + 1/2) (z < 3), else dy: NaN falls through to dy.
    V mid = s < C(3) ? dy * (s / C(3) + C(0.5)) : dy;
    return s <= C(-3) ? V{} : mid;
  }
  if constexpr (ACT == HARDSIGMOID) return (s > C(-3)) & (s < C(3)) ? dy * C(kOneSixthF) : V{};
  // hardtanh_backward's formula: 0 where z <= 0 or z >= 6 (so 0 at 0 and 6), else dy: NaN passes dy.
  // From y: y <= 0 <=> z <= 0, y >= 6 <=> z >= 6, y NaN <=> z NaN (clamping is exact).
  if constexpr (ACT == RELU6) return (s <= C(0)) | (s >= C(6)) ? V{} : dy;
  if constexpr (ACT == QUICK_GELU) {
    // Autograd's product rule on z * sigmoid(1.702 z), in its order: dy sg + ((dy z) (1 - sg) sg) 1.702
    // (mul's, sigmoid_backward's, mul-by-scalar's). 1.702 z may overflow where z does not: sg is
    // then 0 or 1 and the right term (dy z) * 0 = 0, finite, as in PyTorch (1.702 z sg om was NaN).
    V om;
    V sg = sigmoid_and_complement<V, C>(C(kQuickGelu) * s, &om);
    return dy * sg + dy * s * om * sg * C(kQuickGelu);
  }
  if constexpr (ACT == MISH) {
    V omt2;
    V t = vmish_t(s, &omt2);
    V sg = vrcp(C(1) + vexp(-s));
    return dy * (t + s * sg * omt2);
  }
}

// Calls f.template operator()<ACT>() for the runtime activation code: tries the codes from A up
// (one instantiation of f per activation; a new code below kNumActs needs no edit here).
template <int A = 0, class F>
static void dispatch_act(int act, F&& f) {
  if constexpr (A == kNumActs) {
    throw std::invalid_argument("fastlayers._C: unknown activation code");
  } else if (act == A) {
    f.template operator()<A>();
  } else {
    dispatch_act<A + 1>(act, f);
  }
}

}  // namespace fl
