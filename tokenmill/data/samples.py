"""Per-sample decode+transform for map-style records, and the collate function that builds
the batch contract and counts dropped samples.

A sample that fails to decode is not an exception: it travels to the collate function as
``{"image": None, "key": ..., "error": ...}`` so the count and the key reach the main process
even when decoding ran in a worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset

from .decode import ImageDecodeError, decode_image
from .seeding import sample_generator

# Batch field that carries (key, reason) of dropped samples from collate to the loader,
# which logs them in the main process and removes the field before the trainer sees it.
SKIPPED_FIELD = "_skipped"

Transform = Callable[[Image.Image, torch.Generator], torch.Tensor]


class Records(Protocol):
    """Indexable list of ``(key, payload)``; payload is whatever :func:`decode_image` accepts."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[str, Any]: ...


def good_sample(image: torch.Tensor, key: str) -> dict[str, Any]:
    return {"image": image, "key": key, "error": None}


def skipped_sample(key: str, error: str) -> dict[str, Any]:
    return {"image": None, "key": key, "error": error}


def decode_and_transform(
    key: str, payload: Any, transform: Transform, generator: torch.Generator
) -> dict[str, Any]:
    try:
        image = decode_image(payload)
    except ImageDecodeError as error:
        return skipped_sample(key, str(error))
    return good_sample(transform(image, generator), key)


class MapImageDataset(Dataset):
    """Decodes and transforms ``records[index]``.

    Items are requested as ``(epoch, index)`` (that is what ``EpochShardSampler`` yields) so
    the random crop depends on the epoch without any state shared with worker processes;
    a bare ``index`` means epoch 0.
    """

    def __init__(self, records: Records, transform: Transform, seed: int) -> None:
        self.records = records
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        key, payload = self.records[index]
        return decode_and_transform(key, payload, self.transform, sample_generator(self.seed, epoch, index))


class ImageCollate:
    """Stack kept images; count and list the dropped ones (batch may be smaller than asked)."""

    def __init__(self, image_size: int) -> None:
        self.image_size = int(image_size)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        kept = [sample for sample in samples if sample["image"] is not None]
        skipped = [(sample["key"], sample["error"]) for sample in samples if sample["image"] is None]
        if kept:
            images = torch.stack([sample["image"] for sample in kept])
        else:
            images = torch.empty(0, 3, self.image_size, self.image_size)
        return {
            "image": images,
            "key": [sample["key"] for sample in kept],
            "num_skipped": torch.tensor(len(skipped), dtype=torch.long),
            SKIPPED_FIELD: skipped,
        }
