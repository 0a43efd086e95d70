"""Pack an image folder into WebDataset tar shards holding the original file bytes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .source_imagefolder import held_out_split, list_image_files, normalise_extensions

# The extensions WebDatasetSource's default ``image_key`` looks for.
SHARD_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class ShardSet:
    """Where one split went: the brace pattern to put in the config, and how much was written."""

    pattern: str
    num_shards: int
    num_samples: int


@dataclass
class ShardResult:
    splits: dict[str, ShardSet] = field(default_factory=dict)
    classes: list[str] | None = None


def sample_key(relative_path: Path) -> str:
    """``a/b.c.jpg`` -> ``a/b_c``: WebDataset cuts a member name at the first dot of its basename."""
    return (relative_path.parent / relative_path.stem.replace(".", "_")).as_posix()


def class_names(relative_paths: Sequence[Path]) -> list[str] | None:
    """Sorted top-level folder names when every image sits in one; otherwise ``None`` (no labels)."""
    if not relative_paths or any(len(path.parts) < 2 for path in relative_paths):
        return None
    return sorted({path.parts[0] for path in relative_paths})


def brace_pattern(prefix: str, num_shards: int) -> str:
    return f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def _write_split(
    files: Iterable[Path],
    root: Path,
    output: Path,
    prefix: str,
    shard_size: int,
    class_index: dict[str, int] | None,
) -> ShardSet:
    import webdataset

    files = list(files)
    seen: dict[str, Path] = {}
    # Fixed mtime so the same input always gives byte-identical shards.
    with webdataset.ShardWriter(
        str(output / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0
    ) as writer:
        for path in files:
            relative = path.relative_to(root)
            key = sample_key(relative)
            if key in seen:
                raise ValueError(
                    f"{relative} and {seen[key].relative_to(root)} map to the same sample key {key!r}"
                )
            seen[key] = path
            sample = {"__key__": key, path.suffix.lower().lstrip("."): path.read_bytes()}
            if class_index is not None:
                sample["cls"] = str(class_index[relative.parts[0]])
            writer.write(sample)
        num_shards = writer.shard
    return ShardSet(pattern=brace_pattern(prefix, num_shards), num_shards=num_shards, num_samples=len(files))


def make_shards(
    input_dir: str | Path,
    output_dir: str | Path,
    shard_size: int = 1000,
    prefix: str = "train",
    val_fraction: float = 0.0,
    val_prefix: str = "val",
    seed: int = 0,
    extensions: Sequence[str] = SHARD_IMAGE_EXTENSIONS,
) -> ShardResult:
    """Write ``{prefix}-NNNNNN.tar`` shards (and ``{val_prefix}-...`` for a held-out fraction).

    Files are taken in sorted relative-path order. Each sample stores the original bytes
    under its extension (``jpg``, ``png``, ...), ``__key__`` from the relative path, and
    ``cls`` when all images live in class folders (indices follow sorted folder names,
    listed in ``classes.json``).
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if prefix == val_prefix:
        raise ValueError(
            f"prefix and val_prefix are both {prefix!r}: validation shards would overwrite training ones"
        )
    root = Path(input_dir).expanduser()
    files = list_image_files(root, normalise_extensions(extensions))
    output = Path(output_dir).expanduser()
    output.mkdir(parents=True, exist_ok=True)

    relative = [path.relative_to(root) for path in files]
    classes = class_names(relative)
    class_index = {name: index for index, name in enumerate(classes)} if classes is not None else None
    if classes is not None:
        (output / "classes.json").write_text(json.dumps(class_index, indent=1) + "\n")

    train_rows, val_rows = held_out_split(len(files), val_fraction, seed)
    result = ShardResult(classes=classes)
    result.splits[prefix] = _write_split(
        [files[i] for i in train_rows], root, output, prefix, shard_size, class_index
    )
    if val_rows:
        result.splits[val_prefix] = _write_split(
            [files[i] for i in val_rows], root, output, val_prefix, shard_size, class_index
        )
    return result
