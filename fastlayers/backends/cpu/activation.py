"""The C++ bias + activation pass (csrc/: bias_act_forward, act_grad), used as the GEMMs' epilogue
(gemm.py, gated.py) and as the bare activation op (fastlayers.ops.activation: an activation module
on its own, e.g. Hugging Face's GELU classes)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...activations import SAVE_INPUT, SAVE_OUTPUT, Activation
from ._ext import _C, _buf, _empty

# Activations whose forward pass runs faster in PyTorch's own kernel than in ours, by dtype: used
# where the pass has nothing else to fuse (the bias already in the GEMM, z kept for the backward).
# bf16 GELU (erf) only; see bench/results/cpu-routes.md.
_ATEN_PASS = {torch.bfloat16: frozenset({"gelu"})}


def _epilogue(z: Tensor, bias: Optional[Tensor], act: Activation, slope: float,
             kind: Optional[str]) -> Tuple[Tensor, Optional[Tensor]]:
    """y = act(z + bias) by the C++ pass; z (M, N) contiguous, ours to overwrite unless kept.
    kind: act.saves(slope) when the backward needs something, else None -> (y, saved)."""
    m, n = z.shape
    if act.name == "none" and bias is None:
        return z, None
    if bias is None and act.name in _ATEN_PASS.get(z.dtype, ()):
        # PyTorch's own kernel measured faster: see _ATEN_PASS (with or without grad: same bits)
        if kind == SAVE_INPUT:
            return act.ref(z, slope), z
        y = act.ref_(z, slope)
        return y, (y if kind == SAVE_OUTPUT else None)
    if kind == SAVE_INPUT:
        y = _empty(m, n, dtype=z.dtype)  # z (+ bias) is kept for the backward, y is new
        _C.bias_act_forward(_buf(z), _buf(bias), _buf(y), act.code, slope, torch.get_num_threads())
        return y, z
    zb = _buf(z)
    _C.bias_act_forward(zb, _buf(bias), zb, act.code, slope, torch.get_num_threads())  # in place
    return z, (z if kind == SAVE_OUTPUT else None)


def act_forward(z: Tensor, act: Activation, slope: float) -> Tensor:
    """y = act(z): z (M, N) contiguous, only read; y new (M, N) contiguous. One pass per row on
    the threads' own rows: reads and writes M*N elements (bf16 GELU: ATen's pass, see _ATEN_PASS)."""
    if act.name == "none":
        return z.clone()
    y, _ = _epilogue(z, None, act, slope, SAVE_INPUT)  # SAVE_INPUT: y is a new buffer, z stays as it is
    return y


def act_grad(dy: Tensor, saved: Tensor, act: Activation, slope: float) -> Tensor:
    """dz = dy * act'(z): dy, saved (M, N) contiguous, saved = y where act.saves(slope) == "output",
    else z. One pass: reads 2*M*N, writes M*N elements."""
    if act.name == "none":
        return dy
    dz = _empty(*dy.shape, dtype=dy.dtype)
    _C.act_grad(_buf(dy), _buf(saved), _buf(dz), None, act.code, slope, torch.get_num_threads())
    return dz
