"""End-to-end runs of train(): outputs, export fidelity, overfitting, exact resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tokenmill.export import from_pretrained
from tokenmill.trainers.run import train

from .conftest import TINY_MODEL_OVERRIDES, compose_config


def _run(tmp_path: Path, *overrides: str, output: str = "run") -> tuple[dict, Path]:
    run_dir = tmp_path / output
    cfg = compose_config(["experiment=demo", *TINY_MODEL_OVERRIDES, *overrides], run_dir)
    return train(cfg), run_dir


def test_demo_run_writes_every_output_and_export_reproduces_reconstructions(tmp_path):
    metrics, run_dir = _run(
        tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=3", "model.loss.discriminator_start=3",
        "callbacks.model_checkpoint.every_n_train_steps=3",
    )
    assert {"val/psnr", "val/ssim", "val/codebook_usage"} <= set(metrics)
    assert 0 < metrics["val/codebook_usage"] <= 100
    assert (run_dir / "config_resolved.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "reconstructions" / "latest.png").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["global_step"] == 6 and summary["export_max_abs_diff"] == 0.0

    saved = load_file(run_dir / "reconstructions.safetensors")
    model = from_pretrained(run_dir / "export")
    with torch.no_grad():
        again = model(saved["images"]).reconstruction
    assert torch.equal(again, saved["reconstructions"])


def _train_losses(run_dir: Path) -> list[float]:
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return [float(r["train/loss/reconstruction"]) for r in rows if r.get("train/loss/reconstruction")]


def test_tiny_titok_overfits_a_fixed_batch(tmp_path):
    _, run_dir = _run(
        tmp_path, "debug=overfit", "trainer.max_steps=150", "trainer.val_check_interval=150",
        "model.loss.discriminator_start=100000", "model.optimizer.lr=3e-3", "model.scheduler.warmup_steps=10",
        "model.net.encoder.width=64", "model.net.encoder.depth=2", "model.net.encoder.num_latent_tokens=16",
        "model.net.quantizer.codebook_size=64",
    )
    losses = _train_losses(run_dir)
    assert len(losses) == 150
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first / 5, f"reconstruction loss went from {first:.4f} to {last:.4f} (< 5x)"


def _trained_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["optimizer_states"]


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    # 24 samples / batch 4 = 6 steps per epoch: stopping at 8 is mid-epoch, the GAN starts at 5.
    common = ["model.loss.discriminator_start=5", "callbacks.model_checkpoint.every_n_train_steps=4",
              "trainer.val_check_interval=4", "export.enabled=false"]
    _run(tmp_path, *common, "trainer.max_steps=16", output="straight")
    _run(tmp_path, *common, "trainer.max_steps=8", output="resumed")
    _run(tmp_path, *common, "trainer.max_steps=16", "ckpt_path=last", output="resumed")

    straight, straight_opt = _trained_state(tmp_path / "straight")
    resumed, resumed_opt = _trained_state(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert any(k.startswith("discriminator.") for k in straight) and any(k.startswith("ema.") for k in straight)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    for a, b in zip(straight_opt, resumed_opt):
        for sa, sb in zip(a["state"].values(), b["state"].values()):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"])
