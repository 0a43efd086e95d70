"""Data-pipeline throughput: training images/s from an image folder vs webdataset shards.

    python benchmarks/data_pipeline.py            # rewrites its section of docs/benchmarks.md
    python benchmarks/data_pipeline.py --quick    # fewer images, docs untouched

The images are JPEG crops (512x512, quality 90) of the photographs that ship with scikit-image,
written once to a temporary folder and packed into webdataset shards with the project's own
`make_shards`, so both sources hold the same bytes. Each case iterates the real training loader
of `ImageDataModule` (decode, random crop to 256, flip, collate) for `--images` images after
one warm-up batch, with 0 (main process), 1 and 2 worker processes, and reports images/s.

Only the section between <!-- data_pipeline:start --> and <!-- data_pipeline:end --> of
docs/benchmarks.md is rewritten.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_model  # noqa: E402

START, END = "<!-- data_pipeline:start -->", "<!-- data_pipeline:end -->"
IMAGE_SIDE = 512
BATCH = 32


def write_images(folder: Path, count: int) -> None:
    """`count` different 512x512 JPEG crops of the bundled photographs."""
    import numpy as np
    from PIL import Image

    from tokenmill.data.source_embedded import skimage_data_dir

    photos = []
    for path in sorted(skimage_data_dir().iterdir()):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            with Image.open(path) as image:
                image = image.convert("RGB")
                if min(image.size) >= IMAGE_SIDE // 2:
                    photos.append(image.resize((IMAGE_SIDE * 2, IMAGE_SIDE * 2)))
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        x, y = rng.integers(0, IMAGE_SIDE, size=2)
        photo.crop((x, y, x + IMAGE_SIDE, y + IMAGE_SIDE)).save(folder / f"{i:06d}.jpg", quality=90)


def images_per_second(source, workers: int, images: int) -> float:
    from tokenmill.data import ImageDataModule

    module = ImageDataModule(source, image_size=256, batch_size=BATCH, num_workers=workers, seed=0,
                             train_crop="random", persistent_workers=False)
    module.setup("fit")
    loader = iter(module.train_dataloader())
    next(loader)  # warm-up: worker start, first decode
    seen, start = 0, time.perf_counter()
    while seen < images:
        seen += len(next(loader)["image"])
    return seen / (time.perf_counter() - start)


def run(args) -> list[dict]:
    from tokenmill.data import ImageFolderSource, WebDatasetSource
    from tokenmill.data.shards import make_shards

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "images", Path(tmp) / "shards"
        total = args.images + 2 * BATCH
        write_images(folder, total)
        make_shards(folder, shards, shard_size=128)
        num_shards = len(list(shards.glob("train-*.tar")))
        sources = {
            "imagefolder": lambda: ImageFolderSource(root=str(folder), val_fraction=0.0),
            "webdataset": lambda: WebDatasetSource(
                train_shards=str(shards / f"train-{{000000..{num_shards - 1:06d}}}.tar"),
                val_shards=None, shuffle_buffer=256, num_train_samples=10 * total,
            ),
        }
        for name, make in sources.items():
            for workers in args.workers:
                rate = images_per_second(make(), workers, args.images)
                rows.append({"source": name, "workers": workers, "images_per_s": rate})
                print(f"  {name:12s} workers={workers}  {rate:8.1f} images/s", flush=True)
    return rows


def write_docs(path: Path, rows: list[dict], meta: dict) -> None:
    lines = [
        START,
        "## Data pipeline (`benchmarks/data_pipeline.py`)",
        "",
        f"Produced by `python benchmarks/data_pipeline.py` on {meta['date']}; machine: {meta['cpu']}, "
        f"{meta['cores']} cores. Training loader of `ImageDataModule` (JPEG decode of 512x512 photos, "
        f"random 256 crop, flip, collate), batch {BATCH}, {meta['images']} images after a warm-up batch; "
        "workers = DataLoader worker processes (0 = in the main process).",
        "",
        "| source | workers | images/s |",
        "|---|---:|---:|",
        *[f"| {r['source']} | {r['workers']} | {r['images_per_s']:.1f} |" for r in rows],
        "",
        "With 2 cores, 2 workers compete with the main process; on a GPU node use `data.num_workers` "
        "of 4-8 per GPU (the webdataset config defaults to 8).",
        END,
    ]
    section = "\n".join(lines)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="timed images per case")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="128 images, docs untouched")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.images, args.no_docs = 128, True
    print(f"{cpu_model()} | {os.cpu_count()} cores", flush=True)
    rows = run(args)
    if not args.no_docs:
        meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_model(),
                "cores": os.cpu_count(), "images": args.images}
        write_docs(args.docs, rows, meta)
        print(f"wrote {args.docs}")


if __name__ == "__main__":
    main()
