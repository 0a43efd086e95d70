"""Matryoshka Multimodal Models (M3, Cai et al., 2024): nested average pooling of the patch grid.

M3 represents an image at several coarse-to-fine scales by 2D average pooling of the vision
features (CLIP-L/14 at 336: 24x24 = 576 -> 12x12 = 144 -> 6x6 = 36 -> 3x3 = 9 -> 1x1 = 1) and
trains the language model on all scales, averaging the loss. The pooling has no parameters
(`out_dim = in_dim`; the projector follows). When each scale's side divides the grid side, the
pools are exact block means and are nested: pooling the 144-token scale to 36 gives the 36-token
scale. `adaptive_avg_pool2d` computes exactly M3's stride-s average pooling for such sizes, and
`pool_to_tokens` refuses sizes where it would not (uneven, overlapping windows).

`pool_to_tokens` is the one pooling implementation; the `AveragePooling` baseline uses it too.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from tokenmill.budget import TokenBudget
from tokenmill.compressors.base import Compressor, CompressorOutput, VisionFeatures


def pooled_grid(num_tokens: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The (s, s) grid of a square pooling scale, or `grid` itself for num_tokens = h*w.

    Refuses scales that are not perfect squares or whose side does not divide both grid sides.
    """
    h, w = grid
    if num_tokens == h * w:
        return (h, w)
    side = math.isqrt(num_tokens) if num_tokens >= 1 else 0
    if side < 1 or side * side != num_tokens:
        raise ValueError(f"pooling scale {num_tokens} is not a perfect square (s*s tokens for an s x s grid)")
    if h % side or w % side:
        raise ValueError(
            f"pooling scale {num_tokens} ({side}x{side}) does not divide the {h}x{w} patch grid; "
            f"use scales whose side divides {math.gcd(h, w)}"
        )
    return (side, side)


def poolable_scales(grid: tuple[int, int]) -> list[int]:
    """Every token count `pool_to_tokens` accepts on `grid`, ascending."""
    g = math.gcd(*grid)
    return sorted({s * s for s in range(1, g + 1) if g % s == 0} | {grid[0] * grid[1]})


def pool_to_tokens(patches: Tensor, grid: tuple[int, int], num_tokens: int) -> Tensor:
    """[B, h*w, D] row-major -> [B, num_tokens, D] row-major block means (2D average pooling)."""
    b, n, d = patches.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"features have {n} patches but grid {grid} has {h * w}")
    out_grid = pooled_grid(num_tokens, grid)
    if out_grid == (h, w):
        return patches
    x = patches.transpose(1, 2).reshape(b, d, h, w)
    return F.adaptive_avg_pool2d(x, out_grid).flatten(2).transpose(1, 2)


class MatryoshkaPooling(Compressor):
    """M3: nested 2D average pooling to each of `scales` tokens.

    Args:
        in_dim: feature width (also the output width).
        grid: (h, w) patch grid (24x24 for CLIP-L/14 at 336).
        scales: token counts, perfect squares whose side divides the grid (M3: 576, 144, 36, 9, 1).
        mode: "all" - every training step uses every scale, the task averaging the losses (M3);
              "sample" - one scale per step, drawn uniformly (seeded, same on every rank,
              resume-exact through `TokenBudget`).
        seed: seeds the "sample" draws.
    """

    def __init__(
        self,
        in_dim: int,
        grid: tuple[int, int] = (24, 24),
        scales: list[int] | tuple[int, ...] = (576, 144, 36, 9, 1),
        mode: str = "all",
        seed: int = 0,
    ):
        super().__init__()
        if mode not in ("all", "sample"):
            raise ValueError(f"MatryoshkaPooling: mode must be 'all' or 'sample', got {mode!r}")
        self.grid = (int(grid[0]), int(grid[1]))
        scales = sorted({int(s) for s in scales}, reverse=True)
        if not scales:
            raise ValueError("MatryoshkaPooling needs at least one scale")
        for s in scales:
            pooled_grid(s, self.grid)  # refuses bad scales with the reason
        self.in_dim = self.out_dim = in_dim
        self.scales = scales
        self.max_tokens = scales[0]
        self.mode = mode
        self.budget = (
            TokenBudget(self.max_tokens, in_dim, distribution="list", values=scales, per_sample=False,
                        seed=seed, mask_token=False)
            if mode == "sample" else None
        )

    @property
    def supported_num_tokens(self) -> list[int]:
        return sorted(self.scales)

    def training_budgets(self) -> list[int | None]:
        if self.budget is None:
            return list(self.scales)
        return [int(self.budget.sample(1)[0])]

    def compress(self, features: VisionFeatures, num_tokens: int) -> CompressorOutput:
        if tuple(features.grid) != self.grid:
            raise ValueError(f"MatryoshkaPooling was built for grid {self.grid}, features have {features.grid}")
        return CompressorOutput(pool_to_tokens(features.patches, self.grid, num_tokens))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, grid={self.grid}, scales={self.scales}, mode={self.mode!r}"
