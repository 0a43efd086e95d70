"""Convolutional encoder and decoder for 2D-grid tokenizers (MAGVIT-v2 / Open-MAGVIT2 style).

The MAGVIT-v2 image tokenizer (Yu et al. 2024, "Language Model Beats Diffusion", Sec. 3.2 and
Appendix), as re-implemented by Open-MAGVIT2 (Luo et al. 2024), is a VQGAN-like ResNet without
attention:

    encoder  conv_in -> per level: `num_res_blocks` ResBlocks, then a stride-2 conv (not after
             the last level) -> `num_mid_blocks` ResBlocks -> GroupNorm, SiLU, 1x1 conv to
             `token_dim` channels.
    decoder  the mirror image: 3x3 conv_in from `token_dim` -> mid ResBlocks -> per level (from the
             deepest): [adaptive GroupNorm] -> ResBlocks -> x2 upsample (not after the shallowest)
             -> GroupNorm, SiLU, 3x3 conv to pixels.

`channel_multipliers` has one entry per level, so L levels downsample by 2^(L-1): Open-MAGVIT2's
[1, 1, 2, 2, 4] turns 256x256 images into 16x16 tokens.

Interface with the rest of tokenmill: the quantizers and `Autoencoder` work on token sequences
[B, N, D], so the encoder returns its latent grid flattened row-major, [B, h*w, token_dim], and
the decoder takes that sequence back, reshaping it to the (h, w) grid implied by `image_size` and
the downsampling factor. `num_latent_tokens` = h*w is exposed on both sides.

Adaptive group norm (decoder, `adaptive_norm=True`): MAGVIT-v2 conditions the decoder's group
norms on the quantized latent. As in Open-MAGVIT2, before each decoder level the features are
group-normalised without affine and then scaled / shifted per channel by linear maps of the
per-image spatial std / mean of the code grid. Unlike Open-MAGVIT2 the scale map starts at
weight 0, bias 1 and the shift map at 0, so a fresh decoder behaves exactly like a plain
GroupNorm and the conditioning is learned from there (a random initial scale only adds noise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

UPSAMPLE_MODES = ("depth_to_space", "nearest")


def _group_norm(channels: int, groups: int, affine: bool = True) -> nn.GroupNorm:
    if channels % groups != 0:
        raise ValueError(
            f"GroupNorm: {channels} channels are not divisible by norm_groups={groups}; pick "
            f"base_channels / channel_multipliers / norm_groups so every level's width divides"
        )
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=affine)


def latent_grid(image_size: int, channel_multipliers: Sequence[int]) -> tuple[int, int]:
    """(grid side, downsampling factor) for square images; refuses sizes that do not divide."""
    if len(channel_multipliers) < 1:
        raise ValueError("channel_multipliers needs at least one level")
    factor = 2 ** (len(channel_multipliers) - 1)
    if image_size % factor != 0:
        raise ValueError(
            f"image_size={image_size} is not divisible by the downsampling factor {factor} "
            f"({len(channel_multipliers)} levels in channel_multipliers={list(channel_multipliers)})"
        )
    return image_size // factor, factor


def _level_widths(base_channels: int, channel_multipliers: Sequence[int]) -> list[int]:
    return [base_channels * m for m in channel_multipliers]


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) x 2, 1x1 shortcut when the width
    changes. The convs have no bias: each is followed by a GroupNorm (or the residual sum of
    one that is), which would cancel it."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm1 = _group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


def _res_blocks(in_channels: int, out_channels: int, count: int, norm_groups: int) -> list[nn.Module]:
    """`count` ResBlocks, the first changing the width."""
    blocks = []
    for _ in range(count):
        blocks.append(ResBlock(in_channels, out_channels, norm_groups))
        in_channels = out_channels
    return blocks


def _check_upsample_mode(mode: str) -> None:
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")


class Upsample2x(nn.Module):
    """x2 spatial upsampling.

    "depth_to_space" (MAGVIT-v2): a 3x3 conv makes 4x the channels, pixel-shuffle spreads them
    over a 2x2 neighbourhood; every output pixel gets its own learned filter.
    "nearest" (VQGAN): nearest-neighbour repeat, then a 3x3 conv.
    """

    def __init__(self, channels: int, mode: str = "depth_to_space"):
        super().__init__()
        _check_upsample_mode(mode)
        self.mode = mode
        out = 4 * channels if mode == "depth_to_space" else channels
        self.conv = nn.Conv2d(channels, out, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "depth_to_space":
            return F.pixel_shuffle(self.conv(x), 2)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm whose per-channel scale and shift are linear in the code grid's per-image
    statistics (spatial std -> scale, spatial mean -> shift), as in the MAGVIT-v2 decoder.
    Initialised to a plain GroupNorm (scale 1, shift 0); see the module docstring."""

    def __init__(self, cond_channels: int, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = _group_norm(channels, norm_groups, affine=False)
        self.scale = nn.Linear(cond_channels, channels)
        self.shift = nn.Linear(cond_channels, channels)
        nn.init.zeros_(self.scale.weight)
        nn.init.ones_(self.scale.bias)
        nn.init.zeros_(self.shift.weight)
        nn.init.zeros_(self.shift.bias)

    def forward(self, x: Tensor, cond_std: Tensor, cond_mean: Tensor) -> Tensor:
        scale = self.scale(cond_std)[:, :, None, None]
        shift = self.shift(cond_mean)[:, :, None, None]
        return self.norm(x) * scale + shift


class ConvEncoder2D(nn.Module):
    """images [B, in_channels, H, W] in [-1, 1] -> tokens [B, h*w, token_dim] (row-major grid).

    Args:
        image_size: side of the (square) training images; must be divisible by 2^(L-1).
        in_channels: image channels.
        base_channels: width of the first level (Open-MAGVIT2's `ch`).
        channel_multipliers: one entry per level, width = base_channels * multiplier; L levels
            downsample by 2^(L-1) with stride-2 3x3 convs between levels.
        num_res_blocks: ResBlocks per level.
        num_mid_blocks: ResBlocks at the lowest resolution after the last level (null: the same
            as num_res_blocks, as in Open-MAGVIT2).
        token_dim: channels of each output token (= LFQ bits when the quantizer is LFQ).
        norm_groups: GroupNorm groups; every level's width must be divisible by it.
    """

    def __init__(
        self,
        image_size: int = 256,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        num_mid_blocks: int | None = None,
        token_dim: int = 18,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.image_size = image_size
        self.grid, self.downsample_factor = latent_grid(image_size, channel_multipliers)
        self.num_latent_tokens = self.grid**2
        self.token_dim = token_dim
        widths = _level_widths(base_channels, channel_multipliers)
        num_mid_blocks = num_res_blocks if num_mid_blocks is None else num_mid_blocks

        self.conv_in = nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1, bias=False)
        levels, width = [], base_channels
        for i, out_width in enumerate(widths):
            blocks = _res_blocks(width, out_width, num_res_blocks, norm_groups)
            width = out_width
            if i < len(widths) - 1:
                blocks.append(nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1))
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.ModuleList(levels)
        self.mid = nn.Sequential(*_res_blocks(width, width, num_mid_blocks, norm_groups))
        self.norm_out = _group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, token_dim, kernel_size=1)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"encoder was built for {self.image_size}x{self.image_size} images, got {tuple(images.shape[-2:])}"
            )
        x = self.conv_in(images)
        for level in self.levels:
            x = level(x)
        x = self.conv_out(F.silu(self.norm_out(self.mid(x))))
        return x.flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D], row-major


