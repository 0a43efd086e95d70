"""Every experiment composes and builds; paper configs keep the paper's sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from tokenmill.budget import TokenBudget
from tokenmill.export import from_pretrained
from tokenmill.trainers.run import build_task, train

from .conftest import CONF_DIR, ROOT, TINY_MODEL_OVERRIDES, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

# Encoder+decoder parameters of the TiTok paper sizes (ViT-S/B/L trunks), in millions.
PAPER_PARAMS_M = {"titok_s128": (40, 60), "titok_b64": (160, 190), "titok_l32": (590, 650)}

# Binary-quantizer experiments: (quantizer class, spherical, codebook size, tokens, params in M).
# lfq_256 is Open-MAGVIT2's ImageNet-256 "Base" tokenizer (ch 128, ch_mult [1,1,2,2,4], 2 res
# blocks): its improved_model.py layout counts 25.0M (encoder) + 40.6M (decoder) = 65.6M, which
# ConvEncoder2D/ConvDecoder2D reproduce exactly (the repo does not print a count; their "L" with
# 4 res blocks comes to 115.1M). The TiTok variants keep titok_s128's trunks: LFQ/BSQ have no
# parameters, so only the VQ codebook's 4096 x 12 go.
BINARY_EXPERIMENTS = {
    "lfq_256": ("LFQ", False, 2**18, 256, (60, 70)),
    "titok_s128_lfq": ("LFQ", False, 2**12, 128, PAPER_PARAMS_M["titok_s128"]),
    "titok_s128_bsq": ("LFQ", True, 2**18, 128, PAPER_PARAMS_M["titok_s128"]),
}

# One-D-Piece (Miwa et al. 2025): TiTok-S/B/L trunks with 256 tokens and Tail Token Drop. The
# trunks are titok_s128/b64/l32's; 256 instead of 128/64/32 latent tokens add only their learned
# embeddings (3 x (256 - K) x width: 0.2M / 0.4M / 0.7M), so the TiTok ranges hold.
ONEDPIECE_EXPERIMENTS = {
    "onedpiece_s256": ("titok_s128", PAPER_PARAMS_M["titok_s128"]),
    "onedpiece_b256": ("titok_b64", PAPER_PARAMS_M["titok_b64"]),
    "onedpiece_l256": ("titok_l32", PAPER_PARAMS_M["titok_l32"]),
}


def test_experiment_list_is_not_empty():
    assert {"demo", "titok_s128", "titok_b64", "titok_l32", "lfq_tiny", *BINARY_EXPERIMENTS} <= set(EXPERIMENTS)
    assert {"onedpiece_tiny", *ONEDPIECE_EXPERIMENTS} <= set(EXPERIMENTS)


def names_hub_models(cfg) -> bool:
    """True when the model loads pretrained weights by hub name (not possible offline)."""
    net = cfg.model.net
    return any(
        isinstance(part, DictConfig) and part.get("name_or_path")
        for part in (net, net.get("vision"), net.get("language_model"))
    )


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name, tmp_path):
    cfg = compose_config([f"experiment={name}"], tmp_path)
    assert cfg.task_name == name
    if names_hub_models(cfg):
        # Pretrained towers cannot be fetched offline; tests/test_vlm.py and
        # tests/test_registers.py build these experiments with the same architectures from configs.
        pytest.skip(f"{name} loads hub weights")
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


@pytest.mark.parametrize("name", sorted(BINARY_EXPERIMENTS))
def test_binary_quantizer_experiments_keep_paper_sizes(name, tmp_path):
    quantizer_class, spherical, codebook_size, tokens, (low, high) = BINARY_EXPERIMENTS[name]
    cfg = compose_config([f"experiment={name}"], tmp_path)
    # the quantizer group replaced the node wholesale: no VQ key survives the swap
    assert "codebook_size" not in cfg.model.net.quantizer
    with torch.device("meta"):
        task = build_task(cfg)
    quantizer = task.net.quantizer
    assert type(quantizer).__name__ == quantizer_class and quantizer.spherical is spherical
    assert quantizer.codebook_size == task.net.codebook_size == codebook_size
    assert task.net.encoder.num_latent_tokens == task.net.decoder.num_latent_tokens == tokens
    assert cfg.data.image_size == 256
    n_params = sum(p.numel() for p in task.net.parameters()) / 1e6
    assert low <= n_params <= high, f"{name}: {n_params:.1f}M parameters"


@pytest.mark.parametrize("name", sorted(ONEDPIECE_EXPERIMENTS))
def test_onedpiece_experiments_are_titok_trunks_with_a_256_token_budget(name, tmp_path):
    titok, (low, high) = ONEDPIECE_EXPERIMENTS[name]
    cfg = compose_config([f"experiment={name}"], tmp_path)
    with torch.device("meta"):
        task = build_task(cfg)
    net, budget = task.net, task.net.budget
    assert isinstance(budget, TokenBudget)
    assert budget.max_tokens == net.max_tokens == 256
    assert net.encoder.num_latent_tokens == net.decoder.num_latent_tokens == 256
    assert budget.dim == net.encoder.token_dim == 12
    # the authors' tail drop: one k per batch, uniform from 1 (see onedpiece_s256.yaml)
    assert (budget.distribution, budget.min_tokens) == ("uniform", 1)
    assert budget.per_sample is False and budget.keep_all_prob == 0.0
    assert budget.seed == cfg.seed
    assert cfg.data.image_size == 256 and net.quantizer.codebook_size == 4096
    n_params = sum(p.numel() for p in net.parameters()) / 1e6
    assert low <= n_params <= high, f"{name}: {n_params:.1f}M parameters"
    # same trunk and optimisation as the TiTok experiment of that size; only the tokens differ
    base = compose_config([f"experiment={titok}"], tmp_path)
    for key in ("patch_size", "width", "depth", "num_heads", "mlp_ratio", "token_dim"):
        assert cfg.model.net.encoder[key] == base.model.net.encoder[key], key
    for key in ("optimizer", "scheduler", "loss", "ema_decay", "gradient_clip_norm", "discriminator"):
        assert cfg.model[key] == base.model[key], key
    assert (cfg.data.batch_size, cfg.trainer.max_steps) == (base.data.batch_size, base.trainer.max_steps)


def test_budget_is_opt_in(tmp_path):
    for name in ("demo", "titok_s128"):
        cfg = compose_config([f"experiment={name}"], tmp_path)
        assert cfg.model.net.budget is None
        with torch.device("meta"):
            assert build_task(cfg).net.budget is None
    cfg = compose_config(["experiment=onedpiece_tiny"], tmp_path)
    with torch.device("meta"):
        budget = build_task(cfg).net.budget
    assert isinstance(budget, TokenBudget) and budget.max_tokens == 32 and cfg.data.image_size == 64


def test_onedpiece_tiny_trains_with_tail_drop(tmp_path):
    run_dir = tmp_path / "run"
    steps = ["trainer.max_steps=3", "trainer.val_check_interval=3", "callbacks.model_checkpoint.every_n_train_steps=3"]
    cfg = compose_config(["experiment=onedpiece_tiny", *TINY_MODEL_OVERRIDES, *steps], run_dir)
    metrics = train(cfg)
    assert "val/psnr" in metrics
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert int(state["net.budget.num_draws"]) == 3  # one draw per training step, saved for resume
    model = from_pretrained(run_dir / "export")
    assert isinstance(model.budget, TokenBudget) and model.budget.max_tokens == 8
    with torch.no_grad():
        images = torch.rand(1, 3, 32, 32) * 2 - 1
        assert model.reconstruct(images, num_tokens=1).shape == images.shape


def test_quantizer_group_swaps_from_the_command_line(tmp_path):
    # (an experiment that sets VQ keys, like demo's codebook_size, would merge them into any
    # quantizer it is combined with: such pairings get their own experiment file)
    cfg = compose_config(["model/quantizer=bsq"], tmp_path)
    assert cfg.model.net.quantizer._target_ == "tokenmill.quantizers.LFQ" and cfg.model.net.quantizer.spherical
    assert cfg.model.net.quantizer.dim == cfg.model.net.encoder.token_dim == 12
    assert "codebook_size" not in cfg.model.net.quantizer
    # the paper TiTok experiments leave the quantizer to the group, so they swap too
    cfg = compose_config(["experiment=titok_s128", "model/quantizer=lfq"], tmp_path)
    assert cfg.model.net.quantizer._target_ == "tokenmill.quantizers.LFQ"
    assert "codebook_size" not in cfg.model.net.quantizer


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


def test_flextok_256_keeps_the_paper_settings(tmp_path):
    cfg = compose_config(["experiment=flextok_256"], tmp_path)
    with torch.device("meta"):
        task = build_task(cfg)
    net = task.net
    assert cfg.data.image_size == 256 and cfg.data.batch_size == 32
    enc, dec = net.encoder, net.decoder
    # d18-d18: width 1152 = 18 heads x 64, depth 18, on 32x32x16 VAE latents in 2x2 patches
    assert (enc.image_size, enc.grid, enc.causal_registers) == (32, 16, True)
    assert len(enc.transformer.blocks) == len(dec.blocks) == 18
    assert enc.to_tokens.in_features == dec.patch_in.out_features == 1152
    assert net.max_tokens == 256 and net.budget.distribution == "pow2"
    assert net.quantizer.levels == [8, 8, 8, 5, 5, 5] and net.quantizer.codebook_size == 64000
    assert net.vae.latent_channels == 16 and dec.in_channels == 16
    assert dec.repa is not None and dec.repa.teacher.feature_dim == 1024
    assert net.is_generative and task.discriminator is None and task.perceptual is None
