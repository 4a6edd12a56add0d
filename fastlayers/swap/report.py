"""SwapReport: what fastlayers.swap fused, replaced and left alone (and why)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple


@dataclass
class SwapReport:
    """What :func:`swap` did; also attached to the model as ``model.fastlayers_swap_report``."""
    fused: List[Tuple[str, str, str]] = field(default_factory=list)  # (linear, activation site, name)
    replaced: List[Tuple[str, str]] = field(default_factory=list)     # (module path, new class)
    left: List[Tuple[str, str]] = field(default_factory=list)         # (module path, reason)
    rewritten: List[str] = field(default_factory=list)                # modules given a new forward
    gated: List[Tuple[str, str, str]] = field(default_factory=list)   # (gate [+ up] linear, site, activation)
    linear: List[Tuple[str, str]] = field(default_factory=list)       # (plain Linear -> FusedLinear, why no activation)
    losses: List[Tuple[str, str, str]] = field(default_factory=list)  # (head or module, site, fastlayers op)
    residual: List[Tuple[str, str]] = field(default_factory=list)     # (norm path, the add fused into it)
    attention: List[Tuple[str, str]] = field(default_factory=list)    # (module, its SDPA calls -> fastlayers')

    def why_not_fused(self) -> Dict[str, str]:
        """Module path -> why it was not fused with an activation: the modules left alone and the
        plain Linears that became FusedLinear(activation="none")."""
        return {**dict(self.linear), **dict(self.left)}

    def __str__(self) -> str:
        lines = [f"fastlayers.swap: fused {len(self.fused)} Linear+activation pair(s), "
                 f"{len(self.gated)} gated MLP product(s), {len(self.losses)} loss(es), "
                 f"{len(self.residual)} residual add(s) into norms, {len(self.attention)} attention forward(s), "
                 f"replaced {len(self.replaced)} softmax / norm / activation module(s), {len(self.linear)} plain Linear(s), "
                 f"left {len(self.left)} alone"]
        lines += [f"  fused     {lin} + {site} -> FusedLinear(activation={name})"
                  for lin, site, name in self.fused]
        lines += [f"  gated     {lins}: {site} -> gated_linear(activation={name})"
                  for lins, site, name in self.gated]
        lines += [f"  loss      {path}: {site} -> fastlayers.{op}" for path, site, op in self.losses]
        lines += [f"  replaced  {path} -> {new}" for path, new in self.replaced]
        lines += [f"  residual  {path}: {site} -> one fused add + norm" for path, site in self.residual]
        lines += [f"  attention {path}: {site} -> fastlayers.scaled_dot_product_attention"
                  for path, site in self.attention]
        lines += [f"  linear    {path} -> FusedLinear(activation=none) ({why})" for path, why in self.linear]
        lines += [f"  rewrote   {path}.forward (functional activations / gated products / losses / residual adds replaced)"
                  for path in self.rewritten]
        lines += [f"  left      {path}: {why}" for path, why in self.left]
        if self.fused:
            lines.append("  note      a fused Linear returns the activated output act(x W^T + b): called alone (e.g. "
                         "seq[:1](x) for features) or seen by a forward hook on it, it gives the activated values, "
                         "not the Linear's own output (a Linear with hooks at swap time is left unfused)")
        if self.rewritten:
            lines.append("  note      rewritten forwards check at each call that the children whose Parameters they "
                         "read or whose calls they inlined are unchanged (not replaced, wrapped by PEFT or "
                         "quantization, re-parametrised or hooked, no global module hooks); otherwise the "
                         "original forward runs")
        return "\n".join(lines)
