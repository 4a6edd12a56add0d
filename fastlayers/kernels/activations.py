"""Activation functions and their derivatives as ``@triton.jit`` helpers.

One table, keyed by ``Activation.code``, whose numbers come from fastlayers/activations.py (the C++
extension exports its own and is checked against it at import). ``ACT`` is a ``tl.constexpr``, so
each kernel specialisation keeps one branch only.

Semantics are PyTorch's, formula for formula (the CPU kernels in ATen), so special values match:
    relu(z)        = 0 if z < 0 else z            (relu(-0.) = -0., relu(nan) = nan)
    leaky_relu(z)  = z if z > 0 else z * slope
    gelu(z)        = 0.5 z (1 + erf(z / sqrt 2))  (exact, erf-based)
    gelu_tanh(z)   = 0.5 z (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3), computed as
                     z * sigmoid(2u) = z / (1 + exp(-2u)), which cannot overflow to NaN
    silu(z)        = z / (1 + exp(-z))
    sigmoid(z)     = 1 / (1 + exp(-z))
    tanh(z)        = stable form below (no libdevice tanh in core Triton / the interpreter)
    hardswish(z)   = z * min(max(z + 3, 0), 6) / 6
    hardsigmoid(z) = min(max(z + 3, 0), 6) / 6
    relu6(z)       = min(max(z, 0), 6)             (keeps -0. and NaN, like hardtanh)
    quick_gelu(z)  = z * sigmoid(1.702 z)
    mish(z)        = z * tanh(softplus(z)), tanh(softplus(z)) = n / (n + 2), n = e (e + 2), e = exp(z)
                     (1 above z = 20, where n would overflow)
The clamps are written with tl.where so NaN passes (tl.minimum / tl.maximum may drop it).
Derivatives follow ATen's backward kernels: threshold_backward / leaky_relu_backward (mask from
the saved value), gelu_backward (erf and tanh), silu_backward, sigmoid_backward and
tanh_backward (from the saved output), hardswish_backward / hardsigmoid_backward /
mish_backward (from z), hardtanh_backward for relu6 (from y; 0 < y < 6 <=> 0 < z < 6), and
autograd's product rule for quick_gelu, each in the order of operations of ATen's formula (its
scalar code) so that overflow, inf * 0 and NaN land where PyTorch's do: at NaN hardswish' and
relu6' pass dy, hardsigmoid' is 0. (ATen's vectorised loop, which PyTorch runs on long tensors,
disagrees with its own formula there: hardswish'(nan) = NaN, relu6'(nan) = 0.)

All helpers compute in the dtype of their inputs: callers pass fp32 (fp16/bf16/fp32 data) or fp64.
Float literals are fine in fp64 arithmetic on triton >= 3.2 (kept in the computation type); on
older triton they round to fp32 first (relative error <= 3e-8, inside the fp64 test tolerance).
"""
import triton
import triton.language as tl

from ..activations import ACTIVATIONS


# Activation codes as module constants named after the one table (fastlayers/activations.py):
# GELU for "gelu", ..., so a kernel branches on `ACT == GELU`, never on a number, and a new table
# row needs no line here. tl.constexpr values, so @triton.jit functions may read them as globals.
for _act in ACTIVATIONS.values():
    globals()[_act.name.upper()] = tl.constexpr(_act.code)
del _act

SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)    # 1 / sqrt(2)
GELU_PDF: tl.constexpr = tl.constexpr(0.3989422804014327)   # 1 / sqrt(2 pi)
SQRT_2_PI: tl.constexpr = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
KAPPA: tl.constexpr = tl.constexpr(0.044715)
QUICK_GELU_A: tl.constexpr = tl.constexpr(1.702)
# PyTorch's hardsigmoid' constant, 1/6 rounded to fp32, in every dtype (exact in decimal).
ONE_SIXTH_F32: tl.constexpr = tl.constexpr(0.16666667163372039794921875)


@triton.jit
def sigmoid(z):
    """1 / (1 + exp(-z)): exp overflows to inf for z << 0 and the quotient is then 0, never NaN."""
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def tanh(z):
    """tanh(z), odd and saturating: |z| < 0.3 uses the Taylor series to z^21 (no cancellation;
    truncation error < 2e-16 relative); otherwise 1 - 2 / (exp(2|z|) + 1), which saturates to 1 for
    large |z| (exp -> inf) and loses at most a few ulp of 1 (relative error < 1e-6 in fp32 at
    |z| = 0.3). NaN propagates; tanh(-0.) = -0."""
    a = tl.abs(z)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    s = z * z
    # tanh z = z + z * s * p(s), coefficients 2^2n (2^2n - 1) B_2n / (2n)! (Bernoulli numbers B).
    p = 18888466084.0 / 194896477400625.0
    p = p * s - 443861162.0 / 1856156927625.0
    p = p * s + 6404582.0 / 10854718875.0
    p = p * s - 929569.0 / 638512875.0
    p = p * s + 21844.0 / 6081075.0
    p = p * s - 1382.0 / 155925.0
    p = p * s + 62.0 / 2835.0
    p = p * s - 17.0 / 315.0
    p = p * s + 2.0 / 15.0
    p = p * s - 1.0 / 3.0
    small = z + z * (p * s)
    signed_big = tl.where(z < 0, -big, big)
    return tl.where(a < 0.3, small, signed_big)


