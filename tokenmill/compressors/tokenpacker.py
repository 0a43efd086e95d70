"""TokenPacker (Li et al., 2024, "TokenPacker: Efficient visual projector for multimodal LLM").

Coarse-to-fine: the final patch features are downsampled by `scale_factor` (bilinear, as the
paper; or average pooling) into one coarse "point" query per s x s region (576 -> 144 tokens at
s = 2, 576 -> 36 at s = 4). Region-to-point injection: each point query cross-attends only to
the s*s fine features of its own region, taken from several encoder layers (multi-level) and
concatenated along the token axis, and the result is added to the query. The packed tokens then
go to the MLP projector (here `out_dim` may equal `in_dim` and the projector follows).

The locality is built into the shapes, not a mask: features are reshaped to
[B * regions, levels * s * s, D] and queries to [B * regions, 1, D], so attention costs
O(N * levels) and a region never sees another. Bilinear downsampling by an integer factor with
`align_corners=False` samples inside each region, so the query is local too.

Choices of ours: LayerNorm on the query and on the keys/values (one shared norm), a learned
level embedding and a learned within-region position embedding added to the keys so attention
can tell levels and sub-positions apart (concatenation along tokens loses both otherwise), and
a linear map to `out_dim` only when it differs from `in_dim`. Default levels: Hugging Face hidden
states 12, 16 and 22 of CLIP ViT-L/14 from `features.layers` plus `features.patches` (hidden
state 23, LLaVA's select_layer=-2): a spread of mid-to-late layers, our reading of the paper's
multi-level setting; check it against the release before reproducing numbers. The multi-scale
(high-resolution) variant is not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.compressors.base import Compressor, CompressorOutput, VisionFeatures
from tokenmill.layers.attention import CrossAttention


def to_regions(x: Tensor, grid: tuple[int, int], s: int) -> Tensor:
    """[B, h*w, D] row-major -> [B * (h/s) * (w/s), s*s, D], regions row-major, each region row-major."""
    b, _, d = x.shape
    h, w = grid
    x = x.reshape(b, h // s, s, w // s, s, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // s) * (w // s), s * s, d)


class TokenPacker(Compressor):
    """Region-to-point cross-attention from multi-level fine features into downsampled point queries.

    Args:
        in_dim: vision feature width (1024 for CLIP-L).
        out_dim: width of the emitted tokens (None: in_dim).
        grid: (h, w) patch grid (24x24 for CLIP-L/14 at 336).
        scale_factor: s; each s x s region becomes one token (2: 576 -> 144, 4: 576 -> 36).
        layers: encoder layers read from `features.layers` (the vision tower's `extra_layers`,
            Hugging Face numbering); `features.patches` is always the last level.
        num_heads: heads of the region-to-point attention.
        query_downsample: "bilinear" (the paper) or "avg".
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        grid: tuple[int, int] = (24, 24),
        scale_factor: int = 2,
        layers: list[int] | tuple[int, ...] = (12, 16, 22),
        num_heads: int = 8,
        query_downsample: str = "bilinear",
    ):
        super().__init__()
        h, w = self.grid = (int(grid[0]), int(grid[1]))
        s = int(scale_factor)
        if s < 1 or h % s or w % s:
            raise ValueError(f"TokenPacker: scale_factor={scale_factor} must divide the {h}x{w} grid")
        if query_downsample not in ("bilinear", "avg"):
            raise ValueError(f"TokenPacker: query_downsample must be 'bilinear' or 'avg', got {query_downsample!r}")
        self.in_dim, self.out_dim = in_dim, out_dim or in_dim
        self.scale_factor = s
        self.layers = [int(i) for i in layers]
        self.num_levels = len(self.layers) + 1
        self.query_downsample = query_downsample
        self.max_tokens = (h // s) * (w // s)
        self.ln_q = nn.LayerNorm(in_dim)
        self.ln_kv = nn.LayerNorm(in_dim)
        self.level_embed = nn.Parameter(torch.zeros(self.num_levels, in_dim))
        self.region_pos = nn.Parameter(torch.zeros(s * s, in_dim))
        nn.init.trunc_normal_(self.level_embed, std=0.02)
        nn.init.trunc_normal_(self.region_pos, std=0.02)
        self.attn = CrossAttention(in_dim, num_heads)
        self.out = nn.Identity() if self.out_dim == in_dim else nn.Linear(in_dim, self.out_dim)

    def no_weight_decay(self) -> set[str]:
        return {"level_embed", "region_pos"}

    def levels(self, features: VisionFeatures) -> list[Tensor]:
        missing = [i for i in self.layers if i not in features.layers]
        if missing:
            raise ValueError(
                f"TokenPacker needs encoder layers {missing} in features.layers (have "
                f"{sorted(features.layers)}); build the vision tower with extra_layers={self.layers}"
            )
        levels = [features.layers[i] for i in self.layers] + [features.patches]
        for x in levels:
            if x.shape != features.patches.shape:
                raise ValueError(f"TokenPacker: every level must be {tuple(features.patches.shape)}, got {tuple(x.shape)}")
        return levels

    def point_queries(self, patches: Tensor) -> Tensor:
        """[B, h*w, D] -> [B * regions, 1, D]: one coarse query per region."""
        b, _, d = patches.shape
        (h, w), s = self.grid, self.scale_factor
        x = patches.transpose(1, 2).reshape(b, d, h, w)
        if self.query_downsample == "bilinear":
            x = F.interpolate(x, size=(h // s, w // s), mode="bilinear", align_corners=False)
        else:
            x = F.avg_pool2d(x, kernel_size=s)
        return x.flatten(2).transpose(1, 2).reshape(-1, 1, d)

    def compress(self, features: VisionFeatures, num_tokens: int) -> CompressorOutput:
        if tuple(features.grid) != self.grid:
            raise ValueError(f"TokenPacker was built for grid {self.grid}, features have {features.grid}")
        b, n, d = features.patches.shape
        if n != self.grid[0] * self.grid[1]:
            raise ValueError(f"TokenPacker: features have {n} patches but grid {self.grid} has {self.grid[0] * self.grid[1]}")
        s = self.scale_factor
        # [B*R, L*s*s, D]: the fine features of each region, level after level.
        kv = torch.cat([to_regions(x, self.grid, s) for x in self.levels(features)], dim=1)
        kv = self.ln_kv(kv)
        pos = (self.level_embed[:, None, :] + self.region_pos[None]).reshape(-1, d).to(kv.dtype)
        q = self.point_queries(features.patches)
        q = q + self.attn(self.ln_q(q), kv + pos, kv)
        return CompressorOutput(self.out(q.reshape(b, self.max_tokens, d)))

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, grid={self.grid}, "
            f"scale_factor={self.scale_factor}, layers={self.layers}"
        )
