"""FlexTok pieces: causal registers, rectified-flow decoder, REPA, VAE, experiment and export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tokenmill.budget import TokenBudget
from tokenmill.export import from_pretrained, save_pretrained
from tokenmill.export.pretrained import build_model
from tokenmill.quantizers import FSQ
from tokenmill.tokenizers import (
    Autoencoder,
    FrozenVAE,
    RectifiedFlowDecoder,
    REPAAlignment,
    ViTEncoder1D,
    ViTFeatureTeacher,
)
from tokenmill.trainers.run import train

from .conftest import compose_config

K = 8


def _flextok_config(repa: bool = False) -> dict:
    decoder = {
        "_target_": "tokenmill.tokenizers.RectifiedFlowDecoder", "image_size": 16, "patch_size": 4,
        "width": 32, "depth": 2, "num_heads": 2, "num_latent_tokens": K, "token_dim": 6, "num_steps": 4,
    }
    if repa:
        decoder["repa"] = {
            "_target_": "tokenmill.tokenizers.REPAAlignment", "hidden_dim": 32, "depth": 1, "projector_dim": 16,
            "teacher": {"_target_": "tokenmill.tokenizers.ViTFeatureTeacher", "image_size": 16, "patch_size": 8,
                        "width": 16, "depth": 1, "num_heads": 2},
        }
    return {
        "_target_": "tokenmill.tokenizers.Autoencoder",
        "encoder": {"_target_": "tokenmill.tokenizers.ViTEncoder1D", "image_size": 16, "patch_size": 4, "width": 32,
                    "depth": 2, "num_heads": 2, "num_latent_tokens": K, "token_dim": 6, "causal_registers": True},
        "quantizer": {"_target_": "tokenmill.quantizers.FSQ", "levels": [8, 8, 8, 5, 5, 5]},
        "budget": {"_target_": "tokenmill.budget.TokenBudget", "max_tokens": K, "dim": 6, "distribution": "pow2"},
        "decoder": decoder,
    }


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    """Smooth random images (bilinearly upsampled 4x4 colour fields) in [-1, 1]: structured
    enough that a few tokens can describe them, unlike per-pixel noise."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False) * 2 - 1


