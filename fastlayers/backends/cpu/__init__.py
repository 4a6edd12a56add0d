"""The CPU backend, registered as "cpp": GEMMs through PyTorch's BLAS (MKL / oneDNN), everything
around them fused in fastlayers._C (csrc/). Inputs arrive validated and laid out per the contract in
fastlayers/backends/contract.py; here we only allocate, call BLAS and call the kernels.

One module per job:
  _ext.py        the extension: import, code check, buffer descriptors, the output allocator
  gemm.py        GEMM routes (MKL / oneDNN fused / oneDNN + pass), linear + activation, prepacking,
                 and the tunables that steer them (ROUTE, ONEDNN_MIN_MACS, TORCH_OPS_MAX_OUT, ...)
  postops.py     oneDNN's post-ops and the probe of which ones match PyTorch
  activation.py  the C++ bias + activation pass; the bare activation op
  gated.py  loss.py  norms.py  softmax.py  attention.py  rope.py   one op family each

Tunables (ROUTE, ONEDNN_MIN_MACS, TORCH_OPS_MAX_OUT, TORCH_SOFTMAX_MAX_NUMEL, ...): each is defined and
read in one submodule only (gemm.py, softmax.py), and set or patched there; readers elsewhere go
through that module (fastlayers._dispatch: `backend.gemm.ROUTE`). The package holds no copy to go
stale and no forwarding __getattr__: in Python 3.11 a module __getattr__ costs ~300 ns per forwarded
read and makes every other attribute read of the module ~3x slower (28 vs 8 ns: the interpreter
stops specialising them), on a path where a whole tiny no-grad linear takes ~3.5 us.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import gemm, softmax  # (the tunables' modules, read as backend.gemm.ROUTE etc.)
from ._ext import DTYPES
from .activation import act_forward, act_grad
from .attention import (attention_backward, attention_forward, attention_softmax_backward,
                        attention_softmax_forward)
from .gated import gated_backward, gated_forward
from .gemm import (linear_act_backward, linear_act_forward, linear_act_forward_packed, plain_linear_gain,
                   prepack_weight)
from .loss import cross_entropy_backward, cross_entropy_forward, linear_ce_chunk_grads, linear_ce_logits, logits_into
from .norms import norm_backward, norm_forward
from .rope import rotary
from .softmax import softmax_backward, softmax_forward

NAME = "cpp"

__all__ = [
    "NAME", "DTYPES", "unavailable_reason", "linear_act_forward", "linear_act_backward", "softmax_forward",
    "softmax_backward", "gated_forward", "gated_backward", "cross_entropy_forward", "cross_entropy_backward",
    "linear_ce_chunk_grads", "linear_ce_logits", "logits_into", "norm_forward", "norm_backward", "rotary", "attention_softmax_forward",
    "attention_softmax_backward", "act_forward", "act_grad", "plain_linear_gain", "prepack_weight",
    "linear_act_forward_packed", "attention_forward", "attention_backward",
]


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else "the cpp backend runs on CPU tensors only"
