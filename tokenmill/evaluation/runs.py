"""Finding what an evaluation script scores: the export, its run, and the images to use.

Shared by scripts/rate_distortion.py and scripts/evaluate.py.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

import tokenmill.config  # noqa: F401  (registers the resolvers a run config may use)
from tokenmill.export import CONFIG_NAME

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
EMBEDDED_DATA_CONFIG = CONF_DIR / "data" / "embedded.yaml"
RUN_CONFIG_NAME = "config_resolved.yaml"


def locate(path: Path) -> tuple[Path, Path | None]:
    """(export directory, run directory or None) for a run or an export path, or a clear error."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / CONFIG_NAME).is_file():
        run_dir = path.parent if (path.parent / RUN_CONFIG_NAME).is_file() else None
        return path, run_dir
    if (path / "export" / CONFIG_NAME).is_file():
        return path / "export", path
    if (path / RUN_CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{path} is a run directory without an export ({path / 'export' / CONFIG_NAME} is missing): "
            "the run has not finished, or ran with export.enabled=false"
        )
    raise FileNotFoundError(
        f"{path} is neither a training run (no {RUN_CONFIG_NAME} and export/) nor an export ({CONFIG_NAME})"
    )


def model_image_size(model) -> int | None:
    """Pixel size the model was built for, when the model says so directly (no VAE in between)."""
    size = getattr(model, "image_size", None)
    if size is None and getattr(model, "vae", None) is None:
        size = getattr(getattr(model, "encoder", None), "image_size", None)
    return int(size) if size is not None else None


def run_datamodule(run_dir: Path):
    """The run's own ImageDataModule, so the model is measured on the data it was validated on."""
    cfg = OmegaConf.load(run_dir / RUN_CONFIG_NAME)
    if "data" not in cfg:
        raise ValueError(f"{run_dir / RUN_CONFIG_NAME} has no `data` section")
    return instantiate(cfg.data)


def embedded_datamodule(num_images: int, image_size: int, seed: int):
    """Held-out embedded photos (conf/data/embedded.yaml), with enough fixed validation crops."""
    cfg = OmegaConf.load(EMBEDDED_DATA_CONFIG)
    cfg.seed = seed  # `${seed}` refers to the root config, which is absent here
    cfg.image_size = image_size
    cfg.source.num_val_samples = num_images
    return instantiate(cfg)
