"""Images in a directory tree (any depth), listed in sorted order so runs are reproducible."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .samples import Records
from .seeding import make_generator
from .source_base import MapImageSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """Lower-case, dot-prefixed extensions: ``["JPG", ".png"]`` -> ``(".jpg", ".png")``."""
    result = tuple(ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions)
    if not result:
        raise ValueError("extensions is empty: no file could ever match")
    return result


def check_directory(path: str | Path, what: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"{what} {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"{what} {str(directory)!r} is not a directory")
    return directory


def list_image_files(root: str | Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """All files under ``root`` with a matching extension, sorted by relative POSIX path."""
    directory = check_directory(root, "image folder")
    suffixes = normalise_extensions(extensions)
    files = sorted(
        (path for path in directory.rglob("*") if path.suffix.lower() in suffixes and path.is_file()),
        key=lambda path: path.relative_to(directory).as_posix(),
    )
    if not files:
        raise FileNotFoundError(
            f"image folder {str(directory)!r} contains no files with extensions {suffixes}"
        )
    return files


def held_out_split(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, val) index lists; val gets round(count * fraction), at least one if fraction > 0."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    num_val = 0 if fraction == 0 else max(1, round(count * fraction))
    if count - num_val < 1:
        raise ValueError(f"val_fraction={fraction} of {count} images leaves nothing to train on")
    order = torch.randperm(count, generator=make_generator("held-out-split", seed)).tolist()
    return sorted(order[num_val:]), sorted(order[:num_val])


class FileRecords:
    """Image files as records; the key is the path relative to its root. Bytes are read lazily."""

    def __init__(self, root: Path, files: Sequence[Path]) -> None:
        self.root = root
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, Path]:
        path = self.files[index]
        return path.relative_to(self.root).as_posix(), path


class ImageFolderSource(MapImageSource):
    """``root`` holds training images; validation is ``val_root`` or a seeded held-out fraction."""

    def __init__(
        self,
        root: str,
        val_root: str | None = None,
        val_fraction: float = 0.05,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        split_seed: int = 0,
    ) -> None:
        # Paths are checked at setup, so configs can be built where the data is not mounted.
        self.root = Path(root).expanduser()
        self.val_root = Path(val_root).expanduser() if val_root else None
        self.val_fraction = float(val_fraction)
        self.extensions = normalise_extensions(extensions)
        self.split_seed = int(split_seed)
        if not 0.0 <= self.val_fraction < 1.0 or math.isnan(self.val_fraction):
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self._split: tuple[FileRecords, FileRecords] | None = None

    def _records(self) -> tuple[FileRecords, FileRecords]:
        # Listing a large tree is slow, so it happens once, at setup time, not in the constructor.
        if self._split is None:
            files = list_image_files(self.root, self.extensions)
            if self.val_root is not None:
                val = FileRecords(self.val_root, list_image_files(self.val_root, self.extensions))
                self._split = (FileRecords(self.root, files), val)
            else:
                train_idx, val_idx = held_out_split(len(files), self.val_fraction, self.split_seed)
                self._split = (
                    FileRecords(self.root, [files[i] for i in train_idx]),
                    FileRecords(self.root, [files[i] for i in val_idx]),
                )
        return self._split

    def train_records(self) -> Records:
        return self._records()[0]

    def val_records(self) -> Records:
        return self._records()[1]