class _DecoderLevel(nn.Module):
    """[adaptive norm] -> ResBlocks -> [x2 upsample]; a module so the conditioning can be passed."""

    def __init__(
        self, blocks: list[nn.Module], adaptive: AdaptiveGroupNorm | None, upsample: nn.Module | None
    ):
        super().__init__()
        self.adaptive = adaptive
        self.blocks = nn.Sequential(*blocks)
        self.upsample = upsample if upsample is not None else nn.Identity()

    def forward(self, x: Tensor, cond_std: Tensor | None, cond_mean: Tensor | None) -> Tensor:
        if self.adaptive is not None:
            x = self.adaptive(x, cond_std, cond_mean)
        return self.upsample(self.blocks(x))


class ConvDecoder2D(nn.Module):
    """tokens [B, h*w, token_dim] (row-major grid) -> images [B, out_channels, H, W].

    Args mirror `ConvEncoder2D` (same `channel_multipliers` read from the deepest level up), plus:
        upsample: "depth_to_space" (MAGVIT-v2) or "nearest" (nearest repeat + conv, VQGAN).
        adaptive_norm: condition a GroupNorm before each level on the code grid's statistics
            (MAGVIT-v2 / Open-MAGVIT2); False gives a plain VQGAN-like decoder.
    """

    def __init__(
        self,
        image_size: int = 256,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        num_mid_blocks: int | None = None,
        token_dim: int = 18,
        norm_groups: int = 32,
        upsample: str = "depth_to_space",
        adaptive_norm: bool = True,
    ):
        super().__init__()
        _check_upsample_mode(upsample)
        self.image_size = image_size
        self.grid, self.downsample_factor = latent_grid(image_size, channel_multipliers)
        self.num_latent_tokens = self.grid**2
        self.token_dim = token_dim
        self.adaptive_norm = adaptive_norm
        widths = _level_widths(base_channels, channel_multipliers)
        num_mid_blocks = num_res_blocks if num_mid_blocks is None else num_mid_blocks

        width = widths[-1]
        self.conv_in = nn.Conv2d(token_dim, width, kernel_size=3, padding=1)
        self.mid = nn.Sequential(*_res_blocks(width, width, num_mid_blocks, norm_groups))
        levels = []
        for i in reversed(range(len(widths))):
            adaptive = AdaptiveGroupNorm(token_dim, width, norm_groups) if adaptive_norm else None
            blocks = _res_blocks(width, widths[i], num_res_blocks, norm_groups)
            width = widths[i]
            levels.append(_DecoderLevel(blocks, adaptive, Upsample2x(width, upsample) if i > 0 else None))
        self.levels = nn.ModuleList(levels)  # deepest level first, in the order they run
        self.norm_out = _group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels, kernel_size=3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """Weight the adversarial loss balances its gradient against (VQGAN's adaptive weight)."""
        return self.conv_out.weight

    def tokens_to_grid(self, tokens: Tensor) -> Tensor:
        """[B, h*w, D] -> [B, D, h, w], refusing sequences that are not this decoder's grid."""
        expected = (self.num_latent_tokens, self.token_dim)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(
                f"ConvDecoder2D expects tokens [B, {expected[0]}, {expected[1]}] (a {self.grid}x{self.grid} "
                f"grid: {self.image_size}px images downsampled x{self.downsample_factor}), got {tuple(tokens.shape)}"
            )
        b = tokens.shape[0]
        # contiguous(): a [B, N, D]-contiguous input would otherwise reach the convs as a
        # channels-last view, and oneDNN's channels-last kernels round differently, so decoding
        # the same codes would depend on how the caller laid them out in memory.
        return tokens.transpose(1, 2).reshape(b, self.token_dim, self.grid, self.grid).contiguous()

    def forward(self, tokens: Tensor) -> Tensor:
        z = self.tokens_to_grid(tokens)
        # Per-image statistics of the code grid condition the adaptive norms (biased variance, as
        # in MAGVIT-v2; eps keeps the sqrt differentiable where a channel is constant).
        cond_std = (z.var(dim=(2, 3), unbiased=False) + 1e-6).sqrt() if self.adaptive_norm else None
        cond_mean = z.mean(dim=(2, 3)) if self.adaptive_norm else None
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            x = level(x, cond_std, cond_mean)
        return self.conv_out(F.silu(self.norm_out(x)))
