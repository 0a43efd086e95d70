"""scripts/pretokenize.py and tokenmill.export.pretokenize: tokens written in both formats decode
to exactly the tokenizer's own reconstruction, a killed run resumes without losing or repeating
samples, undecodable images are skipped and counted, and the loader splits shards over workers."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tokenmill.data.decode import decode_image
from tokenmill.data.shards import make_shards, sample_key
from tokenmill.data.source_embedded import skimage_data_dir
from tokenmill.data.transforms import EvalTransform
from tokenmill.export import build_model, from_pretrained
from tokenmill.export.pretokenize import (
    MANIFEST_NAME,
    TokenShardDataset,
    hydra_source,
    imagefolder_source,
    pretokenize,
    read_shard,
    webdataset_source,
)

from .conftest import CONF_DIR, ROOT, tiny_autoencoder_config

SIZE = 32
PHOTOS = {  # relative path -> (scikit-image photo, format); sorted order is the source order
    "a/astronaut.png": ("astronaut.png", "PNG"),
    "a/camera.jpg": ("camera.png", "JPEG"),
    "a/chelsea.png": ("chelsea.png", "PNG"),
    "b/coffee.jpg": ("coffee.png", "JPEG"),
    "b/ihc.png": ("ihc.png", "PNG"),
    "b/rocket.jpg": ("rocket.jpg", "JPEG"),
    "c/coins.png": ("coins.png", "PNG"),
}
BROKEN = "b/broken.jpg"  # a truncated JPEG; sorts before b/coffee.jpg


def encoded(name: str, fmt: str, max_side: int = 64) -> bytes:
    image = Image.open(skimage_data_dir() / name)
    image.thumbnail((max_side, max_side))  # non-square thumbnails exercise the centre crop
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def write_folder(root: Path, corrupt: bool = False) -> list[str]:
    for relative, (name, fmt) in PHOTOS.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(encoded(name, fmt))
    if corrupt:
        data = encoded("astronaut.png", "JPEG")
        (root / BROKEN).write_bytes(data[: len(data) // 3])  # valid header, fails on load
    return sorted([*PHOTOS, *([BROKEN] if corrupt else [])])


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export")
    build_model(tiny_autoencoder_config(image_size=SIZE, tokens=8, codebook=32)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_folder(root)
    return root


def direct(export: Path, root: Path, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokenizer applied directly: (images, indices, reconstruction) for these files."""
    model = from_pretrained(export)
    transform = EvalTransform(SIZE)
    images = torch.stack([transform(decode_image((root / key).read_bytes())) for key in keys])
    with torch.no_grad():
        return images, model.encode(images).indices, model.reconstruct(images)


def load_all(output: Path, **kwargs) -> list[dict]:
    return list(TokenShardDataset(output, **kwargs))


def no_tmp_files(output: Path) -> bool:
    return not [p for p in output.iterdir() if ".tmp-" in p.name]


