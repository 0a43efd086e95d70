"""Behaviour of tokenmill.metrics: PSNR/SSIM, the streaming image meter, codebook usage."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenmill.metrics import CodebookUsage, ImageQualityMeter, psnr, ssim
from tokenmill.metrics.image import psnr_per_image, ssim_per_image


def _images(seed: int, batch: int = 3, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    pred = (target + 0.2 * torch.randn(target.shape, generator=generator)).clamp(-1, 1)
    return pred, target


# --- PSNR / SSIM ---------------------------------------------------------------------------


def test_psnr_of_identical_images_is_inf():
    _, target = _images(0)
    # Documented behaviour: MSE of zero gives +inf, no epsilon.
    assert psnr(target, target).item() == math.inf


def test_psnr_matches_known_mse():
    target = torch.zeros(2, 3, 8, 8)
    pred = torch.full_like(target, 0.1)
    pred[1] = 0.5  # per-image MSE 0.01 and 0.25
    expected = [10 * math.log10(2.0**2 / 0.01), 10 * math.log10(2.0**2 / 0.25)]
    torch.testing.assert_close(psnr_per_image(pred, target), torch.tensor(expected))
    # The batch value is the mean of per-image PSNRs, not the PSNR of the pooled MSE.
    assert psnr(pred, target).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert psnr(pred, target, data_range=1.0).item() == pytest.approx(
        sum(10 * math.log10(1.0 / m) for m in (0.01, 0.25)) / 2, rel=1e-6
    )


def test_ssim_identical_is_one_and_noise_lowers_it():
    pred, target = _images(1)
    assert ssim(target, target).item() == pytest.approx(1.0, abs=1e-6)
    per_image = ssim_per_image(pred, target)
    assert per_image.shape == (3,)
    assert (per_image < 0.99).all() and (per_image > -1).all()
    noisier = (target + 0.5 * torch.randn_like(target)).clamp(-1, 1)
    assert ssim(noisier, target).item() < ssim(pred, target).item()


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\) vs \(1, 3, 8, 9\)"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


# --- streaming meter ------------------------------------------------------------------------


def test_meter_matches_one_shot_over_concatenation():
    batches = [_images(seed, batch=b) for seed, b in ((2, 1), (3, 4), (4, 2))]
    meter = ImageQualityMeter()
    for pred, target in batches:
        meter.update(pred, target)
    all_pred = torch.cat([p for p, _ in batches])
    all_target = torch.cat([t for _, t in batches])
    result = meter.compute()
    assert result["psnr"] == pytest.approx(psnr(all_pred, all_target).item(), rel=1e-6)
    assert result["ssim"] == pytest.approx(ssim(all_pred, all_target).item(), rel=1e-6)
    # Per-image weighting: differs from the mean of the three per-batch values.
    per_batch_mean = sum(psnr(p, t).item() for p, t in batches) / 3
    assert result["psnr"] != pytest.approx(per_batch_mean, rel=1e-6)
    assert meter.compute() == result  # compute() does not consume the state


def test_meter_reset_and_empty_compute():
    meter = ImageQualityMeter()
    with pytest.raises(RuntimeError, match="before any update"):
        meter.compute()
    pred, target = _images(5)
    meter.update(pred, target)
    meter.reset()
    meter.update(target, target)
    assert meter.compute()["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert "totals" not in meter.state_dict()


def test_meter_sums_stay_float64_under_half_precision_cast():
    pred, target = _images(6)
    meter = ImageQualityMeter()
    meter.update(pred, target)
    meter.to(torch.bfloat16)  # as Lightning's "bf16-true" precision does to the whole task
    assert meter.totals.dtype == torch.float64
    assert meter.compute()["psnr"] == pytest.approx(psnr(pred, target).item(), rel=1e-6)


# --- codebook usage -------------------------------------------------------------------------


def test_codebook_uniform_over_k_codes():
    usage = CodebookUsage(codebook_size=16)
    usage.update(torch.arange(4).repeat(3).view(3, 4))  # codes 0..3, 3 times each, 2-D input
    result = usage.compute()
    assert result["usage"] == pytest.approx(4 / 16)
    assert result["perplexity"] == pytest.approx(4.0)
    assert result["entropy"] == pytest.approx(math.log(4))


def test_codebook_hand_made_histogram_streaming():
    usage = CodebookUsage(codebook_size=8)
    usage.update(torch.tensor([0, 0, 1]))
    usage.update(torch.tensor([[0], [2]]))  # totals: code 0 x3, code 1 x1, code 2 x1
    probs = torch.tensor([3 / 5, 1 / 5, 1 / 5], dtype=torch.float64)
    entropy = float(-(probs * probs.log()).sum())
    result = usage.compute()
    assert result["usage"] == pytest.approx(3 / 8)
    assert result["entropy"] == pytest.approx(entropy)
    assert result["perplexity"] == pytest.approx(math.exp(entropy))
    usage.reset()
    usage.update(torch.tensor([7]))
    assert usage.compute() == pytest.approx({"usage": 1 / 8, "perplexity": 1.0, "entropy": 0.0})


def test_codebook_rejects_out_of_range_and_float_indices():
    usage = CodebookUsage(codebook_size=8)
    with pytest.raises(ValueError, match="max 8.*codebook_size is 8"):
        usage.update(torch.tensor([1, 8]))
    with pytest.raises(ValueError, match="min -1"):
        usage.update(torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="float32"):
        usage.update(torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="before any update"):
        usage.compute()  # the rejected batches were not counted


# --- DDP reduction (gloo, 2 CPU processes) -------------------------------------------------


def _ddp_worker(rank: int, world_size: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        meter = ImageQualityMeter()
        pred, target = _images(10 + rank, batch=rank + 1)  # uneven: 1 image on rank 0, 2 on rank 1
        meter.update(pred, target)
        usage = CodebookUsage(codebook_size=8)
        usage.update(torch.tensor([rank, rank]))
        results[rank] = (meter.compute(), usage.compute())
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_meters_all_reduce_across_ranks(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2, join=True)

    pred = torch.cat([_images(10, batch=1)[0], _images(11, batch=2)[0]])
    target = torch.cat([_images(10, batch=1)[1], _images(11, batch=2)[1]])
    for rank in (0, 1):
        image_result, usage_result = results[rank]
        assert image_result["psnr"] == pytest.approx(psnr(pred, target).item(), rel=1e-6)
        assert image_result["ssim"] == pytest.approx(ssim(pred, target).item(), rel=1e-6)
        assert usage_result["usage"] == pytest.approx(2 / 8)
        assert usage_result["perplexity"] == pytest.approx(2.0)
