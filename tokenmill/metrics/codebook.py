"""Codebook utilisation statistics for vector-quantised tokenizers."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn


class CodebookUsage(nn.Module):
    """Streaming histogram of code indices.

    ``compute()`` returns:
        usage: fraction of the ``codebook_size`` codes hit at least once (0..1)
        entropy: entropy of the empirical code distribution, in nats
        perplexity: exp(entropy), the "effective number" of codes used

    Counts live in a non-persistent int64 buffer (follows ``.to(device)``, stays out
    of checkpoints) and are summed across ranks when torch.distributed is initialised.
    """

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = int(codebook_size)
        self.register_buffer("counts", torch.zeros(self.codebook_size, dtype=torch.int64), persistent=False)

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"CodebookUsage expects integer code indices, got dtype {indices.dtype}")
        if indices.numel() == 0:
            return
        flat = indices.reshape(-1).long()
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= self.codebook_size:
            raise ValueError(
                f"code indices out of range: min {low}, max {high}, but codebook_size is "
                f"{self.codebook_size} (valid 0..{self.codebook_size - 1})"
            )
        self.counts += torch.bincount(flat, minlength=self.codebook_size).to(self.counts.device)

    def compute(self) -> dict[str, float]:
        # Reduce a copy so calling compute() twice does not double-count.
        counts = self.counts.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        total = int(counts.sum())
        if total == 0:
            raise RuntimeError("CodebookUsage.compute() called before any update() (0 indices seen)")
        probs = counts[counts > 0].double() / total
        entropy = float(-(probs * probs.log()).sum())
        return {
            "usage": int((counts > 0).sum()) / self.codebook_size,
            "perplexity": math.exp(entropy),
            "entropy": entropy,
        }
