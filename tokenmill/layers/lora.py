"""Low-rank adapters (LoRA, Hu et al. 2021) for fine-tuning a frozen language model.

`apply_lora` swaps the chosen `nn.Linear`s for `LoRALinear` (frozen base + trainable B @ A,
B zero-initialised so training starts from the base model); `merge_lora` folds the adapters back
into plain Linears, so exports have the base architecture and load without tokenmill's LoRA.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        merged = merged.to(self.base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + (self.lora_b @ self.lora_a) * self.scale)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def apply_lora(model: nn.Module, target_modules: str, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear whose qualified name matches the regex `target_modules` (re.search).

    Returns the wrapped names; refuses a pattern that matches nothing (a typo would otherwise
    silently train nothing).
    """
    pattern = re.compile(target_modules)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    if not names:
        raise ValueError(f"LoRA target_modules={target_modules!r} matches no nn.Linear in {type(model).__name__}")
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear into a plain nn.Linear in place; returns how many were merged."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _replace(model, name, model.get_submodule(name).merged())
    return len(names)