def _randomise_zero_inits(model: torch.nn.Module) -> None:
    """AdaLN-zero starts every block (and the read-out) at zero, so an untrained decoder ignores
    its tokens; give those layers weights, as training would."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or name.startswith("decoder.final."):
                p.normal_(0, 0.05)


def test_causal_registers_cannot_see_later_registers():
    torch.manual_seed(0)
    enc = ViTEncoder1D(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, num_latent_tokens=K,
                       token_dim=6, causal_registers=True).eval()
    mask = enc.attention_mask(torch.device("cpu"))
    assert mask.shape == (16 + K, 16 + K)
    assert not mask[:16, 16:].any()  # patches never see registers
    assert mask[16:, :16].all()  # registers see every patch
    assert torch.equal(mask[16:, 16:], torch.ones(K, K, dtype=torch.bool).tril())
    x = _images()
    before = enc(x)
    with torch.no_grad():
        enc.latent_tokens[5:] += torch.randn(K - 5, 32)  # change registers 5.. only
    after = enc(x)
    assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6)  # earlier registers unaffected
    assert not torch.allclose(before[:, 5:], after[:, 5:], atol=1e-3)


def test_decoder_decodes_from_any_k_reproducibly():
    torch.manual_seed(1)
    model = build_model(_flextok_config()).eval()
    _randomise_zero_inits(model)
    images = _images()
    outputs = {}
    for k in range(1, K + 1):
        out = model.reconstruct(images, num_tokens=k, seed=7)
        assert out.shape == images.shape and torch.isfinite(out).all()
        outputs[k] = out
    assert torch.equal(outputs[3], model.reconstruct(images, num_tokens=3, seed=7))  # fixed seed: same sample
    assert not torch.allclose(outputs[1], outputs[K], atol=1e-4)  # the kept tokens matter
    assert not torch.equal(model.reconstruct(images, seed=7), model.reconstruct(images, seed=8))
    # a sample does not depend on the batch it is decoded in
    assert torch.allclose(model.reconstruct(images[:2], num_tokens=3, seed=7), outputs[3][:2], atol=1e-6)
    # classifier-free guidance changes the sample
    codes = model.encode(images).codes
    guided = model.decoder(model.budget(codes, 4), seed=7, guidance_scale=3.0)
    assert not torch.allclose(guided, model.decoder(model.budget(codes, 4), seed=7), atol=1e-4)


def _flow_loss_at_fixed_noise(model: Autoencoder, images: torch.Tensor) -> float:
    """Mean flow loss over 4 fixed draws of (t, noise, condition dropout)."""
    state = torch.get_rng_state()
    torch.manual_seed(123)
    with torch.no_grad():
        value = sum(float(model(images).decoder_losses["flow"]) for _ in range(4)) / 4
    torch.set_rng_state(state)
    return value


def test_flow_loss_falls_on_an_overfit_batch():
    torch.manual_seed(2)
    model = build_model(_flextok_config()).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    images = _images(8)
    before = _flow_loss_at_fixed_noise(model, images)
    for _ in range(200):
        out = model(images)
        assert out.reconstruction is None  # a generative decoder trains on its own loss
        loss = sum(out.decoder_losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _flow_loss_at_fixed_noise(model, images)
    print(f"flow loss at fixed noise {before:.3f} -> {after:.3f}")
    assert after < 0.65 * before, f"flow loss at fixed noise {before:.3f} -> {after:.3f}"
    assert model.encoder.to_tokens.weight.grad.abs().sum() > 0  # the encoder learns through FSQ


def test_repa_aligns_decoder_states_with_a_frozen_teacher(tmp_path):
    torch.manual_seed(3)
    model = build_model(_flextok_config(repa=True)).train()
    repa = model.decoder.repa
    out = model(_images())
    assert set(out.decoder_losses) == {"flow", "repa"}
    assert -1.0 <= float(out.decoder_losses["repa"]) / -repa.weight <= 1.0  # a weighted cosine
    sum(out.decoder_losses.values()).backward()
    assert repa.projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in repa.teacher.parameters())
    assert not repa.teacher.training  # stays in eval even in a training model
    # real weights load from a path, strictly
    save_file(repa.teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    loaded = ViTFeatureTeacher(image_size=16, patch_size=8, width=16, depth=1, num_heads=2,
                               weights_path=str(tmp_path / "teacher.safetensors"))
    assert torch.equal(loaded.pos, repa.teacher.pos)
    with pytest.raises(ValueError, match=r"pos: file \(4, 16\) vs model \(16, 16\)"):
        ViTFeatureTeacher(image_size=16, patch_size=4, width=16, depth=1, num_heads=2,
                          weights_path=str(tmp_path / "teacher.safetensors"))
    assert REPAAlignment.resize_grid(torch.randn(2, 4, 16), 4).shape == (2, 16, 16)


def test_exported_flextok_reloads_and_decodes_identically(tmp_path):
    torch.manual_seed(4)
    model = build_model(_flextok_config(repa=True)).eval()
    _randomise_zero_inits(model)
    images = _images()
    indices = model.encode(images).indices
    save_pretrained(model, tmp_path / "export")
    reloaded = from_pretrained(tmp_path / "export").eval()
    for k in (1, 4, K):
        ours = model.decode_indices(indices, num_tokens=k, seed=11)
        theirs = reloaded.decode_indices(indices, num_tokens=k, seed=11)
        assert torch.equal(ours, theirs)


def _tiny_vae() -> Autoencoder:
    conv = {"image_size": 16, "base_channels": 8, "channel_multipliers": [1, 2], "num_res_blocks": 1, "norm_groups": 4}
    return build_model({
        "_target_": "tokenmill.tokenizers.Autoencoder",
        "encoder": {"_target_": "tokenmill.tokenizers.ConvEncoder2D", **conv, "token_dim": 8},
        "quantizer": {"_target_": "tokenmill.tokenizers.GaussianBottleneck", "dim": 4},
        "decoder": {"_target_": "tokenmill.tokenizers.ConvDecoder2D", **conv, "token_dim": 4, "adaptive_norm": False},
    })


def test_kl_vae_and_frozen_vae_latent_space(tmp_path):
    torch.manual_seed(5)
    vae = _tiny_vae()
    out = vae.train()(_images())
    assert out.indices is None and set(out.losses) == {"kl"} and out.losses["kl"] > 0
    with pytest.raises(ValueError, match=r"expects \[B, N, 8\]"):
        vae.quantizer(torch.randn(1, 4, 6))
    save_pretrained(vae.eval(), tmp_path / "vae")
    frozen = FrozenVAE(pretrained_path=str(tmp_path / "vae"))
    latents = frozen.encode(_images())
    assert latents.shape == (4, 4, 8, 8)
    assert frozen.decode(latents).shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="GaussianBottleneck"):
        FrozenVAE(autoencoder=build_model(_flextok_config()))
    # a FlexTok in the VAE's latent space: encoder and flow decoder see 8x8x4 latents
    model = Autoencoder(
        encoder=ViTEncoder1D(image_size=8, patch_size=2, in_channels=4, width=32, depth=1, num_heads=2,
                             num_latent_tokens=K, token_dim=6, causal_registers=True),
        quantizer=FSQ([8, 8, 8, 5, 5, 5]),
        budget=TokenBudget(K, 6),
        decoder=RectifiedFlowDecoder(image_size=8, patch_size=2, in_channels=4, width=32, depth=1, num_heads=2,
                                     num_latent_tokens=K, token_dim=6, num_steps=2),
        vae=frozen,
    )
    model.train()
    assert not model.vae.training
    trained = model(_images())
    sum(trained.decoder_losses.values()).backward()
    assert all(p.grad is None for p in model.vae.parameters())  # the VAE stays frozen
    assert model.eval().reconstruct(_images(), num_tokens=2, seed=0).shape == (4, 3, 16, 16)


def test_flextok_256_paper_config_runs_two_steps_at_tiny_size(tmp_path):
    overrides = [
        "experiment=flextok_256", "data=embedded", "data.image_size=32", "data.batch_size=2",
        "data.source.num_train_samples=8", "data.source.num_val_samples=2", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=2",
        "model.net.encoder.width=32", "model.net.encoder.depth=2", "model.net.encoder.num_heads=2",
        "model.net.encoder.num_latent_tokens=8", "model.net.decoder.num_steps=2",
        "model.net.decoder.repa.projector_dim=16", "model.net.decoder.repa.teacher.image_size=28",
        "model.net.decoder.repa.teacher.width=16", "model.net.decoder.repa.teacher.depth=1",
        "model.net.decoder.repa.teacher.num_heads=2", "vae_architecture.encoder.base_channels=8",
        "vae_architecture.encoder.norm_groups=4", "vae_architecture.decoder.base_channels=8",
        "vae_architecture.decoder.norm_groups=4", "model.scheduler.warmup_steps=1",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "logger=csv",
    ]
    cfg = compose_config(overrides, tmp_path)
    assert cfg.model.net.encoder.image_size == 4 and cfg.model.net.encoder.in_channels == 16
    assert list(cfg.model.net.quantizer.levels) == [8, 8, 8, 5, 5, 5]
    metrics = train(cfg)
    assert {"val/psnr", "val/ssim", "val/codebook_usage"} <= set(metrics)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["global_step"] == 2 and summary["export_max_abs_diff"] == 0.0
    reloaded = from_pretrained(tmp_path / "export")
    assert isinstance(reloaded.vae, FrozenVAE) and reloaded.max_tokens == 8


def test_export_with_a_vae_loaded_from_a_path_does_not_need_that_path(tmp_path):
    import shutil

    torch.manual_seed(6)
    save_pretrained(_tiny_vae().eval(), tmp_path / "vae")
    config = _flextok_config()
    config["encoder"].update(image_size=8, patch_size=2, in_channels=4)
    config["decoder"].update(image_size=8, patch_size=2, in_channels=4)
    config["vae"] = {"_target_": "tokenmill.tokenizers.FrozenVAE", "pretrained_path": str(tmp_path / "vae")}
    model = build_model(config).eval()
    _randomise_zero_inits(model)
    save_pretrained(model, tmp_path / "flextok")
    shutil.rmtree(tmp_path / "vae")  # the export must be self-contained
    saved = json.loads((tmp_path / "flextok" / "config.json").read_text())["model"]["vae"]
    assert saved["pretrained_path"] is None and saved["autoencoder"]["quantizer"]["dim"] == 4
    reloaded = from_pretrained(tmp_path / "flextok").eval()
    images = _images()
    assert torch.equal(model.reconstruct(images, num_tokens=2, seed=1), reloaded.reconstruct(images, num_tokens=2, seed=1))
