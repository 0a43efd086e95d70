"""Finite scalar quantization (Mentzer et al. 2023, "FSQ: VQ-VAE Made Simple").

Each latent channel is bounded to a small interval and rounded to one of `levels[i]` values; the
implicit codebook is the grid of all combinations (`prod(levels)` codes), and the index of a code
is the mixed-radix number of its per-channel level indices (channel 0 is the least significant
digit). FSQ has no codebook parameters and no auxiliary losses.

Arithmetic follows `vector_quantize_pytorch.FSQ` operation by operation, so codes and indices
are bitwise identical to it (see tests/test_fsq_residual.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tokenmill.quantizers.base import Quantizer, QuantizerOutput, histogram_metrics

# Codebooks larger than this get no usage/perplexity histogram (bincount would be too large).
MAX_HISTOGRAM_CODEBOOK = 2**20


def _check_levels(levels: object, preserve_symmetry: bool) -> list[int]:
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise ValueError(f"FSQ levels must be a non-empty list of ints >= 2, got {levels!r}")
    levels = list(levels)  # accepts tuples and Hydra ListConfig
    if not levels:
        raise ValueError("FSQ levels must be a non-empty list of ints >= 2, got []")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, int) or level < 2:
            raise ValueError(
                f"FSQ levels must be ints >= 2 (a level of 1 carries no information), got {levels}"
            )
    if 2 in levels and not preserve_symmetry:
        raise ValueError(
            f"FSQ level 2 needs preserve_symmetry=True (the tanh bound with the half-shift would only "
            f"produce the codes {{-1, 0}}), got levels {levels}"
        )
    return levels


class FSQ(Quantizer):
    """Finite scalar quantizer over a grid of `levels` values per channel.

    levels: number of values per channel, e.g. [8, 8, 8, 5, 5, 5] (FlexTok, 64000 codes).
    dim: latent width; defaults to len(levels). Otherwise a Linear `project_in` (dim -> len(levels))
        runs before quantization and a Linear `project_out` (len(levels) -> dim) after, both with
        bias, named as in vector-quantize-pytorch so its state dict loads.
    preserve_symmetry: use the symmetric quantizer of Zhang et al. 2024 (arXiv 2411.19842,
        section 3.2): codes are `L` evenly spaced values in [-1, 1] (used by ResidualFSQ). Default
        is the paper's FSQ: bound with tanh, shift even levels by half a step, round, and divide
        by the half-width `L // 2` (so codes lie in [-1, 1]; even levels reach -1 but not +1).
    hard_clamp: bound with clamp(-1, 1) instead of tanh (for inputs already soft-clamped, as in
        ResidualFSQ).
    eps: the bound's margin, (L - 1) * (1 + eps) / 2, which keeps tanh's extremes rounding inside.

    Straight-through: the forward value of `codes` is exactly the grid value (so
    `indices_to_codes` round-trips bitwise); the backward pass treats rounding as the identity,
    i.e. d codes / d bounded = 1 / half_width (the derivative of the normalised bounded value).
    """

    def __init__(
        self,
        levels: list[int],
        dim: int | None = None,
        preserve_symmetry: bool = False,
        hard_clamp: bool = False,
        eps: float = 1e-3,
    ):
        super().__init__()
        levels = _check_levels(levels, preserve_symmetry)
        self.levels = levels
        self.codebook_dim = len(levels)
        self.dim = self.codebook_dim if dim is None else int(dim)
        if self.dim < 1:
            raise ValueError(f"FSQ dim must be a positive int, got {dim!r}")
        self.codebook_size = math.prod(levels)
        self.preserve_symmetry = preserve_symmetry
        self.hard_clamp = hard_clamp
        self.eps = eps

        self.has_projections = self.dim != self.codebook_dim
        if self.has_projections:
            self.project_in: nn.Module = nn.Linear(self.dim, self.codebook_dim)
            self.project_out: nn.Module = nn.Linear(self.codebook_dim, self.dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()

        # Integer tables for the mixed-radix index, and the float constants of the bound. Each
        # float constant is computed with the same fp32 ops, in the same order, as the oracle.
        levels_t = torch.tensor(levels, dtype=torch.int64)
        basis = torch.ones(len(levels), dtype=torch.int64)
        basis[1:] = torch.cumprod(levels_t[:-1], dim=0)
        half_width = levels_t // 2
        half_l = (levels_t - 1) * (1 + eps) / 2
        offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
        ratio = offset / half_l
        shift = ratio if hard_clamp else torch.atanh(ratio)
        step = 2.0 / (levels_t - 1)  # grid spacing of the symmetric quantizer
        for name, value in [
            ("levels_t", levels_t),
            ("basis", basis),
            ("half_width", half_width),
            ("half_l", half_l),
            ("offset", offset),
            ("shift", shift),
            ("step", step),
        ]:
            self.register_buffer(name, value, persistent=False)

    def _squash(self, x: Tensor) -> Tensor:
        return x.clamp(-1.0, 1.0) if self.hard_clamp else torch.tanh(x)

    def bound_and_round(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [..., len(levels)] (fp32) -> (codes with straight-through grad, level indices int64)."""
        if self.preserve_symmetry:
            # Level index = floor((L - 1) * (squash(z) + 1) / 2 + 1/2), in 0..L-1.
            position = (self.levels_t - 1) * (self._squash(z) + 1) / 2.0 + 0.5
            level = position.floor()
            level_st = level.detach() + (position - position.detach())
            codes = self.step * level_st - 1.0
            return codes, level.long()
        bounded = self._squash(z + self.shift) * self.half_l - self.offset
        rounded = bounded.round()  # in -half_width .. L - 1 - half_width
        rounded_st = rounded.detach() + (bounded - bounded.detach())
        codes = rounded_st / self.half_width
        return codes, rounded.long() + self.half_width

    def level_indices_to_indices(self, level_indices: Tensor) -> Tensor:
        return (level_indices * self.basis).sum(dim=-1)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """indices [...] -> per-channel level indices [..., len(levels)] in 0..L-1."""
        return (indices.long().unsqueeze(-1) // self.basis) % self.levels_t

    def level_indices_to_codes(self, level_indices: Tensor) -> Tensor:
        """Grid values in [-1, 1] (before project_out), bitwise equal to the forward codes."""
        if self.preserve_symmetry:
            return self.step * level_indices.float() - 1.0
        return (level_indices - self.half_width).float() / self.half_width

    def quantize(self, z: Tensor) -> QuantizerOutput:
        z = self.project_in(z)
        codes, level_indices = self.bound_and_round(z)
        indices = self.level_indices_to_indices(level_indices)
        codes = self.project_out(codes)
        metrics = (
            histogram_metrics(indices, self.codebook_size)
            if self.compute_metrics and self.codebook_size <= MAX_HISTOGRAM_CODEBOOK
            else {}
        )
        return QuantizerOutput(codes, indices, {}, metrics)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        return self.project_out(self.level_indices_to_codes(self.indices_to_level_indices(indices)))

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, dim={self.dim}, codebook_size={self.codebook_size}, "
            f"preserve_symmetry={self.preserve_symmetry}, hard_clamp={self.hard_clamp}"
        )