def load_cli():
    spec = importlib.util.spec_from_file_location("pretokenize_cli", ROOT / "scripts" / "pretokenize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_tokens_decode_to_the_tokenizers_reconstruction(export_dir, folder, tmp_path, fmt):
    out = tmp_path / "tokens"
    result = pretokenize(
        export_dir,
        imagefolder_source(folder),
        out,
        fmt=fmt,
        shard_size=3,
        batch_size=2,
        num_workers=2,
        progress=False,
    )
    keys = sorted(PHOTOS)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest == result.manifest and manifest["complete"] is True
    assert manifest["format"] == fmt and manifest["num_samples"] == len(keys) and manifest["num_skipped"] == 0
    assert (
        manifest["codebook_size"] == 32
        and manifest["token_shape"] == [8]
        and manifest["token_dtype"] == "int16"
    )
    assert manifest["tokenizer"]["export_path"] == str(export_dir.resolve())
    assert len(manifest["tokenizer"]["config_sha256"]) == 64 and manifest["image_size"] == SIZE
    suffix = ".tar" if fmt == "wds" else ".parquet"
    assert [s["name"] for s in manifest["shards"]] == [f"tokens-{i:06d}{suffix}" for i in range(3)]
    assert [(s["first_index"], s["end_index"], s["num_samples"]) for s in manifest["shards"]] == [
        (0, 3, 3),
        (3, 6, 3),
        (6, 7, 1),
    ]
    # Stored compactly: int16 [K] per sample.
    first = next(read_shard(out / manifest["shards"][0]["name"]))
    assert first["tokens"].dtype == np.int16 and first["tokens"].shape == (8,)

    samples = load_all(out)
    assert [s["key"] for s in samples] == keys and [s["index"] for s in samples] == list(range(len(keys)))
    tokens = torch.stack([s["tokens"] for s in samples])
    assert tokens.dtype == torch.long and tokens.shape == (len(keys), 8)
    _, indices, reconstruction = direct(export_dir, folder, keys)
    assert torch.equal(tokens, indices)
    model = from_pretrained(export_dir)
    with torch.no_grad():
        assert torch.equal(model.decode_indices(tokens), reconstruction)
    assert no_tmp_files(out)


def test_wds_shards_are_readable_with_webdataset(export_dir, folder, tmp_path):
    import webdataset as wds

    out = tmp_path / "tokens"
    pretokenize(export_dir, imagefolder_source(folder), out, shard_size=4, progress=False)
    urls = [str(p) for p in sorted(out.glob("tokens-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["json"]["key"] for s in samples] == sorted(PHOTOS)
    assert samples[0]["__key__"] == "000000000" and samples[0]["tokens.npy"].dtype == np.int16
    assert {"width", "height", "image_size", "tokenizer"} <= set(samples[0]["json"])


# --------------------------------------------------------------------------------- corrupt images
def test_corrupt_image_is_skipped_and_counted(export_dir, tmp_path):
    root = tmp_path / "images"
    files = write_folder(root, corrupt=True)
    shards = make_shards(root, tmp_path / "wds", shard_size=3)  # a webdataset source with the broken jpeg
    pattern = str(tmp_path / "wds" / shards.splits["train"].pattern)
    out = tmp_path / "tokens"
    result = pretokenize(
        export_dir, webdataset_source(pattern), out, fmt="parquet", shard_size=3, progress=False
    )
    manifest = result.manifest
    broken_index = files.index(BROKEN)
    assert manifest["num_skipped"] == 1 and manifest["num_samples"] == len(files) - 1
    assert manifest["num_source_samples"] == len(files)
    (skipped,) = manifest["skipped"]
    assert (
        skipped["key"] == "b/broken" and skipped["index"] == broken_index and "truncated" in skipped["reason"]
    )
    assert manifest["shards"][broken_index // 3]["num_skipped"] == 1
    samples = load_all(out)
    assert [s["index"] for s in samples] == [i for i in range(len(files)) if i != broken_index]
    good = [f for f in files if f != BROKEN]
    _, indices, _ = direct(export_dir, root, good)
    assert torch.equal(torch.stack([s["tokens"] for s in samples]), indices)


# --------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("fmt, source", [("wds", "imagefolder"), ("parquet", "webdataset")])
def test_killed_run_resumes_without_losing_or_repeating_samples(export_dir, folder, tmp_path, fmt, source):
    out = tmp_path / "tokens"
    keys = sorted(PHOTOS)
    if source == "imagefolder":
        source_args = ["--root", str(folder)]
    else:  # input tars of 3 samples, output shards of 2: a stream resumed mid-tar
        shards = make_shards(folder, tmp_path / "wds", shard_size=3)
        source_args = ["--urls", str(tmp_path / "wds" / shards.splits["train"].pattern)]
    args = [
        *("--export", str(export_dir), "--output", str(out), "--source", source, *source_args),
        *("--format", fmt, "--shard-size", "2", "--batch-size", "2", "--no-progress", "--device", "cpu"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pretokenize.py"), *args, "--crash-after-shards", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert killed.returncode == 75, killed.stderr
    suffix = ".tar" if fmt == "wds" else ".parquet"
    assert (out / f"tokens-000000{suffix}").is_file() and not (out / f"tokens-000001{suffix}").exists()
    assert not no_tmp_files(out)  # the second shard died half-written
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"] is False
    with pytest.raises(ValueError, match="unfinished run"):
        TokenShardDataset(out)
    first_shard = (out / f"tokens-000000{suffix}").stat()

    assert load_cli().main(args) == 0
    assert no_tmp_files(out)
    assert (out / f"tokens-000000{suffix}").stat().st_mtime_ns == first_shard.st_mtime_ns  # kept, not redone
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 4
    samples = load_all(out)
    expected = keys if source == "imagefolder" else [sample_key(Path(key)) for key in keys]
    assert [s["key"] for s in samples] == expected  # each exactly once, in order
    assert [s["index"] for s in samples] == list(range(len(keys)))
    _, indices, _ = direct(export_dir, folder, keys)
    assert torch.equal(torch.stack([s["tokens"] for s in samples]), indices)


def test_other_settings_in_the_same_directory_are_refused(export_dir, folder, tmp_path):
    out = tmp_path / "tokens"
    pretokenize(export_dir, imagefolder_source(folder), out, shard_size=4, progress=False)
    again = pretokenize(export_dir, imagefolder_source(folder), out, shard_size=4, progress=False)
    assert again.shards_written == 0 and again.shards_skipped == 2  # finished run: nothing to do
    with pytest.raises(ValueError, match="another run.*shard_size"):
        pretokenize(export_dir, imagefolder_source(folder), out, shard_size=3, progress=False)
    redone = pretokenize(
        export_dir, imagefolder_source(folder), out, shard_size=3, overwrite=True, progress=False
    )
    assert redone.shards_written == 3 and sorted(p.name for p in out.glob("tokens-*.tar")) == [
        f"tokens-{i:06d}.tar" for i in range(3)
    ]


# --------------------------------------------------------------------------------- loading
def test_loader_splits_shards_over_workers_and_ranks(export_dir, folder, tmp_path):
    out = tmp_path / "tokens"
    pretokenize(export_dir, imagefolder_source(folder), out, fmt="parquet", shard_size=2, progress=False)
    dataset = TokenShardDataset(out)
    assert len(dataset) == len(PHOTOS)
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["key"]) == sorted(PHOTOS)
    assert batches[0]["tokens"].shape == (2, 8) and batches[0]["tokens"].dtype == torch.long
    by_rank = [load_all(out, rank=r, world_size=2) for r in range(2)]
    assert sorted(s["key"] for part in by_rank for s in part) == sorted(PHOTOS)
    few = [load_all(out, rank=r, world_size=5) for r in range(5)]  # fewer shards than readers
    assert sorted(s["key"] for part in few for s in part) == sorted(PHOTOS)
    shuffled = load_all(out, shuffle=True, seed=1)
    assert sorted(s["key"] for s in shuffled) == sorted(PHOTOS)
    assert [s["key"] for s in shuffled] == [s["key"] for s in load_all(out, shuffle=True, seed=1)]


def test_hydra_source_matches_explicit_source(folder):
    composed = hydra_source(
        ["data=imagefolder", f"data.source.root={folder}", "data.source.val_fraction=0"],
        CONF_DIR,
        split="train",
    )
    explicit = imagefolder_source(folder)
    assert composed.num_samples == explicit.num_samples == len(PHOTOS)
    assert [s.key for s in composed.iterate()] == [s.key for s in explicit.iterate()] == sorted(PHOTOS)
