"""Image grids with Pillow (no torchvision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(rows: list[Tensor], path: str | Path, padding: int = 2) -> Path:
    """Each entry of `rows` is a batch [B, C, H, W]; row r, column b shows rows[r][b]."""
    arrays = [to_uint8(r) for r in rows]
    n_rows, n_cols = len(arrays), max(len(a) for a in arrays)
    h, w = arrays[0].shape[1:3]
    canvas = np.full((n_rows * (h + padding) + padding, n_cols * (w + padding) + padding, 3), 255, np.uint8)
    for r, batch in enumerate(arrays):
        for c, image in enumerate(batch):
            y, x = padding + r * (h + padding), padding + c * (w + padding)
            canvas[y : y + h, x : x + w] = image[..., :3] if image.shape[-1] >= 3 else image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
