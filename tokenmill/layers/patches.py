"""Patchify / unpatchify images for ViT encoders and pixel-predicting decoders."""

from __future__ import annotations

from torch import Tensor


def check_image_size(image_size: int, patch_size: int) -> int:
    """Returns the patch-grid side; refuses sizes that do not tile."""
    if image_size % patch_size != 0:
        raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
    return image_size // patch_size


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], the inverse of `unpatchify` (same layout)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    x = x.permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)


def unpatchify(patches: Tensor, grid: int, patch_size: int, channels: int) -> Tensor:
    """[B, grid*grid, p*p*C] -> [B, C, grid*p, grid*p]."""
    b = patches.shape[0]
    x = patches.view(b, grid, grid, patch_size, patch_size, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, grid * patch_size, grid * patch_size)
