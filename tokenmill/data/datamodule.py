"""``ImageDataModule``: one Lightning datamodule for every image source.

Batches are ``{"image": float32 [B, 3, H, W] in [-1, 1], "key": list[str],
"num_skipped": long scalar}``; ``num_skipped`` counts samples of the batch that failed to
decode and were dropped, so B may be smaller than the batch size (even 0).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch.utils.data import DataLoader, Dataset

from .datamodule_base import SkippingDataModule
from .loaders import ReportingDataLoader, StreamDataLoader
from .sampler import distributed_rank_and_world
from .samples import ImageCollate, MapImageDataset
from .source_base import MapImageSource, StreamImageSource
from .transforms import EvalTransform, TrainTransform

logger = logging.getLogger(__name__)


class ImageDataModule(SkippingDataModule):
    def __init__(
        self,
        source: MapImageSource | StreamImageSource,
        image_size: int = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        train_crop: str = "random_resized",
        crop_scale: Sequence[float] = (0.35, 1.0),
        hflip: bool = True,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(source, (MapImageSource, StreamImageSource)):
            raise TypeError(
                f"source must be a MapImageSource or StreamImageSource (e.g. tokenmill.data.EmbeddedSource), "
                f"got {type(source).__name__}"
            )
        if batch_size <= 0 or (val_batch_size is not None and val_batch_size <= 0):
            raise ValueError(
                f"batch sizes must be positive, got batch_size={batch_size}, val_batch_size={val_batch_size}"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source = source
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        # Built here so a bad train_crop/crop_scale fails when the config is instantiated.
        self.train_transform = TrainTransform(self.image_size, train_crop, tuple(crop_scale), hflip=hflip)
        self.val_transform = EvalTransform(self.image_size)
        self.collate = ImageCollate(self.image_size)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        rank, world_size = distributed_rank_and_world()
        if isinstance(self.source, MapImageSource):
            train_records, val_records = self.source.train_records(), self.source.val_records()
            if len(train_records) == 0:
                raise ValueError(f"{type(self.source).__name__} has no training images")
            self.train_dataset = MapImageDataset(train_records, self.train_transform, self.seed)
            self.val_dataset = (
                MapImageDataset(val_records, self.val_transform, self.seed) if len(val_records) else None
            )
        else:
            self.train_dataset = self.source.train_stream(
                self.train_transform, self.seed, self.batch_size, rank, world_size
            )
            self.val_dataset = self.source.val_stream(self.val_transform, rank, world_size)

    def _trainer_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if isinstance(self.source, StreamImageSource):
            return StreamDataLoader(
                self.train_dataset,
                batch_size=self.batch_size,
                drop_last=True,
                epoch_fn=self._trainer_epoch,
                **self._loader_options(),
            )
        return self._map_train_loader(self.train_dataset)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            logger.info("%s has no validation data; validation is skipped", type(self.source).__name__)
            return []
        if isinstance(self.source, StreamImageSource):
            return ReportingDataLoader(
                self.val_dataset, batch_size=self.val_batch_size, **self._loader_options()
            )
        return self._map_val_loader(self.val_dataset)
