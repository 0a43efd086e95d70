"""The few collectives quantizers need, as no-ops outside a multi-process run.

Codebook state (EMA statistics, k-means centroids, re-seeded codes) must stay bitwise identical
on every rank without relying on DDP's buffer broadcast (FSDP does not broadcast buffers, and a
plain `torch.distributed` loop has no wrapper at all). Two rules keep that true:

* every statistic that decides a codebook update is all-reduced (a sum all-reduce returns the same
  bits on every rank), and random choices are made on rank 0 and broadcast;
* collectives run only on training forwards, which every rank executes; evaluation paths call
  none, so one rank validating alone cannot hang the others.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """In-place sum over ranks (no autograd)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """In-place copy of rank `src`'s tensor to every rank (no autograd)."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks too (every rank's
    loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_mean_with_grad(tensor: Tensor) -> Tensor:
    """Mean over ranks that gradients flow through (each rank receives the sum of all ranks'
    gradients, which DDP's averaging turns into the gradient of the one global quantity)."""
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor) / dist.get_world_size()
