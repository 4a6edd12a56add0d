"""The rotary application fastlayers.swap routes to fastlayers.rotary, for the swapped model only.

How Hugging Face models reach ``apply_rotary_pos_emb`` (transformers 5.x with the ``kernels``
package installed; read in transformers/integrations/hub_kernels.py and kernels' layer.py):

* ``@use_kernel_forward_from_hub("rotary_pos_emb")`` turns the module-level function into an
  instance of a generated ``nn.Module`` class ``Func`` (class attribute ``kernel_layer_name =
  "rotary_pos_emb"``) whose forward calls the function -- unless a per-model override is active.
* ``@use_kernelized_func(apply_rotary_pos_emb)`` on the attention class gives every attention
  *instance* a private ``Func`` instance in a plain dict attribute (not a submodule):
  ``attn.__dict__["_kernel_funcs"]["rotary_pos_emb"]``, and wraps its forward so that during the
  call the global function's id maps (through a context variable) to that private wrapper: the
  global ``apply_rotary_pos_emb(q, k, cos, sin)`` then calls ``wrapper(...)`` -- under
  torch.compile, ``wrapper.forward.__func__`` directly. kernels' ``kernelize`` swaps a kernel in
  by setting ``wrapper.forward`` on that instance.

swap does what kernelize does, per attention instance: it sets the private wrapper's ``forward`` to
one calling fastlayers.rotary. Other models (other attention instances, other wrappers) keep Hugging
Face's function. Only where the function behaves as Llama's: its signature is ``(q, k, cos, sin,
unsqueeze_dim=1)`` and, probed on small inputs (float32 and bfloat16; GQA head counts;
unsqueeze_dim 1 and 2; a rotary dim below the head dim, where it must either raise, as Llama's
does, or pass the extra dims through, as GPT-NeoX's does), it returns fastlayers.rotary's exact
result. Otherwise, or where the wrapper already runs another kernel (kernelize), it is left alone
with the reason in the report. Where the function is a plain global -- model families that do not
mark it (113 of the 211 modeling files defining apply_rotary_pos_emb in transformers 5.25, GPT-NeoX
among them; 98 mark it), or any family without the ``kernels`` package -- replacing it would change
every model in the process: left alone, said once per model.
"""
from __future__ import annotations

import inspect
from types import MethodType
from typing import Dict, Optional

import torch
from torch import nn

from ..ops.rotary import rotary, rotary_composite
from .report import SwapReport

LAYER_NAME = "rotary_pos_emb"
_SIGNATURE = [("q", inspect.Parameter.empty), ("k", inspect.Parameter.empty), ("cos", inspect.Parameter.empty),
              ("sin", inspect.Parameter.empty), ("unsqueeze_dim", 1)]


def fastlayers_rotary_forward(self, q, k, cos, sin, unsqueeze_dim=1):
    """The forward swap gives a model's private ``rotary_pos_emb`` wrapper (``self``, unused: under
    torch.compile Hugging Face calls it with the global wrapper instead)."""
    return rotary(q, k, cos, sin, unsqueeze_dim)


def _original(wrapper: nn.Module):
    """The function a kernels ``Func`` wrapper calls, or None."""
    try:
        return inspect.getclosurevars(type(wrapper).forward).nonlocals.get("func")
    except (TypeError, ValueError):
        return None


def _probe_problem(fn) -> Optional[str]:
    """None when fn(q, k, cos, sin, unsqueeze_dim) gives fastlayers.rotary's results, else why not."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(dtype)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            for ud, r in ((1, 8), (2, 8), (1, 4)):
                if ud == 1:
                    q, k = rnd(2, 3, 5, 8, dtype=dtype), rnd(2, 1, 5, 8, dtype=dtype)
                else:
                    q, k = rnd(2, 5, 3, 8, dtype=dtype), rnd(2, 5, 1, 8, dtype=dtype)
                cos, sin = rnd(2, 5, r, dtype=dtype), rnd(2, 5, r, dtype=dtype)
                try:
                    got = fn(q, k, cos, sin, unsqueeze_dim=ud)
                except Exception as e:  # noqa: BLE001
                    if r < q.shape[-1]:  # Llama's own function refuses a partial rotary dim
                        continue
                    return f"its apply_rotary_pos_emb failed on a probe input ({type(e).__name__})"
                want = rotary_composite(q, k, cos.unsqueeze(ud), sin.unsqueeze(ud), False)
                if (not isinstance(got, (tuple, list)) or len(got) != 2
                        or any(not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype
                               for g, w in zip(got, want))):
                    return "its apply_rotary_pos_emb returns other shapes / dtypes than Llama's"
                if not all(torch.equal(g, w) for g, w in zip(got, want)):
                    return "its apply_rotary_pos_emb computes another formula than Llama's rotate_half"
    return None


def _wrapper_problem(wrapper: nn.Module, cache: Dict[int, Optional[str]]) -> Optional[str]:
    if "forward" in wrapper.__dict__:
        return "its rotary_pos_emb wrapper already runs another kernel (set by kernels' kernelize)"
    fn = _original(wrapper)
    if fn is None or not callable(fn):
        return "the function behind its rotary_pos_emb wrapper was not found"
    key = id(fn)
    if key not in cache:
        try:
            params = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
        except (TypeError, ValueError):
            params = None
        if params != _SIGNATURE:
            cache[key] = (f"its apply_rotary_pos_emb has the signature {params}, not Llama's "
                          "(q, k, cos, sin, unsqueeze_dim=1)")
        else:
            cache[key] = _probe_problem(fn)
    return cache[key]


def _plain_global_user(m: nn.Module) -> bool:
    """Whether m's class forward calls a global ``apply_rotary_pos_emb`` that is a plain function
    (transformers without the kernels package)."""
    fwd = getattr(type(m), "forward", None)
    code = getattr(fwd, "__code__", None)
    if code is None or "apply_rotary_pos_emb" not in code.co_names:
        return False
    fn = getattr(fwd, "__globals__", {}).get("apply_rotary_pos_emb")
    return inspect.isfunction(fn)


def swap_rotary(model: nn.Module, report: SwapReport) -> None:
    """Route model's attention modules' rotary application to fastlayers.rotary (module docstring);
    entries go to report.replaced ("<attention path>.rotary_pos_emb", "fastlayers.rotary") and
    report.left (path, reason)."""
    cache: Dict[int, Optional[str]] = {}
    plain = None
    for path, m in model.named_modules():
        funcs = m.__dict__.get("_kernel_funcs")
        if not isinstance(funcs, dict):
            if plain is None and _plain_global_user(m):
                plain = path
            continue
        for name, wrapper in funcs.items():
            if getattr(type(wrapper), "kernel_layer_name", None) != LAYER_NAME or not isinstance(wrapper, nn.Module):
                continue
            where = f"{path}.{name}" if path else name
            current = wrapper.__dict__.get("forward")
            if isinstance(current, MethodType) and current.__func__ is fastlayers_rotary_forward:
                report.replaced.append((where, "fastlayers.rotary"))  # swapped before
                continue
            why = _wrapper_problem(wrapper, cache)
            if why is not None:
                report.left.append((where, why))
                continue
            wrapper.forward = MethodType(fastlayers_rotary_forward, wrapper)
            report.replaced.append((where, "fastlayers.rotary"))
    if plain is not None:
        report.left.append((plain, "its apply_rotary_pos_emb is a plain module-level function (a model family "
                                   "that does not mark it with @use_kernel_forward_from_hub / @use_kernelized_func, "
                                   "or transformers without the `kernels` package): replacing it would change every "
                                   "model in the process"))
