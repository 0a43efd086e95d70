"""The quantizer protocol every bottleneck follows.

`forward(z[B, N, D]) -> QuantizerOutput(codes, indices, losses, metrics)`:
  codes    [B, N, D]  quantized latents with a straight-through gradient to `z`
  indices  [B, N] (or [B, N, groups] for factorised codes), int64
  losses   dict of scalar tensors to add (already weighted), e.g. {"commitment": ...}
  metrics  dict of detached scalars for logging, e.g. {"usage": ..., "perplexity": ...}

Quantization always runs in fp32 with autocast off: nearest-code search and entropy terms are
unstable in bf16/fp16 (a few ulps flip argmins), and indices must not depend on the precision a
run trains in.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn


class QuantizerOutput(NamedTuple):
    codes: Tensor
    indices: Tensor
    losses: dict[str, Tensor]
    metrics: dict[str, Tensor]


class Quantizer(nn.Module, ABC):
    codebook_size: int
    dim: int
    # Histogram metrics (usage, entropy, perplexity) cost O(codebook_size) per call, as much as
    # a cheap quantizer itself; trainers switch them off on steps that log nothing
    # (`quantizer_metrics`). Losses and codebook updates never depend on this flag.
    compute_metrics: bool = True

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.dim() != 3 or z.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects latents [B, N, {self.dim}], got {tuple(z.shape)}")
        input_dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            out = self.quantize(z.float())
        return out._replace(codes=out.codes.to(input_dtype))

    @property
    def bits_per_token(self) -> float:
        """Bits one token's index takes (log2 of the implicit or explicit codebook size)."""
        return math.log2(self.codebook_size)

    @abstractmethod
    def quantize(self, z: Tensor) -> QuantizerOutput:
        """fp32 quantization; called by forward with autocast disabled."""

    @abstractmethod
    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices [B, N] -> codes [B, N, D], equal to `forward(z).codes` for those indices."""


@contextmanager
def quantizer_metrics(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, every quantizer inside `module` computes its histogram metrics or not;
    afterwards each gets its previous setting back."""
    quantizers = [m for m in module.modules() if isinstance(m, Quantizer)]
    previous = [q.compute_metrics for q in quantizers]
    for q in quantizers:
        q.compute_metrics = enabled
    try:
        yield
    finally:
        for q, value in zip(quantizers, previous, strict=True):
            q.compute_metrics = value


def histogram_metrics(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Batch-level codebook statistics: usage fraction, entropy (nats) and perplexity (exp of
    the entropy: the effective number of codes in use) of the code histogram."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return {
        "usage": (counts > 0).float().mean(),
        "entropy": entropy,
        "perplexity": entropy.exp(),
    }
