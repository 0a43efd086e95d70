"""A tokenizer composed from config: [frozen VAE] -> encoder -> quantizer -> [budget] -> decoder.

A paper's model is a YAML file choosing these parts (see conf/model/), not a class of its own:
TiTok is ViT encoder + VQ + ViT decoder; One-D-Piece adds a token budget; FlexTok adds a frozen
VAE, FSQ, a budget and a rectified-flow decoder. The quantizer may be null for a continuous
bottleneck.

Decoders come in two kinds:
* deterministic: `decoder(codes) -> images`, trained by the task's reconstruction losses;
* generative (`GenerativeDecoder`, e.g. the rectified-flow decoder): in training they return
  their own losses from `decoder.loss(codes, target, images)` instead of a reconstruction, and
  `decoder(codes, seed=...)` samples. `seed` makes sampling reproducible.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from tokenmill.budget import TokenBudget
from tokenmill.export.pretrained import PretrainedMixin
from tokenmill.quantizers.base import QuantizerOutput


class GenerativeDecoder(nn.Module):
    """A decoder that learns a distribution: `loss()` for training, `forward()` samples."""

    def loss(self, codes: Tensor, target: Tensor, images: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(weighted losses, metrics) for codes [B, K, D] and the target it should generate
        (pixels, or VAE latents when the tokenizer has a VAE); `images` are the pixels."""
        raise NotImplementedError

    def forward(self, codes: Tensor, seed: int | None = None) -> Tensor:
        raise NotImplementedError


class AutoencoderOutput(NamedTuple):
    reconstruction: Tensor | None  # None in training with a generative decoder
    codes: Tensor
    indices: Tensor | None
    losses: dict[str, Tensor]  # the quantizer's
    metrics: dict[str, Tensor]
    decoder_losses: dict[str, Tensor] = {}  # a generative decoder's (already weighted)


class Autoencoder(PretrainedMixin, nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        quantizer: nn.Module | None = None,
        budget: TokenBudget | None = None,
        vae: nn.Module | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.quantizer = quantizer
        self.budget = budget
        self.decoder = decoder
        self.vae = vae
        if vae is not None:  # a fixed latent space: never trained, never in train mode
            vae.requires_grad_(False)
        if budget is not None and budget.max_tokens != self.max_tokens:
            raise ValueError(f"budget.max_tokens={budget.max_tokens} but the encoder emits {self.max_tokens} tokens")

    def train(self, mode: bool = True) -> Autoencoder:
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    # -- properties the evaluation and export code rely on --------------------------------

    @property
    def codebook_size(self) -> int | None:
        return getattr(self.quantizer, "codebook_size", None)

    @property
    def max_tokens(self) -> int:
        return self.encoder.num_latent_tokens

    @property
    def bits_per_token(self) -> float | None:
        """Bits to store one token's index (None for a continuous bottleneck)."""
        return getattr(self.quantizer, "bits_per_token", None)

    @property
    def is_generative(self) -> bool:
        return isinstance(self.decoder, GenerativeDecoder)

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.last_layer

    # -- pipeline -------------------------------------------------------------------------

    def to_latents(self, images: Tensor) -> Tensor:
        """What the encoder sees and a generative decoder generates: VAE latents or pixels."""
        if self.vae is None:
            return images
        with torch.no_grad():
            return self.vae.encode(images)

    def quantize(self, latents: Tensor) -> QuantizerOutput:
        if self.quantizer is None:
            return QuantizerOutput(latents, None, {}, {})
        return self.quantizer(latents)

    def encode(self, images: Tensor) -> QuantizerOutput:
        """images [B, C, H, W] in [-1, 1] -> quantizer output (codes [B, K, D], indices [B, K])."""
        return self.quantize(self.encoder(self.to_latents(images)))

    def apply_budget(self, codes: Tensor, num_tokens: int | None) -> Tensor:
        """Training: the budget's random tail drop. Otherwise keep the first `num_tokens`."""
        if self.budget is not None:
            return self.budget(codes, num_tokens)
        if num_tokens is not None and num_tokens != self.max_tokens:
            raise ValueError(f"this tokenizer has no token budget: it decodes all {self.max_tokens} tokens only")
        return codes

    def _decode(self, codes: Tensor, seed: int | None) -> Tensor:
        out = self.decoder(codes, seed=seed) if self.is_generative else self.decoder(codes)
        return self.vae.decode(out) if self.vae is not None else out

    def decode(self, codes: Tensor, num_tokens: int | None = None, seed: int | None = None) -> Tensor:
        """codes [B, K, D] -> images, from the first `num_tokens` tokens (all if None)."""
        return self._decode(self.apply_budget(codes, num_tokens), seed)

    def decode_indices(self, indices: Tensor, num_tokens: int | None = None, seed: int | None = None) -> Tensor:
        if self.quantizer is None:
            raise ValueError("this tokenizer has no quantizer, so it has no indices to decode")
        return self.decode(self.quantizer.indices_to_codes(indices), num_tokens=num_tokens, seed=seed)

    def forward(self, images: Tensor, num_tokens: int | None = None, seed: int | None = None) -> AutoencoderOutput:
        q = self.encode(images)
        codes = self.apply_budget(q.codes, num_tokens)
        if self.training and self.is_generative:
            losses, metrics = self.decoder.loss(codes, self.to_latents(images), images)
            return AutoencoderOutput(None, q.codes, q.indices, q.losses, {**q.metrics, **metrics}, losses)
        return AutoencoderOutput(self._decode(codes, seed), q.codes, q.indices, q.losses, q.metrics)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, num_tokens: int | None = None, seed: int | None = None) -> Tensor:
        return self.forward(images, num_tokens=num_tokens, seed=seed).reconstruction
