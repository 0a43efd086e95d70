"""Every experiment composes and builds; paper configs keep the paper's sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tokenmill.trainers.run import build_task

from .conftest import CONF_DIR, ROOT, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

# Encoder+decoder parameters of the TiTok paper sizes (ViT-S/B/L trunks), in millions.
PAPER_PARAMS_M = {"titok_s128": (40, 60), "titok_b64": (160, 190), "titok_l32": (590, 650)}


def test_experiment_list_is_not_empty():
    assert {"demo", "titok_s128", "titok_b64", "titok_l32"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name, tmp_path):
    cfg = compose_config([f"experiment={name}"], tmp_path)
    assert cfg.task_name == name
    instantiate(cfg.data)  # data module builds without touching the data yet
    with torch.device("meta"):  # paper sizes without allocating memory
        task = build_task(cfg)
    n_params = sum(p.numel() for p in task.net.parameters()) / 1e6
    if name in PAPER_PARAMS_M:
        low, high = PAPER_PARAMS_M[name]
        assert low <= n_params <= high, f"{name}: {n_params:.1f}M parameters"
        assert cfg.data.image_size == 256
        assert task.net.encoder.num_latent_tokens == int(name.split("titok_")[1][1:])
        assert task.net.quantizer.codebook_size == 4096


def _run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_mistyped_experiment_fails_fast_with_hydra_message():
    result = _run_cli("experiment=demoo")
    assert result.returncode != 0
    assert "Could not find 'experiment/demoo'" in result.stderr


def test_mistyped_key_fails_fast_with_hydra_message():
    result = _run_cli("experiment=demo", "trainer.max_stepz=3")
    assert result.returncode != 0
    assert "Key 'max_stepz' is not in struct" in result.stderr
