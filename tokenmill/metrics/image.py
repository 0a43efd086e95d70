"""Image reconstruction quality: PSNR and SSIM, one-shot and streaming.

Images are expected in [-1, 1], hence ``data_range=2.0``. Values are not clamped
here; clamp decoder outputs to the data range first if they can overshoot, as
standard evaluation protocols do.

Both metrics are averaged per image (PSNR of each image, then the mean), which
differs from the PSNR of the batch-pooled MSE when images have different errors.
Identical images give PSNR = +inf (MSE of zero, no epsilon added), and any
average that includes such an image is +inf too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _check_images(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(pred.shape)}")


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB of each image, [B]: 10 * log10(data_range**2 / MSE)."""
    _check_images(pred, target)
    return peak_signal_noise_ratio(
        pred.float(), target.float(), data_range=data_range, reduction="none", dim=(1, 2, 3)
    )


def ssim_per_image(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """SSIM of each image, [B], with the standard 11x11 gaussian window (sigma 1.5)."""
    _check_images(pred, target)
    return structural_similarity_index_measure(
        pred.float(), target.float(), data_range=data_range, reduction="none"
    )


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean over the batch of per-image PSNR (dB); +inf if any image is reproduced exactly."""
    return psnr_per_image(pred, target, data_range).mean()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean over the batch of per-image SSIM (1.0 for identical images)."""
    return ssim_per_image(pred, target, data_range).mean()


class ImageQualityMeter(nn.Module):
    """Streaming per-image mean of PSNR and SSIM, reducible across DDP ranks.

    State is one buffer ``[psnr_sum, ssim_sum, count]`` (float64, non-persistent so it
    stays out of checkpoints); being a module buffer it follows ``.to(device)``, which
    the NCCL all-reduce in :meth:`compute` needs.
    """

    def __init__(self, data_range: float = 2.0) -> None:
        super().__init__()
        self.data_range = data_range
        self.register_buffer("totals", torch.zeros(3, dtype=torch.float64), persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep the sums float64 when a "16-true" precision plugin casts the whole model;
        # only the device move applies.
        totals = self.totals
        super()._apply(fn, recurse)
        self.totals = totals.to(device=self.totals.device)
        return self

    def reset(self) -> None:
        self.totals.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        psnr_values = psnr_per_image(pred, target, self.data_range)
        ssim_values = ssim_per_image(pred, target, self.data_range)
        batch = torch.stack(
            [
                psnr_values.double().sum(),
                ssim_values.double().sum(),
                psnr_values.new_tensor(len(psnr_values)).double(),
            ]
        )
        self.totals += batch.to(self.totals.device)

    def compute(self) -> dict[str, float]:
        # Reduce a copy so calling compute() twice does not double-count.
        totals = self.totals.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        psnr_sum, ssim_sum, count = totals.tolist()
        if count == 0:
            raise RuntimeError("ImageQualityMeter.compute() called before any update() (0 images seen)")
        return {"psnr": psnr_sum / count, "ssim": ssim_sum / count}
