"""Training-free token-reduction baselines: no parameters, any budget they can express.

- `AveragePooling`: 2D average pooling of the patch grid to k = s*s tokens (M3's pooling at a
  single scale, without training the language model on it).
- `ClsAttentionTopK`: keep the k patches the class token attends to most (the [CLS]-attention
  importance used by LLaVA-PruMerge and VisionZip), in their spatial order.
- `DivPrune` (Alvar et al., CVPR 2025): keep a maximally diverse subset (greedy max-min
  diversity on cosine distance), in their spatial order.

Selections keep the original patch order so the language model sees tokens in raster order, as
it would without pruning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenmill.compressors.base import Compressor, CompressorOutput, VisionFeatures
from tokenmill.compressors.m3 import pool_to_tokens, poolable_scales


def gather_tokens(patches: Tensor, indices: Tensor) -> Tensor:
    """patches [B, N, D], indices [B, k] -> [B, k, D], the indices taken in ascending order."""
    indices = indices.sort(dim=1).values
    return patches.gather(1, indices[..., None].expand(-1, -1, patches.shape[-1]))


class AveragePooling(Compressor):
    """2D average pooling to k tokens; k a perfect square whose side divides the grid (or all patches)."""

    def __init__(self, in_dim: int, grid: tuple[int, int] = (24, 24)):
        super().__init__()
        self.in_dim = self.out_dim = in_dim
        self.grid = (int(grid[0]), int(grid[1]))
        self.max_tokens = self.grid[0] * self.grid[1]

    @property
    def supported_num_tokens(self) -> list[int]:
        return poolable_scales(self.grid)

    def compress(self, features: VisionFeatures, num_tokens: int) -> CompressorOutput:
        if tuple(features.grid) != self.grid:
            raise ValueError(f"AveragePooling was built for grid {self.grid}, features have {features.grid}")
        return CompressorOutput(pool_to_tokens(features.patches, self.grid, num_tokens))


class _SelectK(Compressor):
    """Keeps k of N patches; any k in 1..N."""

    def __init__(self, in_dim: int, num_patches: int = 576):
        super().__init__()
        self.in_dim = self.out_dim = in_dim
        self.max_tokens = num_patches

    @property
    def supported_num_tokens(self) -> list[int]:
        return list(range(1, self.max_tokens + 1))

    def check_patches(self, features: VisionFeatures) -> None:
        if features.patches.shape[1] != self.max_tokens:
            raise ValueError(
                f"{type(self).__name__} expects {self.max_tokens} patches, got {features.patches.shape[1]}"
            )


class ClsAttentionTopK(_SelectK):
    """The k patches with the largest class-token attention (`features.cls_attention`), in spatial order."""

    def compress(self, features: VisionFeatures, num_tokens: int) -> CompressorOutput:
        self.check_patches(features)
        if features.cls_attention is None:
            raise ValueError(
                "ClsAttentionTopK needs features.cls_attention: build the vision tower with "
                "with_cls_attention=True (a tower with a class token, e.g. CLIP)"
            )
        top = features.cls_attention.topk(num_tokens, dim=1).indices
        return CompressorOutput(gather_tokens(features.patches, top))


def max_min_diverse(x: Tensor, k: int) -> Tensor:
    """Greedy max-min diversity (DivPrune) on cosine distance: x [B, N, D] -> indices [B, k] (pick order).

    d(i, j) = 1 - cos(x_i, x_j). The first pick is the token farthest from its nearest other
    token, argmax_i min_{j != i} d(i, j). Each next pick is the unselected token whose minimum
    distance to the selected set is largest, argmax_{i not in S} min_{j in S} d(i, j). Ties go to
    the lowest index. Batched over B; the loop runs over the k picks.
    """
    b, n, _ = x.shape
    unit = F.normalize(x.float(), dim=-1)
    dist = 1.0 - unit @ unit.transpose(1, 2)  # [B, N, N]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    rows = torch.arange(b, device=x.device)
    picks = torch.empty(b, k, dtype=torch.long, device=x.device)
    if n == 1:
        return picks.zero_()
    first = dist.masked_fill(eye, float("inf")).amin(dim=2).argmax(dim=1)
    picks[:, 0] = first
    min_dist = dist[rows, first]  # [B, N]: distance to the selected set
    selected = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    selected[rows, first] = True
    for t in range(1, k):
        nxt = min_dist.masked_fill(selected, -float("inf")).argmax(dim=1)
        picks[:, t] = nxt
        selected[rows, nxt] = True
        min_dist = torch.minimum(min_dist, dist[rows, nxt])
    return picks


class DivPrune(_SelectK):
    """DivPrune: the k most mutually diverse patches (greedy max-min cosine distance), in spatial order."""

    def compress(self, features: VisionFeatures, num_tokens: int) -> CompressorOutput:
        self.check_patches(features)
        picks = max_min_diverse(features.patches.detach(), num_tokens)
        return CompressorOutput(gather_tokens(features.patches, picks))
