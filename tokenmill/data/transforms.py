"""Crop/resize/flip with Pillow only (no torchvision), driven by an explicit generator.

Crops are expressed as a box in original-image coordinates and done together with the
resize by ``Image.resize(box=...)``, which antialiases when downscaling.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

Box = tuple[float, float, float, float]  # left, top, right, bottom

TRAIN_CROPS = ("random_resized", "random")
_RESAMPLE = Image.Resampling.BICUBIC


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, high_inclusive: int) -> int:
    return int(torch.randint(0, high_inclusive + 1, (), generator=generator))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    attempts: int = 10,
) -> Box:
    """Pick a box covering ``scale`` of the area with aspect ratio (w/h) in ``ratio``.

    Rejection-samples like the Inception recipe; if nothing fits after ``attempts`` tries it
    falls back to the largest centred box whose aspect ratio is clamped into ``ratio``.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_low, log_high))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = _randint(generator, width - crop_w)
            top = _randint(generator, height - crop_h)
            return (left, top, left + crop_w, top + crop_h)
    aspect = min(max(width / height, ratio[0]), ratio[1])
    crop_w, crop_h = (
        (width, round(width / aspect)) if width / height <= aspect else (round(height * aspect), height)
    )
    crop_w, crop_h = min(crop_w, width), min(crop_h, height)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return (left, top, left + crop_w, top + crop_h)


def shorter_edge_crop_box(width: int, height: int, size: int, generator: torch.Generator | None) -> Box:
    """Box equal to "resize the shorter edge to ``size``, then crop ``size`` x ``size``".

    The offset is drawn in resized pixels (random when ``generator`` is given, centred
    otherwise) and mapped back, so one resize of the box gives the same framing.
    """
    short = min(width, height)
    resized_long = round(max(width, height) * size / short)
    slack = max(resized_long - size, 0)
    offset = _randint(generator, slack) if generator is not None else slack / 2
    start = offset * short / size
    if width >= height:
        return (start, 0.0, start + short, float(height))
    return (0.0, start, float(width), start + short)


def crop_resize(image: Image.Image, box: Box, size: int) -> Image.Image:
    return image.resize((size, size), _RESAMPLE, box=box)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class TrainTransform:
    """Random crop (``random_resized`` or ``random``) to ``image_size``, then optional flip."""

    def __init__(
        self,
        image_size: int,
        crop: str = "random_resized",
        crop_scale: tuple[float, float] = (0.35, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
    ) -> None:
        if crop not in TRAIN_CROPS:
            raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, got {crop!r}")
        low, high = (float(v) for v in crop_scale)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.crop = crop
        self.crop_scale = (low, high)
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.hflip = bool(hflip)

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        width, height = image.size
        if self.crop == "random_resized":
            box = random_resized_crop_box(width, height, self.crop_scale, self.crop_ratio, generator)
        else:
            box = shorter_edge_crop_box(width, height, self.image_size, generator)
        tensor = to_tensor(crop_resize(image, box, self.image_size))
        # Always draw the coin so the stream of draws does not depend on ``hflip``.
        flip = bool(torch.rand((), generator=generator) < 0.5)
        return tensor.flip(-1) if self.hflip and flip else tensor


class EvalTransform:
    """Resize the shorter edge to ``image_size`` and take the centre square. No randomness."""

    def __init__(self, image_size: int) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        width, height = image.size
        return to_tensor(
            crop_resize(image, shorter_edge_crop_box(width, height, self.image_size, None), self.image_size)
        )
