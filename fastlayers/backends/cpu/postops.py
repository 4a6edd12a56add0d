"""oneDNN's fused-linear post-ops and the probe that says which of them match PyTorch exactly.

relu has no post-op here: oneDNN's relu maps NaN to 0, PyTorch's keeps NaN; so does its leaky_relu
with slope 0 (and +0 where PyTorch's gives -0). Each post-op is probed per dtype before first use,
special values included, and one that differs from PyTorch's is not fused: with torch 2.13, fp32
"gelu" (erf) writes +0 for z <= -8 where F.gelu gives -0, so fp32 GELU takes the "onednn" route
(GEMM + bias, then our pass). The cache of probe results lives in gemm.py (_onednn_ok).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ONEDNN_POSTOPS = {  # activation name -> (attr, takes negative_slope as its scalar, algorithm)
    "none": ("none", False, ""),
    "leaky_relu": ("leaky_relu", True, ""),
    "gelu": ("gelu", False, "none"),
    "gelu_tanh": ("gelu", False, "tanh"),
    "silu": ("swish", False, ""),
    "sigmoid": ("sigmoid", False, ""),
    "tanh": ("tanh", False, ""),
}

# Probe inputs: pre-activations where activations are easy to get wrong (signs of zero, NaN,
# +-inf, under/overflow), next to ordinary values. Accepted at +-inf: PyTorch's value or the
# mathematical limit (PyTorch's own values there are IEEE artefacts of its formulas).
_PROBE_Z = [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 8.0, -8.0, 13.0, -13.0,
            20.0, -20.0, 88.0, -88.0, 100.0, -100.0, 1e20, -1e20, 3e38, -3e38, float("nan")]
_LIMITS = {"none": (float("inf"), float("-inf")), "leaky_relu": (float("inf"), float("-inf")),
           "gelu": (float("inf"), 0.0), "gelu_tanh": (float("inf"), 0.0), "silu": (float("inf"), 0.0),
           "sigmoid": (1.0, 0.0), "tanh": (1.0, -1.0)}


def _probe_matches(y: Tensor, ref: Tensor, tol: float) -> bool:
    """y (oneDNN) vs ref (PyTorch, same dtype): same NaNs, same signs of zero, values within tol
    (absolute 1e-30 for results PyTorch keeps as tiny non-zeros)."""
    y, ref = y.double(), ref.double()
    if not torch.equal(y.isnan(), ref.isnan()):
        return False
    zero = ref == 0
    if not torch.equal(torch.signbit(y[zero]), torch.signbit(ref[zero])) or (y[zero] != 0).any():
        return False
    ok = ~ref.isnan()
    return bool(torch.isclose(y[ok], ref[ok], rtol=tol, atol=1e-30).all())


def exact_postops(dtype: torch.dtype, linear_pointwise: Callable[..., Tensor]) -> frozenset:
    """The activations (keys of ONEDNN_POSTOPS) that `linear_pointwise` (oneDNN's fused linear,
    torch.ops.mkldnn._linear_pointwise's arguments) gets exactly right for `dtype` -- the values at
    the special points above, and a small random case with a bias -- checked against PyTorch's own
    ops. Empty when the op is missing or fails for the dtype, or "none" (the plain GEMM + bias) is
    wrong. The caller runs it outside autocast and autograd."""
    good = set()
    if dtype in (torch.float32, torch.bfloat16, torch.float16) and torch.backends.mkldnn.is_available():
        refs = {"none": lambda z, s: z, "leaky_relu": lambda z, s: F.leaky_relu(z, s),
                "gelu": lambda z, s: F.gelu(z), "gelu_tanh": lambda z, s: F.gelu(z, approximate="tanh"),
                "silu": lambda z, s: F.silu(z), "sigmoid": lambda z, s: torch.sigmoid(z),
                "tanh": lambda z, s: torch.tanh(z)}
        # x (S, 16) with the probe values in column 0, w (37, 16) with ones in column 0:
        # z = x @ w.T is each probe value across 37 columns (vectorised main part and tail), and
        # (S, 1) @ (1, 1) (oneDNN's kernels differ by shape: fp32 gelu's signs of zero differed
        # only in the second). The sign of a zero z is the GEMM's (+0 for -0 + 0), so the
        # reference runs on PyTorch's own GEMM.
        special = torch.zeros(len(_PROBE_Z), 16, dtype=dtype)
        special[:, 0] = torch.tensor(_PROBE_Z, dtype=dtype)
        picker = torch.zeros(37, 16, dtype=dtype)
        picker[:, 0] = 1
        cases = [(special, picker), (special[:, :1].contiguous(), picker[:1, :1].contiguous())]
        inf = torch.tensor([[float("inf")], [float("-inf")]], dtype=dtype)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(37, 19, generator=g).to(dtype)
        w = (torch.randn(23, 19, generator=g) / 4).to(dtype)
        b = torch.randn(23, generator=g).to(dtype)
        z = F.linear(x.float(), w.float(), b.float())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for name, (attr, scalar, alg) in ONEDNN_POSTOPS.items():
            for slope in ([0.01, -0.2] if scalar else [0.0]):  # (slope 0 is never fused: gemm.py)
                scalars = [slope] if scalar else []
                try:
                    ys = [linear_pointwise(a, p, None, attr, scalars, alg) for a, p in cases]
                    yi = linear_pointwise(inf, torch.ones(1, 1, dtype=dtype), None, attr, scalars, alg)
                    yr = linear_pointwise(x, w, b, attr, scalars, alg)
                except Exception:  # a torch without the op, or oneDNN without this dtype
                    break
                ref_s = [refs[name](F.linear(a, p), slope) for a, p in cases]
                ref_i = refs[name](inf, slope).flatten().tolist()
                limits = _LIMITS[name] if slope >= 0 else (float("inf"), float("inf"))
                if (yr.dtype != dtype or yr.shape != z.shape
                        or not all(y.dtype == dtype and _probe_matches(y, r, tol) for y, r in zip(ys, ref_s))
                        or not torch.allclose(yr.float(), refs[name](z, slope), rtol=tol, atol=tol)
                        or not all(v in (r, lim) or (v != v and r != r)
                                   for v, r, lim in zip(yi.flatten().tolist(), ref_i, limits))):
                    break
            else:
                good.add(name)
    return frozenset(good) if "none" in good else frozenset()
