"""Shared helpers: compose the real Hydra configs and build tiny models for CPU tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import tokenmill.config  # noqa: F401  (resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# Small enough for a CPU test step in well under a second; same components as the paper configs.
TINY_MODEL_OVERRIDES = [
    "data.image_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.source.num_train_samples=24",
    "data.source.num_val_samples=4",
    "model.net.encoder.patch_size=8",
    "model.net.encoder.width=32",
    "model.net.encoder.depth=1",
    "model.net.encoder.num_heads=2",
    "model.net.encoder.num_latent_tokens=8",
    "model.net.encoder.token_dim=8",
    "model.net.quantizer.codebook_size=32",
    "model.num_grid_images=4",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def compose_config(overrides: list[str], output_dir: Path | str = "/tmp/tokenmill-test"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def tiny_autoencoder_config(image_size=32, patch_size=8, width=32, depth=1, tokens=8, token_dim=8, codebook=32):
    common = dict(image_size=image_size, patch_size=patch_size, width=width, depth=depth, num_heads=2,
                  num_latent_tokens=tokens, token_dim=token_dim)
    return OmegaConf.create({
        "_target_": "tokenmill.tokenizers.Autoencoder",
        "encoder": {"_target_": "tokenmill.tokenizers.ViTEncoder1D", **common},
        "quantizer": {"_target_": "tokenmill.quantizers.VectorQuantizer", "dim": token_dim, "codebook_size": codebook},
        "decoder": {"_target_": "tokenmill.tokenizers.ViTDecoder1D", **common},
    })


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    yield


class StopAtStep(L.Callback):
    """Ends fit() after `step` steps, leaving max_steps (and so the LR schedule) untouched:
    an interruption, as a preempted job sees it."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
