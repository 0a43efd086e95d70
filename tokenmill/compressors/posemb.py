"""Fixed sin-cos positional embeddings for compressors that attend over a patch grid.

2D sin-cos (MAE / Qwen-VL resampler convention): half of the channels encode the row, half the
column, each as sin/cos at geometric frequencies. Rows are emitted row-major, the patch order of
`VisionFeatures.patches`, so `sincos_2d(grid, dim)[i]` is the position of patch i. Fixed (not
learned) embeddings cost no parameters and are defined at any grid; `resize_pos_embed` is the
Qwen-VL route for a table computed at another grid (bicubic interpolation of the table).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_1d(positions: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """positions [N] -> [N, dim]: [sin(p * w_i), cos(p * w_i)] with w_i = max_period^(-i / (dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    half = dim // 2
    omega = max_period ** (-torch.arange(half, dtype=torch.float64) / half)
    args = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([args.sin(), args.cos()], dim=-1).float()


def sincos_2d(grid: tuple[int, int], dim: int, max_period: float = 10000.0) -> Tensor:
    """(h, w) -> [h*w, dim], row-major; channels [:dim/2] encode the row, [dim/2:] the column."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)  # row-major: row index of patch i
    cols = torch.arange(w).repeat(h)
    return torch.cat([sincos_1d(rows, dim // 2, max_period), sincos_1d(cols, dim // 2, max_period)], dim=-1)


def resize_pos_embed(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """[h*w, D] table at `old_grid` -> [h'*w', D] at `new_grid` by bicubic interpolation (row-major)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    (h, w), (nh, nw) = old_grid, new_grid
    if pos.shape[0] != h * w:
        raise ValueError(f"positional table has {pos.shape[0]} rows, grid {old_grid} needs {h * w}")
    table = pos.float().T.reshape(1, -1, h, w)
    resized = F.interpolate(table, size=(nh, nw), mode="bicubic", align_corners=False)
    return resized.reshape(-1, nh * nw).T.to(pos.dtype)
