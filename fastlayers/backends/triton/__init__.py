"""Triton backend: launches the kernels of fastlayers/kernels/ (the contract is in
fastlayers/backends/contract.py).

Runs on CUDA tensors, and on CPU tensors when the kernels were built for Triton's interpreter
(TRITON_INTERPRET=1 in the environment before fastlayers' kernels are imported), which is how CI
tests every kernel without a GPU.

One module per job:
  device.py      which devices it runs on, a GPU's SM count and capability, the TF32 policy
  launch.py      running a launch (device context, errors naming the op), argument conventions
  gemm.py        the GEMM launcher (autotuning, split-K, the persistent TMA kernel), row sums
  linear_act.py  linear + bias + activation, forward and backward
  gated.py       the gated linear unit
  loss.py        cross entropy and the fused linear + cross entropy's chunk gradients
  norms.py       RMSNorm / LayerNorm with the residual add
  softmax.py     softmax / log_softmax and the attention-score softmax
  rotary.py      rotary position embeddings
(no bare activation pass: ops/activation.py takes another route where a backend has none.)

fp32 GEMMs follow PyTorch's TF32 setting for CUDA matmuls exactly as ``torch.mm`` does (see
``fp32_matmul_precision``: the ``fp32_precision`` API or the legacy ``allow_tf32`` flag; exact
fp32, input_precision="ieee", when TF32 is off, as PyTorch's default). fp64 runs in fp64
throughout, GEMMs included (tl.dot on fp64), so gradcheck goes through these kernels.

Tunables and the backend's state (INTERPRETER_SMS in device.py; AUTOTUNE, SPLIT_K_*, TMA_*, the
tuned-config cache in gemm.py) are defined and read in one module each. This package holds no copy:
reading ``fastlayers.backends.triton.TMA_GEMM`` reads gemm.py's, and assigning it assigns gemm.py's
(``_FORWARDED``), so a value set either way is the one the launchers use.
"""
from __future__ import annotations

import sys
import types

import torch

try:
    import triton  # noqa: F401  (only to say clearly why the backend is unavailable)
except ImportError as e:  # the registry turns this into a BackendUnavailableError
    raise ImportError(
        "the 'triton' backend needs the triton package (pip install 'triton>=3.0', or "
        f"pip install 'fastlayers[triton]'); importing it failed: {e}") from e

from . import device, gemm
from .device import unavailable_reason
from .gated import gated_backward, gated_forward
from .linear_act import linear_act_backward, linear_act_forward
from .loss import (cross_entropy_backward, cross_entropy_forward, linear_ce_chunk_grads, linear_ce_logits,
                   logits_into)
from .norms import norm_backward, norm_forward
from .rotary import rotary
from .softmax import attention_softmax_backward, attention_softmax_forward, softmax_backward, softmax_forward

NAME = "triton"
DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

__all__ = ["NAME", "DTYPES", "unavailable_reason", "linear_act_forward", "linear_act_backward",
           "softmax_forward", "softmax_backward", "gated_forward", "gated_backward",
           "cross_entropy_forward", "cross_entropy_backward", "linear_ce_chunk_grads", "linear_ce_logits", "logits_into",
           "norm_forward", "norm_backward", "rotary", "attention_softmax_forward",
           "attention_softmax_backward"]

# Names of the backend module as it was one file, each read from (and written to) the one module
# that defines and reads it. The contract's functions above are plain attributes instead (the
# dispatch reads them on every call), and never reassigned by the backend.
_FORWARDED = {
    **{name: device for name in ("INTERPRETED", "INTERPRETER_SMS", "fp32_matmul_precision")},
    **{name: gemm for name in ("AUTOTUNE", "SPLIT_K_MIN_CHUNK", "SPLIT_K_MAX", "split_k_count",
                               "TMA_GEMM", "TMA_MIN_M", "TMA_PROGRAMS_PER_SM", "tma_layout_ok",
                               "tma_gemm_ok", "_tuned", "_capturing", "_use_tma_gemm", "_tma_gemm")},
}


def __getattr__(name: str):
    owner = _FORWARDED.get(name)
    if owner is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(owner, name)


def __dir__():
    return sorted(set(globals()) | set(_FORWARDED))


class _Package(types.ModuleType):
    """This package's module type: an assignment to a forwarded name goes to its owner (a copy
    here would shadow the owner's value for readers of the package and never reach the launchers)."""

    def __setattr__(self, name: str, value) -> None:
        owner = _FORWARDED.get(name)
        if owner is None:
            super().__setattr__(name, value)
        else:
            setattr(owner, name, value)

    def __delattr__(self, name: str) -> None:
        if name in _FORWARDED:
            raise AttributeError(f"{__name__}.{name} is {_FORWARDED[name].__name__}.{name}: "
                                 "assign it there (or here), do not delete it")
        super().__delattr__(name)


sys.modules[__name__].__class__ = _Package
