"""torch.ao.quantization.quantize_dynamic and the modules swap makes (see README / swap docstring).

quantize_dynamic picks the modules to quantize by their *exact* type (its qconfig_spec, default
``{nn.Linear, ...}``), then replaces each through a type -> quantized-class mapping. A FusedLinear
is an nn.Linear subclass, so a spec naming only nn.Linear skips it. This module registers
FusedLinear in torch's default dynamic mapping (an additive registry entry: no torch function is
patched), so that ``quantize_dynamic(model, {nn.Linear, fl.FusedLinear}, dtype=torch.qint8)``
quantizes every Linear of a swapped model:

* FusedLinear(activation="none") becomes torch's own ``nn.quantized.dynamic.Linear``;
* a FusedLinear with an activation becomes QuantizedFusedLinear: torch's dynamic quantized Linear
  followed by the same activation (dropping the activation would silently change the model).

The gate / up Linears of a fused gated MLP stay nn.Linear: quantize_dynamic replaces them, and the
rewritten forward notices the change and runs the original forward (rewrite.changed).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import activations as _acts
from ..nn import FusedLinear

try:
    from torch.ao.nn.quantized.dynamic import Linear as _DynamicLinear
    from torch.ao.quantization.quantization_mappings import DEFAULT_DYNAMIC_QUANT_MODULE_MAPPINGS as _MAPPING
except ImportError:  # a torch without ao.quantization: nothing to register
    _DynamicLinear = None
    _MAPPING = None


if _DynamicLinear is not None:
    class QuantizedFusedLinear(_DynamicLinear):
        """torch's dynamic quantized Linear, then a FusedLinear's activation (made by from_float)."""

        activation = "none"
        negative_slope = _acts.DEFAULT_SLOPE

        def forward(self, x):
            y = super().forward(x)
            return _acts.get(self.activation, "fastlayers.QuantizedFusedLinear").ref(y, self.negative_slope)

        def extra_repr(self) -> str:
            return f"{super().extra_repr()}, activation={self.activation}"

        @classmethod
        def from_float(cls, mod, use_precomputed_fake_quant=False):
            if not isinstance(mod, FusedLinear):
                raise TypeError(f"QuantizedFusedLinear.from_float expects a fastlayers.FusedLinear, "
                                f"got {type(mod).__name__}")
            plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            plain.weight, plain.bias = mod.weight, mod.bias
            plain.qconfig = mod.qconfig
            q = _DynamicLinear.from_float(plain, use_precomputed_fake_quant=use_precomputed_fake_quant)
            if mod.activation != "none":
                q.__class__ = cls
                q.activation, q.negative_slope = mod.activation, float(mod.negative_slope)
            return q

    if _MAPPING is not None:
        _MAPPING.setdefault(FusedLinear, QuantizedFusedLinear)
