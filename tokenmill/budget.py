"""The token budget: how many of a model's ordered tokens are kept, written once for every method.

FlexTok's nested dropout, One-D-Piece's tail-token drop, MQT's random first-m queries and M3's
nested pooling scales are one idea: train with a random prefix length k of an ordered token
sequence so that any prefix is usable at inference. `TokenBudget` draws k and applies it.

Draws are identical on every rank and reproducible on resume without any collective: the k's
of a training call come from a generator seeded with (seed, number of earlier draws), and that
counter is a buffer saved with the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

DISTRIBUTIONS = ("uniform", "pow2", "list")


def powers_of_two_up_to(max_tokens: int) -> list[int]:
    """[1, 2, 4, ..., max_tokens], with max_tokens appended when it is not a power of two."""
    values = [1 << i for i in range(max_tokens.bit_length()) if (1 << i) <= max_tokens]
    return values if values[-1] == max_tokens else [*values, max_tokens]


def keep_mask(keep: Tensor, num_tokens: int) -> Tensor:
    """keep [B] (tokens kept per sample) -> bool [B, num_tokens], True for the first keep[b]."""
    return torch.arange(num_tokens, device=keep.device)[None, :] < keep[:, None]


class TokenBudget(nn.Module):
    """Keep the first k of `max_tokens` ordered tokens; replace the rest by a learned mask token.

    Args:
        max_tokens: K, the length of the token sequence.
        dim: channel width of the tokens the mask token replaces (e.g. the quantizer's dim).
        distribution: how training draws k:
            "uniform" - k uniform in [min_tokens, max_tokens] (FlexTok's nested dropout);
            "pow2"    - k uniform over the powers of two in range (and max_tokens);
            "list"    - k uniform over `values`.
        values: the k's for "list".
        min_tokens: smallest k drawn ("uniform" / "pow2").
        per_sample: one k per sample (FlexTok) or one k for the whole batch (MQT-style).
        keep_all_prob: probability that a training call keeps all tokens (no drop).
        seed: seeds the draws; with the saved draw counter it makes them rank- and resume-exact.
        mask_token: learn a mask token for `apply`. Users that only draw k (MQT truncates its
            queries) turn it off so no parameter goes unused.
    """

    def __init__(
        self,
        max_tokens: int,
        dim: int,
        distribution: str = "uniform",
        values: list[int] | None = None,
        min_tokens: int = 1,
        per_sample: bool = True,
        keep_all_prob: float = 0.0,
        seed: int = 0,
        mask_token: bool = True,
    ):
        super().__init__()
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"TokenBudget: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if not 1 <= min_tokens <= max_tokens:
            raise ValueError(f"TokenBudget: need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
        if distribution == "list":
            if not values or any(not 1 <= v <= max_tokens for v in values):
                raise ValueError(f"TokenBudget: 'list' needs values in 1..{max_tokens}, got {values}")
        self.max_tokens = max_tokens
        self.dim = dim
        self.distribution = distribution
        self.min_tokens = min_tokens
        self.per_sample = per_sample
        self.keep_all_prob = keep_all_prob
        self.seed = seed
        if distribution == "uniform":
            support = list(range(min_tokens, max_tokens + 1))
        elif distribution == "pow2":
            support = [v for v in powers_of_two_up_to(max_tokens) if v >= min_tokens]
        else:
            support = sorted(set(values))
        self.register_buffer("support", torch.tensor(support, dtype=torch.long), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(dim)) if mask_token else None
        self.register_buffer("num_draws", torch.zeros((), dtype=torch.long))

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} if self.mask_token is not None else set()

    def eval_budgets(self) -> list[int]:
        """The k's an evaluation sweeps: powers of two up to max_tokens (and max_tokens)."""
        return powers_of_two_up_to(self.max_tokens)

    def sample(self, batch_size: int) -> Tensor:
        """Draw k for a training call: int64 [batch_size] on the CPU, same on every rank."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.num_draws))
        self.num_draws += 1
        n = batch_size if self.per_sample else 1
        keep = self.support.cpu()[torch.randint(len(self.support), (n,), generator=generator)]
        if self.keep_all_prob > 0:
            keep_all = torch.rand(n, generator=generator) < self.keep_all_prob
            keep = torch.where(keep_all, torch.full_like(keep, self.max_tokens), keep)
        return keep.expand(batch_size) if not self.per_sample else keep

    def apply(self, tokens: Tensor, keep: Tensor | int) -> Tensor:
        """tokens [B, K, dim] -> the same with positions >= keep[b] replaced by the mask token."""
        if self.mask_token is None:
            raise RuntimeError("TokenBudget(mask_token=False) only draws k; it cannot mask tokens")
        b, k, d = tokens.shape
        if k != self.max_tokens or d != self.dim:
            raise ValueError(f"TokenBudget expects tokens [B, {self.max_tokens}, {self.dim}], got {tuple(tokens.shape)}")
        if isinstance(keep, int):
            if not 1 <= keep <= self.max_tokens:
                raise ValueError(f"num_tokens must be in 1..{self.max_tokens}, got {keep}")
            keep = torch.full((b,), keep, dtype=torch.long)
        mask = keep_mask(keep.to(tokens.device), k)[..., None]
        return torch.where(mask, tokens, self.mask_token.to(tokens.dtype))

    def forward(self, tokens: Tensor, num_tokens: int | None = None) -> Tensor:
        """Training: drop a random tail per the distribution. Otherwise keep `num_tokens` (all if None)."""
        if num_tokens is not None:
            return self.apply(tokens, num_tokens)
        if self.training:
            return self.apply(tokens, self.sample(tokens.shape[0]))
        return tokens

    def extra_repr(self) -> str:
        return (
            f"max_tokens={self.max_tokens}, dim={self.dim}, distribution={self.distribution!r}, "
            f"per_sample={self.per_sample}, seed={self.seed}"
        )
