"""N-layer PatchGAN discriminator (pix2pix / VQGAN style)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

NORM_KINDS = ("group", "batch", "none")
_LEAKY_SLOPE = 0.2
_MAX_CHANNEL_MULTIPLIER = 8


def _make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        # Largest group count <= 32 that divides the width, so small test widths work too.
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class PatchGANDiscriminator(nn.Module):
    """Fully convolutional discriminator producing a logit per image patch.

    Layout: ``num_layers`` stride-2 4x4 convs (the first without norm), one stride-1
    4x4 conv with norm, then a stride-1 4x4 conv to one channel. Widths double per
    layer from ``base_channels`` up to ``8 * base_channels``. For an HxW input the
    logit map is [B, 1, H / 2**num_layers - 2, W / 2**num_layers - 2].

    ``norm`` defaults to "group": BatchNorm statistics are computed per DDP rank (and
    differ between the real and fake batches the discriminator sees separately),
    which makes the discriminator's behaviour depend on the world size and batch
    composition. GroupNorm normalises each sample on its own.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        norm: str = "group",
    ) -> None:
        super().__init__()
        if norm not in NORM_KINDS:
            raise ValueError(f"unknown discriminator norm {norm!r}; expected one of {', '.join(NORM_KINDS)}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if in_channels < 1 or base_channels < 1:
            raise ValueError(
                f"in_channels and base_channels must be positive, got {in_channels} and {base_channels}"
            )
        # A bias right before an affine norm is redundant.
        use_bias = norm == "none"

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(_LEAKY_SLOPE),
        ]
        width = base_channels
        for n in range(1, num_layers + 1):
            next_width = base_channels * min(2**n, _MAX_CHANNEL_MULTIPLIER)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(width, next_width, kernel_size=4, stride=stride, padding=1, bias=use_bias),
                _make_norm(norm, next_width),
                nn.LeakyReLU(_LEAKY_SLOPE),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def _init_weights(module: nn.Module) -> None:
    # DCGAN initialisation, as used by pix2pix and VQGAN.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm | nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
