"""The contract every backend module implements, as a typing.Protocol (tests/backends/test_backend_contract.py
checks each backend against it: every member present, the same parameter names and defaults).

Backends compute on contiguous 2-D / 3-D tensors; validation, flattening, autograd and the route
live above them (fastlayers/_dispatch.py, fastlayers/ops/).
A gradient not needed is None; `needs` tuples say which are.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable, FrozenSet, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import Tensor

from ..activations import Activation

Grads3 = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]


@runtime_checkable
class Backend(Protocol):
    NAME: str
    DTYPES: FrozenSet[torch.dtype]  # dtypes its kernels accept

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when it can run on tensors of `device`, else why not."""

    # --- linear + bias + activation
    def linear_act_forward(self, x: Tensor, w: Tensor, b: Optional[Tensor], act: Activation, slope: float,
                           save: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """x: (M, K), w: (N, K) (any strides), b: (N,) or None -> (y (M, N) contiguous, saved).
        save=False: nothing is needed for backward (saved is None; work may be in place).
        save=True: saved = y for act.saves(slope) == "output", the pre-activation z (M, N) for
        "input", None for "nothing". Never written into afterwards."""

    def linear_act_backward(self, dy: Tensor, x: Optional[Tensor], w: Optional[Tensor], saved: Optional[Tensor],
                            act: Activation, slope: float, needs: Tuple[bool, bool, bool]) -> Grads3:
        """dy: (M, N) contiguous; needs = (need_dx, need_dw, need_db) -> (dx, dw, db)."""

    # --- softmax / log_softmax
    def softmax_forward(self, x: Tensor, log: bool) -> Tensor:
        """x: (outer, L, inner) contiguous, softmax over dim 1; y contiguous, same dtype."""

    def softmax_backward(self, dy: Tensor, y: Tensor, log: bool) -> Tensor:
        """dy, y: (outer, L, inner) contiguous; y is the forward's output."""

    # --- gated linear unit
    def gated_forward(self, x: Tensor, wg: Tensor, wu: Tensor, bg: Optional[Tensor], bu: Optional[Tensor],
                      act: Activation, slope: float, save: bool):
        """h = act(x @ wg.T + bg) * (x @ wu.T + bu); x: (M, K), wg / wu: (N, K) (any strides),
        bg / bu: (N,) contiguous or None -> (h (M, N) contiguous, saved); saved = (g, u), the
        biased pre-activations (M, N), when save, else None (work may be in place)."""

    def gated_backward(self, dh: Tensor, x: Tensor, wg: Tensor, wu: Tensor, saved, act: Activation, slope: float,
                       needs: Tuple[bool, bool, bool, bool, bool]):
        """dh: (M, N) contiguous, saved = (g, u); needs = (dx, dwg, dwu, dbg, dbu) -> those five."""

    # --- cross entropy (the math: fastlayers/ops/_loss.py)
    def cross_entropy_forward(self, x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                              eps: float) -> Tuple[Tensor, Tensor]:
        """x: (N, C) contiguous; target: (N,) int64 class indices, each in [0, C) or == ignore_index
        (checked before), or (N, C) contiguous class probabilities in x's dtype; weight: (C,)
        contiguous in the compute dtype (float64 for float64 x, else float32) or None; eps: label
        smoothing >= 0. -> (loss (N,) per row in the compute dtype, 0 for ignored rows; stats (N, 3)
        = (row max M, log sum exp(x - M), sum of the row's coefficients A))."""

    def cross_entropy_backward(self, x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                               scale: Tensor, ignore_index: int, eps: float, out: Optional[Tensor], col0: int = 0,
                               classes: Optional[int] = None) -> Tensor:
        """out (N, C) contiguous in x's dtype (may be x itself; None: a new tensor) = scale_i *
        dloss_i/dx; scale: (N,) compute dtype. With col0 / classes (class-index targets only): x is
        the columns [col0, col0 + C) of rows with `classes` classes, stats (and weight (classes,))
        those of the whole rows; a target outside the block contributes only its smoothing share."""

    def linear_ce_logits(self, h: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
        """A chunk of linear_cross_entropy's logits, h (m, H) @ w (V', H)^T + b (V',), (m, V')
        contiguous, with linear_act_forward's bits for act "none": into out (the start of the
        first chunk's logits, which the op reuses for every chunk: a fresh 50 MB result costs its
        page faults each time) where logits_into says so, else (or out None) a new tensor."""

    def logits_into(self, h: Tensor, w: Tensor, b: Optional[Tensor]) -> bool:
        """Whether linear_ce_logits writes these operands' logits into a given out (else the op
        keeps no buffer: holding one the backend does not use would add a chunk to the peak)."""

    def linear_ce_chunk_grads(self, dz: Tensor, h: Tensor, w: Tensor, dh: Optional[Tensor], dw: Optional[Tensor],
                              db: Optional[Tensor], accumulate: bool) -> None:
        """dz: (m, V') contiguous dlogits of a block of tokens (h: (m, H)) and vocabulary entries
        (w: (V', H)). dh (m, H), dw (V', H), db (V',) = dz @ w, dz^T @ h, colsum(dz), or += when
        accumulate; each in dz's dtype or the compute dtype (an accumulator for 16-bit dz; db summed
        in the compute dtype), possibly a row block of a contiguous tensor; any may be None."""

    # --- RMSNorm / LayerNorm with the residual add (fastlayers/ops/norms.py)
    def norm_forward(self, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                     eps: float, kind: str, save: bool):
        """x, residual: (M, N) contiguous; kind "rms" | "rms_hf" | "layer" -> (y, s, mean, rstd):
        s = x + residual (None without one), mean ("layer") and rstd (M,) in the compute dtype
        (None when not save)."""

    def norm_backward(self, dy: Tensor, ds: Optional[Tensor], src: Tensor, weight: Optional[Tensor],
                      mean: Optional[Tensor], rstd: Tensor, kind: str, needs) -> Grads3:
        """dy, ds (the returned sum's gradient or None), src (what the forward normalised): (M, N)
        contiguous -> (dx, dw, db) for needs = (dx, dw, db)."""

    # --- rotary position embeddings (fastlayers/ops/rotary.py)
    def rotary(self, q: Tensor, k: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor, sin_k: Tensor,
               out_q: Tensor, out_k: Tensor, interleaved: bool, inverse: bool) -> None:
        """Writes out = x * cos + rotate(x) * sin (inverse: x * cos + rotate^T(x * sin)) for x = q, k:
        4-D views, any strides but a contiguous last dim (D); cos_* / sin_*: (*x.shape[:3], R) views
        broadcast to x (stride 0 allowed), R even <= D; dims [R, D) are copied. rotate: rotate_half
        (pairs (i, i + R/2)) or, interleaved, GPT-J's pairs (2i, 2i+1)."""

    # --- attention-score softmax (fastlayers/ops/attention_softmax.py)
    def attention_softmax_forward(self, x: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                                  out_dtype: torch.dtype) -> Tensor:
        """x: (B, H, L, S) contiguous scores; mask None or a (B, H, L, S) strided view (stride 0 on
        broadcast dims) of a bool (True takes part) or x-dtype (added) mask; causal: column j > row i
        masked -> softmax over S of masked(x * scale [+ mask]), (B, H, L, S) contiguous in out_dtype
        (x's, or float32 for 16-bit x)."""

    def attention_softmax_backward(self, dy: Tensor, y: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                                   in_dtype: torch.dtype) -> Tensor:
        """dy, y: (B, H, L, S) contiguous (y the forward's output); mask as the forward's (only a bool
        one is read) -> dscores = keep ? y * (dy - sum(dy * y)) * scale : 0, contiguous in in_dtype."""


@runtime_checkable
class FusedAttention(Protocol):
    """Optional members (fastlayers/ops/attention.py; a backend without them: PyTorch's
    scaled_dot_product_attention runs)."""

    def attention_forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float,
                          causal: bool) -> Tuple[Tensor, Tensor]:
        """q: (B, H, L, D), k, v: (B, H, S, D), any strides with a contiguous last dim -> (out, lse):
        out = softmax(scale q k^T [causal: key j > query i masked]) v, (B, H, L, D) laid out as
        torch.empty_like(q), in q's dtype; lse (B, H, L) contiguous, the rows' logsumexp of the
        scaled scores in the compute dtype (float32; float64 for float64)."""

    def attention_backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           scale: float, causal: bool) -> Grads3:
        """dout, out as q; the forward's out and lse -> (dq, dk, dv) laid out as torch.empty_like(q),
        (k), (v)."""


@runtime_checkable
class PackedGemm(Protocol):
    """Optional members (a backend without them: FusedLinear calls linear_act_forward; F.linear is
    taken for activation "none" where plain_linear_gain is absent)."""

    def plain_linear_gain(self, m: int, k: int, n: int, dtype: torch.dtype, packed: bool = False) -> bool:
        """Whether linear_act with activation "none" beats F.linear for (M, K) x (N, K)^T of dtype."""

    def prepack_weight(self, w: Tensor, batch_hint: int) -> Optional[Tensor]:
        """An opaque copy of w (N, K) laid out for this backend's GEMM, or None where it has none."""

    def linear_act_forward_packed(self, x: Tensor, w: Tensor, b: Optional[Tensor], act: Activation, slope: float,
                                  packed: Callable[[ModuleType, Tensor, int], Optional[Tensor]]) -> Tensor:
        """== linear_act_forward(x, w, b, act, slope, save=False)[0]; packed(backend, w, M) gives the
        caller's cached prepack_weight(w, M) or None; called only when the chosen GEMM reads it."""
