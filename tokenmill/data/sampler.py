"""Epoch-seeded shuffling split across DDP ranks, with a start offset for exact resume."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .seeding import make_generator


def distributed_rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochShardSampler(DistributedSampler):
    """Yields ``(epoch, index)`` for this rank's share of a ``(seed, epoch)`` permutation.

    The permutation is padded by wrap-around to a multiple of ``world_size`` and rank ``r``
    takes ``permutation[r::world_size]``, so every rank gets the same number of samples and
    hence the same number of batches. ``start_index`` skips this rank's first samples once
    (the resumable loader sets it); it never changes ``len()``.

    It subclasses ``DistributedSampler`` only so that Lightning recognises it as already
    distributed and does not wrap it in a second one.
    """

    def __init__(
        self,
        num_samples: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        # DistributedSampler.__init__ needs a dataset and an initialised process group; we need neither.
        if num_samples <= 0:
            raise ValueError(f"EpochShardSampler needs at least one sample, got num_samples={num_samples}")
        default_rank, default_world = distributed_rank_and_world()
        self.rank = default_rank if rank is None else int(rank)
        self.num_replicas = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")
        self.dataset_size = int(num_samples)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = 0
        self.start_index = 0
        self.drop_last = False
        self.num_samples = math.ceil(self.dataset_size / self.num_replicas)  # per rank
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices for ``epoch``, in order, before ``start_index``."""
        if self.shuffle:
            order = torch.randperm(
                self.dataset_size, generator=make_generator("permutation", self.seed, epoch)
            )
        else:
            order = torch.arange(self.dataset_size)
        # Wrap-around padding; repeat() covers world_size > dataset_size as well.
        repeats = math.ceil(self.total_size / self.dataset_size)
        padded = order.repeat(repeats)[: self.total_size]
        return padded[self.rank :: self.num_replicas].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in self.epoch_indices(epoch)[self.start_index :]:
            yield (epoch, index)

    def __len__(self) -> int:
        return self.num_samples
