"""Tar shards in the WebDataset layout, streamed with the ``webdataset`` package.

``webdataset`` only reads the tars and groups members into samples; shard order, the
rank/worker split, the shuffle buffer and image decoding are ours, so they are seeded from
``(seed, epoch, ...)`` and a corrupt image goes through the same drop-and-count path as
every other source.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .samples import Transform, decode_and_transform, skipped_sample
from .seeding import derive_seed, make_generator
from .source_base import StreamImageSource

logger = logging.getLogger(__name__)


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand ``pattern`` (``::`` separates several patterns); local files must exist."""
    from webdataset.shardlists import expand_urls

    shards = list(expand_urls(pattern))
    if not shards:
        raise ValueError(f"shard pattern {pattern!r} expands to no shards")
    missing = [
        shard
        for shard in shards
        if "://" not in shard and not shard.startswith("pipe:") and not Path(shard).is_file()
    ]
    if missing:
        shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(shards)} shards from {pattern!r} do not exist: {shown}"
        )
    return shards


def _warn_and_continue(error: Exception) -> bool:
    """webdataset error handler: a broken tar member/shard is logged, not fatal."""
    logger.warning("webdataset: skipping unreadable tar data: %r", error)
    return True


def _read_samples(shards: list[str]) -> Iterator[dict[str, Any]]:
    from webdataset.tariterators import tarfile_samples

    return tarfile_samples(({"url": shard} for shard in shards), handler=_warn_and_continue)


