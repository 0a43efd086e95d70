#!/usr/bin/env python
"""Encode a dataset with an exported tokenizer into token shards for downstream training.

    python scripts/pretokenize.py --export outputs/train/runs/<time>/export --output /data/tokens \\
        --source imagefolder --root /data/imagenet/train [--format wds|parquet] [--shard-size 1000]

Sources (deterministic order; every image is centre-cropped at the tokenizer's image size, as
in validation):
    --source imagefolder --root DIR                 every image under DIR, sorted by path
    --source webdataset --urls 'train-{0000..0252}.tar' [--image-key jpg;png]
    --source hf --name PATH_OR_HUB_NAME [--split train] [--data-dir DIR] [--data-files F ...]
    --source embedded [--split val] [--num-samples 32]   scikit-image's photos (no download)
    --source hydra --data data=imagefolder data.source.root=/x [--split train]
                                                    the source of a training data config

Rerunning the same command after a crash keeps complete shards and finishes the rest. Read the
shards back with `tokenmill.export.pretokenize.TokenShardDataset(OUTPUT)`. See docs/data.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tokenmill.export.pretokenize import (
    _CRASH_ENV,
    FORMATS,
    embedded_source,
    hf_source,
    hydra_source,
    imagefolder_source,
    pretokenize,
    webdataset_source,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SOURCES = ("imagefolder", "webdataset", "hf", "embedded", "hydra")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--export", required=True, help="tokenizer export directory (config.json + model.safetensors)"
    )
    parser.add_argument("--output", required=True, help="output directory for the shards and manifest.json")
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument(
        "--format", default="wds", choices=sorted(FORMATS), help="wds tar shards or parquet (default wds)"
    )
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="source samples per shard (default 1000)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder call (default 32)")
    parser.add_argument(
        "--num-workers", type=int, default=4, help="image decoding threads (default 4; 0: none)"
    )
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--image-size", type=int, default=None, help="override the tokenizer's image size")
    parser.add_argument("--overwrite", action="store_true", help="delete existing shards and start over")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group("sources")
    group.add_argument("--root", help="imagefolder: the folder")
    group.add_argument("--urls", help="webdataset: shard pattern(s), '::' between patterns")
    group.add_argument(
        "--image-key", default="jpg;jpeg;png;webp", help="webdataset: image fields, first present wins"
    )
    group.add_argument("--name", help="hf: dataset path (imagefolder, parquet, or a hub name)")
    group.add_argument("--config-name", default=None, help="hf: dataset configuration name")
    group.add_argument("--data-dir", default=None, help="hf: data_dir")
    group.add_argument("--data-files", nargs="+", default=None, help="hf: data_files of the split")
    group.add_argument("--image-column", default="image", help="hf: image column (default image)")
    group.add_argument(
        "--split", default=None, help="hf: split (default train); embedded/hydra: train or val"
    )
    group.add_argument("--num-samples", type=int, default=32, help="embedded: number of samples (default 32)")
    group.add_argument("--data", nargs="+", default=[], help="hydra: overrides composing conf/config.yaml")
    # Testing aid: after N new shards, start the next one and exit abruptly (like a kill).
    parser.add_argument("--crash-after-shards", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_source(args: argparse.Namespace):
    def need(option: str):
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if not value:
            raise SystemExit(f"--source {args.source} needs {option}")
        return value

    if args.source == "imagefolder":
        return imagefolder_source(need("--root"))
    if args.source == "webdataset":
        return webdataset_source(need("--urls"), image_key=args.image_key)
    if args.source == "hf":
        data_files = {args.split or "train": args.data_files} if args.data_files else None
        return hf_source(
            need("--name"),
            split=args.split or "train",
            name=args.config_name,
            data_dir=args.data_dir,
            data_files=data_files,
            image_column=args.image_column,
        )
    if args.source == "embedded":
        return embedded_source(args.split or "val", args.num_samples)
    return hydra_source(need("--data"), CONF_DIR, split=args.split or "train")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.crash_after_shards:
        os.environ[_CRASH_ENV] = str(args.crash_after_shards)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    result = pretokenize(
        args.export,
        build_source(args),
        args.output,
        fmt=args.format,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        image_size=args.image_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    manifest = result.manifest
    print(
        f"{manifest['num_samples']} images -> {len(manifest['shards'])} {args.format} shards in {args.output} "
        f"(tokens {manifest['token_shape']} {manifest['token_dtype']}, codebook {manifest['codebook_size']}); "
        f"{manifest['num_skipped']} undecodable images skipped; "
        f"{result.shards_written} shards written now, {result.shards_skipped} kept from before"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
