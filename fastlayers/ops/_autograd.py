"""Each op's autograd written once, and the route every op takes once its arguments are checked.

An op states its forward, what its backward keeps and its backward once, as a FusedOp subclass;
define() builds from those one definition

  - ``spec.Function``: an autograd.Function for eager calls (no dispatcher round trip: a custom
    op costs ~4x an autograd.Function per call, 50 vs 12 us measured), and
  - the torch.library ops ``fastlayers::<name>`` and ``fastlayers::<name>_backward`` with their
    fake kernels and autograd registered, which torch.compile, torch.export, jit.trace and
    TorchScript record as opaque nodes (each picks its backend when it runs, as eager does).

Both call the same forward, save() and backward; the create_graph backward (higher orders, as
PyTorch ops) is the op's backward_graph, called from the Function only (the registered backward
op is first-order, as any opaque op).

The library forward returns the op's outputs, then its extras (intermediates the backward reuses:
non-differentiable outputs), a 0-element placeholder where one is None (custom ops cannot return
None, nor alias their inputs or each other: an output that would is copied). The backward op takes
(grads, saved, needs, *params) and returns one gradient per tensor input (placeholders where not
needed).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._dispatch import backend_for, composite_reason, owned, placeholder

Tensors = Tuple[Optional[Tensor], ...]


class FusedOp:
    """One op's definition. Subclasses set the attributes and override the methods marked so."""

    name: str = ""              # the library ops: fastlayers::<name>, fastlayers::<name>_backward
    public: str = ""            # "fastlayers.<op>": error messages and backend selection
    schema: str = ""            # the forward's arguments: the n_inputs tensors first, then the params
    n_inputs: int = 1           # tensor inputs (gradients flow to these)
    n_outputs: int = 1          # differentiable outputs
    n_extras: int = 0           # then internal outputs (the library op's only; see forward)
    shared_grads: Dict[int, int] = {}  # input i -> input j: i receives j's gradient (computed once)
    contiguous_outputs: bool = True    # the library ops' outputs are made contiguous (as the fakes say)

    # ------------------------------------------------------------------ to override
    def check(self, inputs: Tensors, params: tuple) -> None:
        """The argument checks the library forward repeats (TorchScript calls it directly)."""

    def backend(self, device: torch.device, dtype: torch.dtype, params: tuple):
        return backend_for(self.public, device, dtype)

    def forward(self, backend, inputs: Tensors, params: tuple, save: bool) -> Tuple[Tensors, Tensors]:
        """(outputs, extras): extras are what save() may keep besides inputs and outputs (None
        when save is False)."""
        raise NotImplementedError

    def save(self, inputs: Tensors, outputs: Tensors, extras: Tensors, params: tuple) -> Tensors:
        """What the backward keeps: a selection of inputs, outputs and extras (no copies)."""
        raise NotImplementedError

    def backward(self, backend, saved: Tensors, grads: Tensors, needs: Tuple[bool, ...],
                 params: tuple) -> Tensors:
        """One gradient per tensor input (None where needs says no), from the saved tensors and one
        gradient per output (zeros for an output that got none)."""
        raise NotImplementedError

    def backward_graph(self, saved: Tensors, grads: Tensors, needs: Tuple[bool, ...], params: tuple) -> Tensors:
        """backward() as a graph of PyTorch ops (create_graph=True: exact higher orders)."""
        raise NotImplementedError

    def fake(self, inputs: Tensors, params: tuple) -> Tensors:
        """The library forward's outputs and extras as empty tensors of their shapes and strides."""
        raise NotImplementedError

    def fake_backward(self, saved: Tensors, grads: Tensors, needs: Tuple[bool, ...], params: tuple) -> Tensors:
        """The gradients' metadata as empty tensors (placeholders for inputs backward() gives None;
        define() replaces those not needed by placeholders)."""
        raise NotImplementedError

    def backward_device(self, saved: Tensors, grads: Tensors) -> Tensor:
        """The tensor whose device and dtype pick the backward op's backend."""
        return saved[0]

    # ------------------------------------------------------------------ built by define()
    Function: Any = None
    library: Any = None
    library_backward: Any = None

    def run(self, inputs: Tensors, params: tuple, composite, use_composite: bool = False) -> Tensors:
        """The route of a checked call (autocast already applied): the registered op while
        torch.compile / jit.trace record; ``composite(inputs, params)`` (PyTorch ops) when the op
        asks for it (use_composite) and for tensors kernels must not read (fake tensors,
        subclasses, torch.func transforms, dispatch modes); the Function when a gradient is
        needed; else the backend's forward, nothing saved. Returns the outputs (a tuple of
        n_outputs; None where the op gives none; the registered op's placeholders are its own)."""
        recording = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if recording and self.library is not None:
            outs = self.library(*inputs, *params)
            return tuple(outs[:self.n_outputs]) if isinstance(outs, (tuple, list)) else (outs,)
        if recording or use_composite or composite_reason(*inputs) is not None:  # (an op without
            # registered ops records its composite: Inductor fuses elementwise formulas itself)
            return composite(inputs, params)
        if torch.is_grad_enabled() and _any_requires_grad(inputs):
            outs = self.Function.apply(*inputs, *params)
            return outs if self.n_outputs > 1 else (outs,)
        x = inputs[0]
        return self.forward(self.backend(x.device, x.dtype, params), inputs, params, False)[0]

    def needs(self, needs_input_grad: Sequence[bool]) -> Tuple[bool, ...]:
        """Per tensor input, whether its gradient is computed: its own, or one it shares."""
        if not self.shared_grads:
            return tuple(needs_input_grad[:self.n_inputs])
        needs = list(needs_input_grad[:self.n_inputs])
        for i, j in self.shared_grads.items():
            needs[j] = needs[j] or needs[i]
        return tuple(needs)

    def share(self, grads: Tensors, needs_input_grad: Sequence[bool]) -> list:
        """The gradients autograd gets: shared ones filled in, None where an input needs none."""
        out = list(grads)
        for i, j in self.shared_grads.items():
            out[i] = out[j]
        for i in range(self.n_inputs):  # (plain loops: this runs on every backward call)
            if not needs_input_grad[i]:
                out[i] = None
        return out


