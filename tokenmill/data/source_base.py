"""The two kinds of image source the datamodule understands.

* :class:`MapImageSource` gives indexable ``(key, payload)`` records; the datamodule wraps
  them with a seeded, resumable, DDP-aware sampler.
* :class:`StreamImageSource` builds iterable datasets (tar shards) that do their own
  shuffling and rank/worker splitting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch.utils.data import IterableDataset

from .samples import Records, Transform


class MapImageSource(ABC):
    def prepare(self) -> None:
        """Download/cache once per node before ``setup``; most sources need nothing."""
        return None

    @abstractmethod
    def train_records(self) -> Records: ...

    @abstractmethod
    def val_records(self) -> Records:
        """Validation records; may be empty (validation is then skipped)."""


class StreamImageSource(ABC):
    def prepare(self) -> None:
        """Download/cache once per node before ``setup``; most sources need nothing."""
        return None

    @abstractmethod
    def train_stream(
        self, transform: Transform, seed: int, batch_size: int, rank: int, world_size: int
    ) -> IterableDataset: ...

    @abstractmethod
    def val_stream(self, transform: Transform, rank: int, world_size: int) -> IterableDataset | None:
        """Validation stream, or ``None`` when the source has no validation data."""