@triton.jit
def relu6(t):
    """min(max(t, 0), 6) with NaN passing and relu6(-0.) = -0. (comparisons with NaN are false)."""
    t = tl.where(t < 0, 0.0, t)
    return tl.where(t > 6, 6.0, t)


@triton.jit
def mish_n(z):
    """n = e (e + 2), e = exp(z): tanh(softplus(z)) = n / (n + 2), 1 - tanh^2 = 4 (n + 1) / (n + 2)^2."""
    e = tl.exp(z)
    return e * (e + 2.0)


@triton.jit
def apply_act(z, ACT: tl.constexpr, slope):
    """act(z) for the activation with code ACT; `slope` is leaky_relu's negative slope (ignored
    by the others). Returns a tensor of z's dtype."""
    if ACT == RELU:
        return tl.where(z < 0, 0.0, z)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, z, z * slope)
    elif ACT == GELU:
        return z * 0.5 * (1.0 + tl.math.erf(z * SQRT1_2))
    elif ACT == GELU_TANH:
        u = SQRT_2_PI * (z + KAPPA * (z * z * z))
        return z / (1.0 + tl.exp(-2.0 * u))
    elif ACT == SILU:
        return z / (1.0 + tl.exp(-z))
    elif ACT == SIGMOID:
        return sigmoid(z)
    elif ACT == TANH:
        return tanh(z)
    elif ACT == HARDSWISH:
        return z * relu6(z + 3.0) / 6.0
    elif ACT == HARDSIGMOID:
        return relu6(z + 3.0) / 6.0
    elif ACT == RELU6:
        return relu6(z)
    elif ACT == QUICK_GELU:
        return z * sigmoid(z * QUICK_GELU_A)
    elif ACT == MISH:
        n = mish_n(z)
        return z * tl.where(z > 20.0, 1.0, n / (n + 2.0))
    else:  # NONE
        return z


@triton.jit
def act_grad(dy, saved, ACT: tl.constexpr, slope):
    """dz = dy * act'(z), from what the forward saved: the output y for relu, leaky_relu
    (slope >= 0), sigmoid, tanh and relu6; the pre-activation z for gelu, gelu_tanh, silu,
    hardswish, hardsigmoid, quick_gelu, mish and leaky_relu (slope < 0); nothing for none
    (`saved` is then ignored)."""
    if ACT == RELU:
        # threshold_backward(dy, y, 0): y <= 0 -> 0 (so relu'(0) = 0; NaN passes dy through).
        return tl.where(saved <= 0, 0.0, dy)
    elif ACT == LEAKY_RELU:
        # leaky_relu_backward: s > 0 -> dy, else dy * slope (s is y or z: same sign test).
        return tl.where(saved > 0, dy, dy * slope)
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(saved * SQRT1_2))
        pdf = tl.exp(-0.5 * saved * saved) * GELU_PDF
        return dy * (cdf + saved * pdf)
    elif ACT == GELU_TANH:
        x_sq = saved * saved
        inner = SQRT_2_PI * (saved + KAPPA * (x_sq * saved))
        t = tanh(inner)
        left = 0.5 * saved
        right = 1.0 + t
        right_derivative = left * (1.0 - t * t) * (SQRT_2_PI * (1.0 + 3.0 * KAPPA * x_sq))
        return dy * (0.5 * right + right_derivative)
    elif ACT == SILU:
        sig = 1.0 / (1.0 + tl.exp(-saved))
        return dy * sig * (1.0 + saved * (1.0 - sig))
    elif ACT == SIGMOID:
        return dy * (1.0 - saved) * saved
    elif ACT == TANH:
        return dy * (1.0 - saved * saved)
    elif ACT == HARDSWISH:
        # ATen's formula: 0 (z <= -3), dy (z / 3 + 1/2) (z < 3), else dy: NaN falls through to dy.
        mid = tl.where(saved < 3.0, dy * (saved / 3.0 + 0.5), dy)
        return tl.where(saved <= -3.0, 0.0, mid)
    elif ACT == HARDSIGMOID:
        return tl.where((saved > -3.0) & (saved < 3.0), dy * ONE_SIXTH_F32, 0.0)
    elif ACT == RELU6:
        # hardtanh_backward: 0 where y <= 0 or y >= 6, else dy (NaN passes dy).
        return tl.where((saved <= 0.0) | (saved >= 6.0), 0.0, dy)
    elif ACT == QUICK_GELU:
        # autograd's product rule, in its order: dy sig + ((dy z) (1 - sig) sig) 1.702 (1.702 z may
        # overflow where z does not: sig is then 0 or 1 and the right term 0, not inf * 0 = NaN)
        sig = sigmoid(saved * QUICK_GELU_A)
        return dy * sig + dy * saved * (1.0 - sig) * sig * QUICK_GELU_A
    elif ACT == MISH:
        n = mish_n(saved)
        inv = 1.0 / (n + 2.0)
        big = saved > 20.0
        t = tl.where(big, 1.0, n * inv)
        one_minus_t2 = tl.where(big, 0.0, 4.0 * (n + 1.0) * inv * inv)
        return dy * (t + saved * sigmoid(saved) * one_minus_t2)
    else:  # NONE
        return dy
