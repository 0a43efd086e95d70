"""Evaluation metrics: image reconstruction quality and codebook utilisation."""

from tokenmill.metrics.codebook import CodebookUsage
from tokenmill.metrics.image import ImageQualityMeter, psnr, psnr_per_image, ssim, ssim_per_image

__all__ = ["CodebookUsage", "ImageQualityMeter", "psnr", "psnr_per_image", "ssim", "ssim_per_image"]