def _shuffle_buffer(
    samples: Iterable[dict[str, Any]], size: int, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """Reservoir-style shuffle over undecoded samples (bytes, so the buffer stays cheap)."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = rng.randrange(size)
        buffer[slot], sample = sample, buffer[slot]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class ShardStreamDataset(IterableDataset):
    """Streams decoded, transformed samples from tar shards.

    Work is split over ``slots = world_size * num_workers`` readers. With at least one shard
    per slot each reader takes whole shards (``shards[slot::slots]``); with fewer shards
    every reader reads all of them and keeps every ``slots``-th sample.

    ``samples_per_epoch`` (training) fixes the epoch length: each rank yields
    ``samples_per_epoch // (world_size * batch_size)`` full batches, cycling over its shards
    (reshuffled each pass) as often as needed, so all ranks take the same number of steps.
    Without it, each reader makes a single pass.
    """

    def __init__(
        self,
        shards: list[str],
        transform: Transform,
        image_keys: tuple[str, ...],
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not shards:
            raise ValueError("ShardStreamDataset needs at least one shard")
        self.shards = list(shards)
        self.transform = transform
        self.image_keys = image_keys
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = int(shuffle_buffer) if shuffle else 0
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.batches_per_rank: int | None = None
        if samples_per_epoch is not None:
            self.batches_per_rank = int(samples_per_epoch) // (self.world_size * self.batch_size)
            if self.batches_per_rank < 1:
                raise ValueError(
                    f"num_train_samples={samples_per_epoch} is less than one batch per rank "
                    f"(batch_size={self.batch_size} x world_size={self.world_size})"
                )
        # Shared memory so persistent workers see the epoch the main process sets.
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        if self.batches_per_rank is None:
            raise TypeError("this shard stream has no fixed length (set num_train_samples to give it one)")
        return self.batches_per_rank * self.batch_size

    def _worker_quota(self, worker: int, num_workers: int) -> int | None:
        """Samples this worker yields per epoch: whole batches, spread as evenly as possible."""
        if self.batches_per_rank is None:
            return None
        batches = self.batches_per_rank // num_workers + (worker < self.batches_per_rank % num_workers)
        return batches * self.batch_size

    def _pass_samples(self, epoch: int, pass_index: int, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        shards = list(self.shards)
        if self.shuffle:
            order = torch.randperm(
                len(shards), generator=make_generator("shards", self.seed, epoch, pass_index)
            )
            shards = [shards[i] for i in order.tolist()]
        if len(shards) >= slots:
            yield from _read_samples(shards[slot::slots])
        else:
            for position, sample in enumerate(_read_samples(shards)):
                if position % slots == slot:
                    yield sample

    def _to_sample(self, raw: dict[str, Any], epoch: int, pass_index: int) -> dict[str, Any]:
        key = raw.get("__key__", "?")
        field = next((name for name in self.image_keys if name in raw), None)
        if field is None:
            fields = sorted(name for name in raw if not name.startswith("__"))
            return skipped_sample(
                key,
                f"no image field (looked for {list(self.image_keys)}); sample has {fields} in {raw.get('__url__')}",
            )
        generator = make_generator("stream-sample", self.seed, epoch, pass_index, key)
        sample = decode_and_transform(key, raw[field], self.transform, generator)
        if sample["error"] is not None:
            sample["error"] += f" (field {field!r} in {raw.get('__url__')})"
        return sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = int(self._epoch)
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        quota = self._worker_quota(worker, num_workers)
        if quota == 0:
            return
        rng = random.Random(derive_seed("shuffle-buffer", self.seed, epoch, slot, slots))
        produced = 0
        pass_index = 0
        while True:
            produced_this_pass = 0
            raw_samples = _shuffle_buffer(
                self._pass_samples(epoch, pass_index, slot, slots), self.shuffle_buffer, rng
            )
            for raw in raw_samples:
                yield self._to_sample(raw, epoch, pass_index)
                produced += 1
                produced_this_pass += 1
                if quota is not None and produced >= quota:
                    return
            if quota is None:
                return
            if produced_this_pass == 0:
                raise RuntimeError(
                    f"shards gave no samples to reader {slot} of {slots} (rank {self.rank}, worker {worker}): "
                    f"{self.shards[:3]}..."
                )
            pass_index += 1


class WebDatasetSource(StreamImageSource):
    """Training and validation tar shards (``/data/train-{0000..0252}.tar``).

    Without ``val_shards`` the last training shard is held out for validation (needs at
    least two shards).
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        image_key: str = "jpg;jpeg;png;webp",
        shuffle_buffer: int = 1000,
        num_train_samples: int | None = None,
    ) -> None:
        self.image_keys = tuple(part.strip().lower() for part in image_key.split(";") if part.strip())
        if not self.image_keys:
            raise ValueError(f"image_key {image_key!r} names no field")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if num_train_samples is not None and num_train_samples <= 0:
            raise ValueError(f"num_train_samples must be positive or null, got {num_train_samples}")
        self.shuffle_buffer = int(shuffle_buffer)
        self.num_train_samples = None if num_train_samples is None else int(num_train_samples)
        self.train_pattern = train_shards
        self.val_pattern = val_shards
        self._shards: tuple[list[str], list[str]] | None = None

    def shard_lists(self) -> tuple[list[str], list[str]]:
        """(train, val) shard paths; expanded and checked at setup, not when the config is built."""
        if self._shards is None:
            train = expand_shards(self.train_pattern)
            if self.val_pattern:
                val = expand_shards(self.val_pattern)
            elif len(train) >= 2:
                train, val = train[:-1], train[-1:]
                logger.info("No val_shards given: holding out %s for validation", val[0])
            else:
                raise ValueError(
                    f"train_shards {self.train_pattern!r} is a single shard and no val_shards was given; "
                    "set val_shards or split the data into at least two shards"
                )
            self._shards = (train, val)
        return self._shards

    def train_stream(
        self, transform: Transform, seed: int, batch_size: int, rank: int, world_size: int
    ) -> ShardStreamDataset:
        return ShardStreamDataset(
            self.shard_lists()[0],
            transform,
            self.image_keys,
            seed=seed,
            shuffle=True,
            shuffle_buffer=self.shuffle_buffer,
            samples_per_epoch=self.num_train_samples,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
        )

    def val_stream(self, transform: Transform, rank: int, world_size: int) -> ShardStreamDataset:
        return ShardStreamDataset(
            self.shard_lists()[1], transform, self.image_keys, shuffle=False, rank=rank, world_size=world_size
        )
