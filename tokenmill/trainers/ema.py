"""Exponential moving average of a model's weights, used for validation and export."""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn

from tokenmill.trainers.parallel import local, reshard


class EMA(nn.Module):
    """Keeps `module`, a frozen copy of the model whose weights trail the live ones.

    Held as a submodule of the training task so it is checkpointed and moved between devices
    with the model. Under FSDP (trainer=fsdp) the copy is sharded exactly like the live model, so
    each rank averages its own shards (the average is elementwise: no communication, and the same
    numbers as averaging full tensors); the export gathers the full copy. The decay warms up as
    min(decay, (1 + n) / (10 + n)) so the average is not dominated by the random initialisation
    in short runs.
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
        for m in (self.module, model):  # sharded: the registered parameters must be the shards
            reshard(m)
        ema_params = list(self.module.parameters())
        live_params = list(model.parameters())
        if len(ema_params) != len(live_params) or any(
            type(e) is not type(p) or local(e).shape != local(p).shape for e, p in zip(ema_params, live_params, strict=False)
        ):
            raise RuntimeError("EMA: the average and the live model are not sharded alike")
        torch._foreach_lerp_([local(p) for p in ema_params], [local(p.detach()) for p in live_params], 1.0 - decay)
        # Buffers (e.g. running statistics) are copied, not averaged.
        for ema_buf, live_buf in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buf.copy_(live_buf)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.module.eval()  # the average is never in training mode
        return self
