"""Matryoshka Query Transformer (MQT-LLaVA, Hu et al., 2024): any number of visual tokens from one model.

M learned latent queries cross-attend to the vision features. Training keeps only the first m
queries, with m drawn each step (one m per step, identical on every rank: `TokenBudget`), so the
first queries learn to carry the most information and any m in 1..M works at inference by
truncating the query list.

The layer follows the Qwen-VL resampler that MQT-LLaVA builds on: a kv projection when widths
differ, LayerNorm on queries and on keys/values, a fixed 2D sin-cos position added to the keys
(at the features' grid) and one added to the queries (2D sin-cos on a sqrt(M) x sqrt(M) grid
when M is a square, as Qwen-VL's 16x16 for 256 queries; 1D sin-cos otherwise), cross-attention,
a post LayerNorm and a bias-free output projection. Choices of ours:

- a residual around cross-attention (Perceiver / Q-Former style), so `depth` > 1 and optional
  query self-attention stack as ordinary pre-norm blocks; at depth 1 the only difference from
  Qwen-VL is the learned query added to the attention output before the post LayerNorm;
- `mlp_ratio=0` by default (the resampler has no feed-forward); > 0 adds a pre-norm MLP;
- optional query self-attention is causal: query i sees queries <= i only, so the first m
  outputs never depend on later queries and truncation stays exact (without self-attention
  each query is independent, which is also exact);
- features on a grid other than the configured one get the key table resized bicubically
  (Qwen-VL's `get_abs_pos`), keeping positions relative to the image extent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tokenmill.budget import TokenBudget
from tokenmill.compressors.base import Compressor, CompressorOutput, VisionFeatures
from tokenmill.compressors.posemb import resize_pos_embed, sincos_1d, sincos_2d
from tokenmill.layers.attention import CrossAttention, MultiHeadAttention
from tokenmill.layers.transformer import MLP

BUDGET_KEYS = ("distribution", "values", "min_tokens", "seed", "keep_all_prob")


class QueryLayer(nn.Module):
    """[causal query self-attention] -> cross-attention to the features -> [MLP], pre-norm residual."""

    def __init__(self, dim: int, num_heads: int, self_attention: bool = False, mlp_ratio: float = 0.0):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.self_attn = MultiHeadAttention(dim, num_heads) if self_attention else None
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim) if mlp_ratio > 0 else None
        self.mlp = MLP(dim, int(dim * mlp_ratio)) if mlp_ratio > 0 else None

    def forward(self, x: Tensor, kv: Tensor, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        if self.self_attn is not None:
            x = x + self.self_attn(self.norm_self(x), is_causal=True)
        kv = self.ln_kv(kv)
        x = x + self.cross_attn(self.ln_q(x) + query_pos, kv + key_pos, kv)
        if self.mlp is not None:
            x = x + self.mlp(self.norm_mlp(x))
        return x


def query_positions(num_queries: int, dim: int) -> Tensor:
    """Fixed query positions: 2D sin-cos on a square grid when num_queries is a square, else 1D."""
    side = math.isqrt(num_queries)
    if side * side == num_queries and dim % 4 == 0:
        return sincos_2d((side, side), dim)
    return sincos_1d(torch.arange(num_queries), dim)


class MatryoshkaQueryTransformer(Compressor):
    """MQT: M nested latent queries; the first m of them are the m visual tokens.

    Args:
        in_dim: width of the vision features (1024 for CLIP ViT-L/14).
        out_dim: query width, the width of the emitted tokens (the projector follows).
        num_queries: M, the most tokens (MQT-LLaVA: 256).
        num_heads: attention heads of the query layers.
        depth: query layers (MQT-LLaVA / Qwen-VL: 1).
        grid: (h, w) patch grid of the features the model is built for (CLIP-L/14 at 336: 24x24).
        budget: how training draws m, forwarded to `TokenBudget` (one draw per step, shared by
            all ranks, resume-exact): distribution "uniform" (default, m uniform in
            min_tokens..M) | "pow2" | "list" (with `values`), `min_tokens`, `seed`, `keep_all_prob`.
        query_self_attention: add causal self-attention among the queries in each layer.
        mlp_ratio: hidden-width ratio of a per-layer MLP; 0 (default) means none, as in Qwen-VL.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int,
        num_heads: int = 8,
        depth: int = 1,
        grid: tuple[int, int] = (24, 24),
        budget: dict | None = None,
        query_self_attention: bool = False,
        mlp_ratio: float = 0.0,
    ):
        super().__init__()
        if num_queries < 1 or depth < 1:
            raise ValueError(f"MQT needs num_queries >= 1 and depth >= 1, got {num_queries}, {depth}")
        if out_dim % 4 != 0:
            raise ValueError(f"MQT query width must be divisible by 4 (2D sin-cos positions), got {out_dim}")
        budget = dict(budget or {})
        unknown = set(budget) - set(BUDGET_KEYS)
        if unknown:
            raise ValueError(f"MQT budget: unknown keys {sorted(unknown)}; allowed: {list(BUDGET_KEYS)}")
        if budget.get("values") is not None:
            budget["values"] = [int(v) for v in budget["values"]]
        self.in_dim, self.out_dim, self.max_tokens = in_dim, out_dim, num_queries
        self.grid = (int(grid[0]), int(grid[1]))
        self.query_self_attention = query_self_attention
        self.query = nn.Parameter(torch.empty(num_queries, out_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)
        self.layers = nn.ModuleList(
            QueryLayer(out_dim, num_heads, query_self_attention, mlp_ratio) for _ in range(depth)
        )
        self.ln_post = nn.LayerNorm(out_dim)
        self.proj = nn.Linear(out_dim, out_dim, bias=False)
        self.register_buffer("query_pos", query_positions(num_queries, out_dim), persistent=False)
        self.register_buffer("key_pos", sincos_2d(self.grid, out_dim), persistent=False)
        self.budget = TokenBudget(num_queries, out_dim, per_sample=False, mask_token=False, **budget)

    @property
    def supported_num_tokens(self) -> list[int]:
        return list(range(1, self.max_tokens + 1))

    def training_budgets(self) -> list[int | None]:
        """One m per step, from the configured distribution; same on every rank and on resume."""
        return [int(self.budget.sample(1)[0])]

    def no_weight_decay(self) -> set[str]:
        return {"query"}

    def key_positions(self, grid: tuple[int, int]) -> Tensor:
        return resize_pos_embed(self.key_pos, self.grid, tuple(grid))

    def compress(self, features: VisionFeatures, num_tokens: int) -> CompressorOutput:
        x = features.patches
        b, n, _ = x.shape
        h, w = features.grid
        if n != h * w:
            raise ValueError(f"MQT: features have {n} patches but grid {features.grid} has {h * w}")
        kv = self.kv_proj(x)
        key_pos = self.key_positions(features.grid).to(kv.dtype)
        # Truncate before attention: the first m queries never see the others.
        q = self.query[:num_tokens].to(kv.dtype).expand(b, -1, -1)
        query_pos = self.query_pos[:num_tokens].to(kv.dtype)
        for layer in self.layers:
            q = layer(q, kv, query_pos, key_pos)
        return CompressorOutput(self.proj(self.ln_post(q)))

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_queries={self.max_tokens}, "
            f"grid={self.grid}, query_self_attention={self.query_self_attention}"
        )
