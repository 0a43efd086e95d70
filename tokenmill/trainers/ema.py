"""Exponential moving average of a model's weights, used for validation and export."""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn


class EMA(nn.Module):
    """Keeps `module`, a frozen copy of the model whose weights trail the live ones.

    Held as a submodule of the training task so it is checkpointed, moved between devices and
    sharded together with the model. The decay warms up as min(decay, (1 + n) / (10 + n)) so the
    average is not dominated by the random initialisation in short runs.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.module = deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = list(self.module.parameters())
        live_params = list(model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in live_params], 1.0 - decay)
        # Buffers (e.g. running statistics) are copied, not averaged.
        for ema_buf, live_buf in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buf.copy_(live_buf)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.module.eval()  # the average is never in training mode
        return self
