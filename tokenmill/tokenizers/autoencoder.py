"""A tokenizer composed from config: encoder -> quantizer -> decoder.

A paper's model is a YAML file choosing these three parts (see conf/model/), not a class of its
own. The quantizer may be null for a continuous bottleneck.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from tokenmill.export.pretrained import PretrainedMixin
from tokenmill.quantizers.base import QuantizerOutput


class AutoencoderOutput(NamedTuple):
    reconstruction: Tensor
    codes: Tensor
    indices: Tensor | None
    losses: dict[str, Tensor]
    metrics: dict[str, Tensor]


class Autoencoder(PretrainedMixin, nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, quantizer: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.quantizer = quantizer
        self.decoder = decoder

    @property
    def codebook_size(self) -> int | None:
        return getattr(self.quantizer, "codebook_size", None)

    def quantize(self, latents: Tensor) -> QuantizerOutput:
        if self.quantizer is None:
            return QuantizerOutput(latents, None, {}, {})
        return self.quantizer(latents)

    def encode(self, images: Tensor) -> QuantizerOutput:
        """images [B, C, H, W] in [-1, 1] -> quantizer output (codes [B, K, D], indices [B, K])."""
        return self.quantize(self.encoder(images))

    def decode(self, codes: Tensor) -> Tensor:
        return self.decoder(codes)

    def decode_indices(self, indices: Tensor) -> Tensor:
        if self.quantizer is None:
            raise ValueError("this tokenizer has no quantizer, so it has no indices to decode")
        return self.decoder(self.quantizer.indices_to_codes(indices))

    def forward(self, images: Tensor) -> AutoencoderOutput:
        q = self.encode(images)
        return AutoencoderOutput(self.decode(q.codes), q.codes, q.indices, q.losses, q.metrics)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        return self.forward(images).reconstruction

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.last_layer
