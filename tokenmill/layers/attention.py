"""Multi-head attention on top of `F.scaled_dot_product_attention`, with flash-attn as an option.

SDPA runs everywhere (CPU included) and already dispatches to fused kernels on GPU; flash-attn is
used only when it is installed, requested, and the call is one it supports (CUDA, fp16/bf16, no
explicit mask).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_VALID_BACKENDS = ("auto", "sdpa", "flash")
_backend = os.environ.get("TOKENMILL_ATTENTION", "auto")


def set_attention_backend(name: str) -> None:
    """Choose "sdpa", "flash" (flash-attn, fails if missing) or "auto" (flash when usable)."""
    global _backend
    if name not in _VALID_BACKENDS:
        raise ValueError(f"attention backend must be one of {_VALID_BACKENDS}, got {name!r}")
    if name == "flash" and not flash_attn_available():
        raise ImportError("attention backend 'flash' needs flash-attn: pip install 'tokenmill[gpu]'")
    _backend = name


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flash_usable(q: Tensor, attn_mask: Tensor | None) -> bool:
    return (
        _backend != "sdpa"
        and attn_mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and flash_attn_available()
    )


def attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
    dropout_p: float = 0.0,
) -> Tensor:
    """q, k, v: [B, heads, N, head_dim] -> [B, heads, N, head_dim]."""
    if _flash_usable(q, attn_mask):
        from flash_attn import flash_attn_func  # optional GPU extra

        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, causal=is_causal
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p
    )


class MultiHeadAttention(nn.Module):
    """Self-attention (or cross-attention when `context` is given) with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # qk-norm keeps attention logits bounded in low precision at large widths.
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries [B, Lq, dim] attend to keys/values [B, Lk, dim]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        b, n, d = query.shape
        out = attention(self._heads(self.q(query)), self._heads(self.k(key)), self._heads(self.v(value)))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))
