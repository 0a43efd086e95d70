#!/usr/bin/env python
"""Rate-distortion of a token-budget tokenizer (FlexTok / One-D-Piece style) vs JPEG and WebP.

    python scripts/rate_distortion.py outputs/my_run                 # a training run directory
    python scripts/rate_distortion.py path/to/export --num-images 16 # an exported model alone

Reconstructs validation images from the first k tokens for k in 1, 2, 4, ..., K, compresses the
same images with JPEG and WebP at the tokenizer's byte size for each k, and writes into --out
(default RUN/rate_distortion/, or EXPORT_rate_distortion/ next to a bare export):

    rate_distortion.csv  method, k, bytes_per_image, psnr, ssim, num_images_reached
    rate_distortion.png  PSNR and SSIM against k, one line per method
    grid.png             rows = images, columns = original then each k

Images come from the run's own validation data (the `data` section of config_resolved.yaml);
for an export without its run (an export folder inside a run counts as the run), from the
embedded validation photos of conf/data/embedded.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import tokenmill.config  # noqa: F401  (registers the resolvers a run config may use)
from tokenmill.evaluation.rate_distortion import (
    check_budgets,
    default_budgets,
    evaluate_rate_distortion,
    format_table,
    model_max_tokens,
    plot_rate_distortion,
    reconstruction_grid,
    validation_images,
    write_csv,
)
from tokenmill.evaluation.runs import embedded_datamodule, locate, model_image_size, run_datamodule
from tokenmill.export import from_pretrained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "path", type=Path, help="training run directory (with export/) or an export directory"
    )
    parser.add_argument(
        "--num-images", type=int, default=32, help="validation images to evaluate (default 32)"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN/rate_distortion)")
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed of generative decoders (default 0)"
    )
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=None,
        help="token counts k (default: the model's evaluation budgets, 1, 2, 4, ..., K)",
    )
    parser.add_argument("--no-codecs", action="store_true", help="skip the JPEG / WebP comparison")
    parser.add_argument("--grid-images", type=int, default=8, help="rows of grid.png (default 8)")
    parser.add_argument("--batch-size", type=int, default=16, help="reconstruction batch size (default 16)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image size for the embedded photos (default: the model's input size)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name in ("num_images", "grid_images", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def load_images(model, run_dir: Path | None, args: argparse.Namespace) -> torch.Tensor:
    if run_dir is not None:
        print(f"images: validation data of the run {run_dir}")
        datamodule = run_datamodule(run_dir)
    else:
        image_size = args.image_size or model_image_size(model)
        if image_size is None:
            raise ValueError("cannot tell this model's input size (it has a VAE): pass --image-size")
        print(f"images: embedded validation photos at {image_size}px")
        datamodule = embedded_datamodule(args.num_images, image_size, args.seed)
    images = validation_images(datamodule, args.num_images)
    if len(images) < args.num_images:
        print(f"warning: the validation set has only {len(images)} images (asked for {args.num_images})")
    return images


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        export_dir, run_dir = locate(args.path)
        model = from_pretrained(export_dir, map_location=args.device)
        max_tokens = model_max_tokens(model)
        budgets = check_budgets(model, args.budgets or default_budgets(model))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out or (
        run_dir / "rate_distortion" if run_dir else export_dir.parent / f"{export_dir.name}_rate_distortion"
    )
    if getattr(model, "budget", None) is None and args.budgets is None:
        print(f"note: the model has no token budget, so it is evaluated at k = K = {max_tokens} only")
    bits = getattr(model, "bits_per_token", None)
    if bits is None and not args.no_codecs:
        print("note: continuous tokens have no byte size, so the codec rows stay empty")
    try:
        images = load_images(model, run_dir, args)
        rows = evaluate_rate_distortion(
            model,
            images,
            budgets,
            seed=args.seed,
            batch_size=args.batch_size,
            codecs=() if args.no_codecs else ("jpeg", "webp"),
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_csv(rows, out / "rate_distortion.csv")
    plot_rate_distortion(rows, out / "rate_distortion.png", title=f"{export_dir} ({len(images)} images)")
    reconstruction_grid(
        model, images[: args.grid_images], budgets, args.seed, out / "grid.png", batch_size=args.batch_size
    )
    print(format_table(rows))
    print(f"wrote {out / 'rate_distortion.csv'}, {out / 'rate_distortion.png'}, {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
