"""What every tokenmill datamodule shares: skip accounting and the map-style loaders.

Training loaders are resumable (exact mid-epoch position in the checkpoint) and sharded across
DDP ranks by `EpochShardSampler`; validation loaders run in order, split across ranks; worker
seeds come from the datamodule's seed, never from the global RNG the model uses.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from .loaders import ReportingDataLoader, ResumableDataLoader, SkipReport
from .sampler import EpochShardSampler
from .seeding import make_generator


class SkippingDataModule(L.LightningDataModule):
    """Base class: subclasses set `collate`, `num_workers`, `pin_memory`, `persistent_workers`,
    `seed`, `batch_size` and `val_batch_size`, and call `super().__init__()` first."""

    def __init__(self) -> None:
        super().__init__()
        self.skip_report = SkipReport()

    @property
    def skipped_keys(self) -> dict[str, str]:
        """Keys dropped so far (as seen by this process's loaders), mapped to the reason."""
        return self.skip_report.keys

    @property
    def num_skipped(self) -> int:
        """Total drops seen by this process's loaders, counting repeats in later epochs."""
        return self.skip_report.total

    def _loader_options(self) -> dict[str, Any]:
        return {
            "collate_fn": self.collate,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
            "skip_report": self.skip_report,
            # DataLoader draws its worker base seed from this instead of the global RNG, so
            # iterating data does not shift the model's random stream (dropout, init, ...).
            "generator": make_generator("dataloader", self.seed),
        }

    def _map_train_loader(self, dataset: Dataset) -> DataLoader:
        sampler = EpochShardSampler(len(dataset), shuffle=True, seed=self.seed)
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"each rank gets {len(sampler)} training samples, fewer than batch_size={self.batch_size}: "
                "no full batch per epoch (lower batch_size or add data)"
            )
        return ResumableDataLoader(
            dataset, sampler=sampler, batch_size=self.batch_size, drop_last=True, **self._loader_options()
        )

    def _map_val_loader(self, dataset: Dataset) -> DataLoader:
        # In order; split across DDP ranks like the training data (unshuffled).
        sampler = EpochShardSampler(len(dataset), shuffle=False, seed=self.seed)
        return ReportingDataLoader(dataset, sampler=sampler, batch_size=self.val_batch_size, **self._loader_options())
