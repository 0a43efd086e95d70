"""Training losses: pixel reconstruction, perceptual distance and adversarial terms."""

from tokenmill.losses.adversarial import (
    LeCamEMA,
    adaptive_generator_weight,
    hinge_d_loss,
    hinge_g_loss,
    vanilla_d_loss,
    vanilla_g_loss,
)
from tokenmill.losses.discriminator import PatchGANDiscriminator
from tokenmill.losses.perceptual import LPIPS, PerceptualLoss, RandomWeightsWarning, VGG16Features
from tokenmill.losses.reconstruction import reconstruction_loss

__all__ = [
    "LPIPS",
    "LeCamEMA",
    "PatchGANDiscriminator",
    "PerceptualLoss",
    "RandomWeightsWarning",
    "VGG16Features",
    "adaptive_generator_weight",
    "hinge_d_loss",
    "hinge_g_loss",
    "reconstruction_loss",
    "vanilla_d_loss",
    "vanilla_g_loss",
]
