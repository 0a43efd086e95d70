"""Default source: real photographs that ship inside scikit-image, so the demo needs no download.

Validation uses whole photographs that never appear in training:
``chelsea.png`` (a cat) and ``coffee.png`` (a coffee cup); no training photo shows either scene.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from .decode import decode_image
from .samples import Records
from .seeding import make_generator
from .source_base import MapImageSource
from .transforms import random_resized_crop_box

TRAIN_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "clock_motion.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
VAL_PHOTOS = ("chelsea.png", "coffee.png")
# Validation crops cover at least this fraction of a photo (crop 0 of each photo is the whole photo).
_VAL_CROP_SCALE = (0.25, 1.0)


def skimage_data_dir() -> Path:
    try:
        import skimage.data
    except ImportError as error:
        raise ImportError(
            "EmbeddedSource reads the photographs bundled with scikit-image, which is not installed: "
            "`pip install scikit-image` (or choose another data source, e.g. data=imagefolder)."
        ) from error
    return Path(os.path.dirname(skimage.data.__file__))


class _PhotoCache:
    """Decodes each photo once per process (workers included) and keeps it in memory."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self._images: dict[int, Image.Image] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "_images": {}}  # workers decode for themselves

    def get(self, photo: int) -> Image.Image:
        if photo not in self._images:
            self._images[photo] = decode_image(self.paths[photo].read_bytes())
        return self._images[photo]


class _PhotoCycle:
    """``num_samples`` virtual samples over the photos: sample i uses photo i % n."""

    def __init__(self, paths: list[Path], num_samples: int) -> None:
        self.photos = _PhotoCache(paths)
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def _photo_index(self, index: int) -> int:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return index % len(self.photos.paths)


class EmbeddedTrainRecords(_PhotoCycle):
    """Training samples cycling over the photos; the random crop itself comes from the
    datamodule's train transform."""

    def __getitem__(self, index: int) -> tuple[str, Image.Image]:
        photo = self._photo_index(index)
        return f"{self.photos.paths[photo].stem}/{index}", self.photos.get(photo)


class EmbeddedValRecords(_PhotoCycle):
    """Fixed crops of the held-out photos, identical in every epoch and run.

    Sample j uses photo j % n; its crop is drawn from a generator seeded by j alone (not the
    experiment seed) and the first sample of each photo is the whole photo.
    """

    def __getitem__(self, index: int) -> tuple[str, Image.Image]:
        photo_index = self._photo_index(index)
        photo = self.photos.get(photo_index)
        if index < len(self.photos.paths):
            box = (0, 0, photo.width, photo.height)
        else:
            generator = make_generator("embedded-val-crop", index)
            box = random_resized_crop_box(
                photo.width, photo.height, _VAL_CROP_SCALE, (3 / 4, 4 / 3), generator
            )
        return f"{self.photos.paths[photo_index].stem}/val{index}", photo.crop(box)


class EmbeddedSource(MapImageSource):
    def __init__(self, num_train_samples: int = 1024, num_val_samples: int = 32) -> None:
        if num_train_samples <= 0:
            raise ValueError(f"num_train_samples must be positive, got {num_train_samples}")
        if num_val_samples < 0:
            raise ValueError(f"num_val_samples must be >= 0, got {num_val_samples}")
        self.num_train_samples = int(num_train_samples)
        self.num_val_samples = int(num_val_samples)
        data_dir = skimage_data_dir()
        self.train_paths = self._existing(data_dir, TRAIN_PHOTOS)
        self.val_paths = self._existing(data_dir, VAL_PHOTOS)
        if not self.train_paths or not self.val_paths:
            raise FileNotFoundError(
                f"scikit-image's data folder {data_dir} lacks the bundled photographs "
                f"(need some of {TRAIN_PHOTOS} and of {VAL_PHOTOS}); reinstall scikit-image."
            )

    @staticmethod
    def _existing(data_dir: Path, names: tuple[str, ...]) -> list[Path]:
        return [data_dir / name for name in names if (data_dir / name).is_file()]

    def train_records(self) -> Records:
        return EmbeddedTrainRecords(self.train_paths, self.num_train_samples)

    def val_records(self) -> Records:
        return EmbeddedValRecords(self.val_paths, self.num_val_samples)
