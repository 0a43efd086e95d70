"""Evaluation metrics: image reconstruction quality, codebook utilisation and rFID."""

from tokenmill.metrics.codebook import CodebookUsage
from tokenmill.metrics.fid import (
    InceptionFeatures,
    ReconstructionFID,
    fid_helper_weights_path,
    frechet_distance,
)
from tokenmill.metrics.image import ImageQualityMeter, psnr, psnr_per_image, ssim, ssim_per_image

__all__ = [
    "CodebookUsage",
    "ImageQualityMeter",
    "InceptionFeatures",
    "ReconstructionFID",
    "fid_helper_weights_path",
    "frechet_distance",
    "psnr",
    "psnr_per_image",
    "ssim",
    "ssim_per_image",
]
