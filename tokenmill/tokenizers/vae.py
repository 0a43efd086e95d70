"""Continuous latent spaces: a KL (Gaussian) bottleneck to train a VAE, and a frozen VAE wrapper.

FlexTok works in the latent space of a VAE (16 channels, 8x downsampling) rather than on pixels.
tokenmill's own VAE is an `Autoencoder` like any tokenizer: ConvEncoder2D emitting 2C channels
(mean and log-variance) -> `GaussianBottleneck` -> ConvDecoder2D (see conf/experiment/kl_vae_f8c16.yaml).
`FrozenVAE` then serves such an export to another tokenizer as a fixed pre/post-processor.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from tokenmill.quantizers.base import QuantizerOutput

log = logging.getLogger(__name__)


class GaussianBottleneck(nn.Module):
    """z [B, N, 2C] = (mean, log-variance) -> codes [B, N, C]: a sample in training, the mean in eval.

    losses: {"kl": kl_weight * KL(N(mean, var) || N(0, I))}, summed over channels and averaged
    over tokens and batch. No indices (a continuous bottleneck).
    """

    def __init__(self, dim: int, kl_weight: float = 1e-6, logvar_range: tuple[float, float] = (-30.0, 20.0)):
        super().__init__()
        self.dim = dim
        self.kl_weight = kl_weight
        self.logvar_range = tuple(logvar_range)

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.dim() != 3 or z.shape[-1] != 2 * self.dim:
            raise ValueError(f"GaussianBottleneck expects [B, N, {2 * self.dim}] (mean, log-variance), got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            mean, logvar = z.float().chunk(2, dim=-1)
            logvar = logvar.clamp(*self.logvar_range)
            codes = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training else mean
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()
        metrics = {"latent_std": mean.detach().std(), "posterior_logvar": logvar.detach().mean()}
        return QuantizerOutput(codes.to(z.dtype), None, {"kl": self.kl_weight * kl}, metrics)


class FrozenVAE(nn.Module):
    """A frozen latent space for another tokenizer: images <-> latents [B, C, h, w].

    Give either `pretrained_path` (a tokenmill export of a Gaussian-bottleneck Autoencoder,
    loaded strictly with from_pretrained) or `autoencoder` (a module built from config: random
    weights, which only makes sense for tests and smoke runs; a warning says so). Latents are the
    posterior means times `scaling_factor` (pick it so latents have unit variance).
    """

    def __init__(self, autoencoder: nn.Module | None = None, pretrained_path: str | None = None, scaling_factor: float = 1.0):
        super().__init__()
        if pretrained_path:
            from tokenmill.export import from_pretrained

            autoencoder = from_pretrained(pretrained_path)
        elif autoencoder is None:
            raise ValueError("FrozenVAE needs `pretrained_path` (an exported VAE) or an `autoencoder` config")
        else:
            log.warning("FrozenVAE without pretrained_path: the latent space is a randomly initialised VAE")
        if not isinstance(getattr(autoencoder, "quantizer", None), GaussianBottleneck):
            raise ValueError(f"FrozenVAE needs an Autoencoder with a GaussianBottleneck, got {type(autoencoder).__name__}")
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.scaling_factor = scaling_factor
        self.latent_channels = autoencoder.quantizer.dim

    def portable_config(self, node: dict) -> dict:
        """For an export: rebuild this VAE from its architecture, not from `pretrained_path`
        (its weights are saved with the model that contains it)."""
        if not node.get("pretrained_path"):
            return node  # built from its architecture config already
        from tokenmill.export.pretrained import model_config

        return {**node, "pretrained_path": None, "autoencoder": model_config(self.autoencoder)}

    def train(self, mode: bool = True) -> FrozenVAE:
        return super().train(False)  # frozen: always eval

    def _grid(self, tokens: Tensor) -> int:
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"VAE latents must form a square grid, got {tokens.shape[1]} tokens")
        return side

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        tokens = self.autoencoder.encode(images).codes  # the posterior mean in eval mode
        side = self._grid(tokens)
        return tokens.transpose(1, 2).reshape(len(images), self.latent_channels, side, side) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        tokens = (latents / self.scaling_factor).flatten(2).transpose(1, 2)
        return self.autoencoder.decode(tokens)