def _any_requires_grad(inputs: Tensors) -> bool:
    for t in inputs:
        if t is not None and t.requires_grad:
            return True
    return False


# --------------------------------------------------------------------------- the eager Function
def _function(spec: FusedOp) -> type:
    n, single = spec.n_inputs, spec.n_outputs == 1

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            inputs, params = args[:n], args[n:]
            backend = spec.backend(inputs[0].device, inputs[0].dtype, params)
            outs, extras = spec.forward(backend, inputs, params, True)
            if single:
                outs = (owned(outs[0]),)  # own tensors, not views
            else:
                outs = tuple([None if o is None else owned(o) for o in outs])
            ctx.backend, ctx.params = backend, params
            ctx.save_for_backward(*spec.save(inputs, outs, extras, params))
            return outs[0] if single else outs

        @staticmethod
        def backward(ctx, *grads):
            saved, needs_input_grad = ctx.saved_tensors, ctx.needs_input_grad
            needs = spec.needs(needs_input_grad)
            if torch.is_grad_enabled():  # create_graph=True
                g = spec.backward_graph(saved, grads, needs, ctx.params)
            else:
                g = spec.backward(ctx.backend, saved, grads, needs, ctx.params)
            return (*spec.share(g, needs_input_grad), *(None,) * len(ctx.params))

    Function.__name__ = Function.__qualname__ = type(spec).__name__ + "Function"
    return Function


# --------------------------------------------------------------------------- the library ops
def _fresh(ts, inputs) -> list:
    """Custom-op outputs: placeholders for None (of the first input tensor's dtype), copies of any
    that alias an input or each other."""
    out, seen = [], {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    like = next(t for t in inputs if isinstance(t, Tensor))
    for t in ts:
        if t is None:
            out.append(placeholder(like))
            continue
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out.append(t)
    return out


def _library(spec: FusedOp) -> None:
    n, n_out = spec.n_inputs, spec.n_outputs
    n_ret = n_out + spec.n_extras
    ret = "Tensor" if n_ret == 1 else "(" + ", ".join(["Tensor"] * n_ret) + ")"

    def forward(*args):
        inputs, params = args[:n], args[n:]
        spec.check(inputs, params)
        backend = spec.backend(inputs[0].device, inputs[0].dtype, params)
        outs, extras = spec.forward(backend, inputs, params, True)
        res = _fresh(tuple(outs) + tuple(extras), inputs)
        if spec.contiguous_outputs:
            res = [t.contiguous() for t in res]
        return res[0] if n_ret == 1 else tuple(res)

    def fake(*args):
        res = spec.fake(args[:n], args[n:])
        return res[0] if n_ret == 1 else tuple(res)

    def backward_op(grads, saved, needs, *params):
        dev = spec.backward_device(tuple(saved), tuple(grads))
        backend = spec.backend(dev.device, dev.dtype, params)
        g = spec.backward(backend, tuple(saved), tuple(grads), tuple(needs), params)
        res = _fresh([gi if need else None for gi, need in zip(g, needs)], list(saved) + list(grads))
        return [t.contiguous() for t in res] if spec.contiguous_outputs else res

    def fake_backward(grads, saved, needs, *params):
        like = next(t for t in list(saved) + list(grads) if t is not None)  # as _fresh's placeholders
        fakes = spec.fake_backward(tuple(saved), tuple(grads), tuple(needs), params)
        return [f if need else placeholder(like) for f, need in zip(fakes, needs)]

    def setup_context(ctx, inputs, output) -> None:
        ins, params = inputs[:n], inputs[n:]
        output = output if isinstance(output, (tuple, list)) else (output,)
        outs, extras = tuple(output[:n_out]), tuple(output[n_out:])
        if extras:
            ctx.mark_non_differentiable(*extras)
        ctx.params = params
        ctx.save_for_backward(*spec.save(ins, outs, extras, params))

    def autograd_backward(ctx, *grads):
        needs = spec.needs(ctx.needs_input_grad)
        g = spec.library_backward(list(grads[:n_out]), list(ctx.saved_tensors), list(needs), *ctx.params)
        return (*spec.share(g, ctx.needs_input_grad), *(None,) * len(ctx.params))

    params = spec.schema.split(",")[n:]
    spec.library = torch.library.custom_op(f"fastlayers::{spec.name}", forward, mutates_args=(),
                                           schema=f"({spec.schema}) -> {ret}")
    spec.library.register_fake(fake)
    spec.library_backward = torch.library.custom_op(
        f"fastlayers::{spec.name}_backward", backward_op, mutates_args=(),
        schema=f"(Tensor?[] grads, Tensor?[] saved, bool[] needs{',' if params else ''}{','.join(params)}) -> Tensor[]")
    spec.library_backward.register_fake(fake_backward)
    torch.library.register_autograd(f"fastlayers::{spec.name}", autograd_backward, setup_context=setup_context)


DEFINED: Dict[str, FusedOp] = {}  # name -> definition, every op define() has built


def define(spec: FusedOp, library: bool = True) -> FusedOp:
    """Builds spec.Function and (library=True) the torch.library ops from spec; returns spec."""
    spec.Function = _function(spec)
    if library:
        _library(spec)
    DEFINED[spec.name] = spec
    return spec
