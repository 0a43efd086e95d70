#!/usr/bin/env python
"""Pack an image folder into WebDataset tar shards for ``data=webdataset``.

    python scripts/make_shards.py --input /data/imagenet/train --output /data/imagenet --shard-size 1000

Prints the shard pattern(s) to put in ``conf/data/webdataset.yaml``.
"""

from __future__ import annotations

import argparse
import sys

from tokenmill.data.shards import SHARD_IMAGE_EXTENSIONS, make_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="image folder (class subfolders give a `cls` label)")
    parser.add_argument("--output", required=True, help="folder for the .tar shards (created if missing)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--prefix", default="train", help="shard name prefix (default train)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.0, help="seeded fraction written as validation shards"
    )
    parser.add_argument("--val-prefix", default="val", help="prefix of validation shards (default val)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation hold-out (default 0)")
    parser.add_argument(
        "--extensions",
        nargs="+",
        default=list(SHARD_IMAGE_EXTENSIONS),
        help=f"image file extensions to pack (default {' '.join(SHARD_IMAGE_EXTENSIONS)})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = make_shards(
        args.input,
        args.output,
        shard_size=args.shard_size,
        prefix=args.prefix,
        val_fraction=args.val_fraction,
        val_prefix=args.val_prefix,
        seed=args.seed,
        extensions=args.extensions,
    )
    for name, shards in result.splits.items():
        print(
            f"{name}: {shards.num_samples} images in {shards.num_shards} shards -> {args.output}/{shards.pattern}"
        )
    if result.classes is not None:
        print(f"{len(result.classes)} classes, written to {args.output}/classes.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
