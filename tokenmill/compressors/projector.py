"""Vision-to-language projectors laid out like LLaVA's, so LLaVA checkpoints load without renaming.

LLaVA-1.5's `mlp2x_gelu` is `nn.Sequential(Linear(d_v, d_lm), GELU(), Linear(d_lm, d_lm))` with
state-dict keys `0.weight, 0.bias, 2.weight, 2.bias`; `MLPProjector(depth=2)` is that module.
LLaVA's `linear` projector is a bare `nn.Linear` (keys `weight, bias`); `LinearProjector` is that.
`build_projector` reads LLaVA's names ("linear", "mlp{N}x_gelu").
"""

from __future__ import annotations

import re

from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class MLPProjector(nn.Sequential):
    """Linear(in, out), then (activation, Linear(out, out)) x (depth - 1); depth=2 is LLaVA's mlp2x_gelu."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, activation: str = "gelu"):
        if depth < 1:
            raise ValueError(f"MLPProjector needs depth >= 1, got {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLPProjector: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        modules: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            modules += [ACTIVATIONS[activation](), nn.Linear(out_dim, out_dim)]
        super().__init__(*modules)
        self.in_dim, self.out_dim, self.depth = in_dim, out_dim, depth


class LinearProjector(nn.Linear):
    """LLaVA's `linear` projector (state-dict keys `weight, bias`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim


def build_projector(projector_type: str, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA's `mm_projector_type`: "linear" or "mlp{N}x_gelu" (also _relu / _silu)."""
    if projector_type == "linear":
        return LinearProjector(in_dim, out_dim)
    match = re.fullmatch(r"mlp(\d+)x_(\w+)", projector_type)
    if match is None:
        raise ValueError(f"unknown projector type {projector_type!r}; use 'linear' or 'mlp2x_gelu'-style names")
    return MLPProjector(in_dim, out_dim, depth=int(match.group(1)), activation=match.group(2))
