"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that take no weight decay: norms, biases and embeddings (ndim < 2 or an
    nn.Embedding), plus what each submodule lists in `no_weight_decay()` (learned tokens and
    positional embeddings)."""
    names = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if hasattr(module, "no_weight_decay"):
            names |= {prefix + n for n in module.no_weight_decay()}
        if isinstance(module, nn.Embedding):
            names |= {prefix + n for n, _ in module.named_parameters(recurse=False)}
    for name, param in model.named_parameters():
        if param.ndim < 2:
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    excluded = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in excluded else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(factory: Callable[..., Optimizer], model: nn.Module) -> Optimizer:
    """`factory` is a Hydra partial such as torch.optim.AdamW(lr=..., weight_decay=...)."""
    weight_decay = getattr(factory, "keywords", {}).get("weight_decay", 0.0)
    return factory(param_groups(model, weight_decay))


def warmup_cosine(warmup_steps: int, total_steps: int, end_factor: float = 0.0) -> Callable[[int], float]:
    """Linear warmup to the base lr, then cosine decay to `end_factor * base lr` at total_steps."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive for a cosine schedule, got {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_cosine_scheduler(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, end_factor: float = 0.0
) -> LambdaLR:
    return LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, end_factor))
