"""Lookup-free quantization (LFQ, MAGVIT-v2) and its variants: group-wise LFQ and BSQ.

Every latent channel is binarised independently, so the codebook {-s, +s}^dim is implicit and
never stored: for dim=18 that is 262,144 codes, for dim=128 (UniWeTok-style) 2^128.

Quantization
    q_i = +s if z_i > 0 else -s        (z_i == 0 maps to -s, as vector-quantize-pytorch's LFQ does)
    s = 1 for LFQ; with `spherical=True` (BSQ, Zhao et al. 2024) z is first l2-normalised over all
    `dim` channels and s = 1/sqrt(dim), so codes lie on the unit sphere.

Indices
    The channels are split into `num_groups` contiguous groups of k = dim / num_groups bits. A
    group's index reads its bits most-significant first (channel 0 of the group is bit k-1), bit
    = 1 for a positive code. `index_format="int"` gives int64 indices [B, N] (one group) or
    [B, N, num_groups]; needs k <= 62. `index_format="bits"` gives the raw bits as a bool tensor
    [B, N, dim] (any k, e.g. dim=128 in one group). `codebook_size` is the size of ONE group's
    codebook, 2**k (a Python int, never materialised); `total_bits` is `dim`.

Entropy loss (the "entropy" entry of `losses`, already weighted by `entropy_weight`)
    Soft assignments are p(c | z) = softmax_c(-inv_temperature * ||z - c||^2) over a group's 2^k
    codes. Because ||z - c||^2 is a sum over channels, this softmax factorises exactly into
    independent bits: p(bit_i = +) = sigmoid(4 * inv_temperature * s * z_i).

    loss = mean per-sample entropy - diversity_gamma * codebook entropy, averaged over groups.

    * per-sample entropy: entropy of p(. | z) for each token and group. For independent bits it is
      exactly the sum of the per-bit Bernoulli entropies, so it is always computed that way.
    * codebook entropy: entropy of the batch-averaged distribution mean_t p(. | z_t). Averaging
      couples the bits, so:
        - groups with k <= `exact_entropy_max_bits` enumerate the 2^k codes and compute it
          exactly (the same quantity vector-quantize-pytorch's LFQ computes);
        - larger groups use the factorised approximation sum_i H(mean_t p(bit_i)), which needs
          no enumeration. It is an upper bound of the exact entropy (equal when the bits are
          independent across the batch); this is the lookup-free entropy large-codebook
          implementations (Open-MAGVIT2, BSQ) rely on.
    Entropies use exact logarithms (values are not clamped; see _plogp for the gradient at 0).
    With `sync_codebook_entropy` (default) and several ranks, the batch average is taken over all
    ranks' tokens in training (an all-reduce that gradients flow through), so the loss is the one
    a single process would compute on the global batch; it assumes equal token counts per rank.

Commitment loss: commitment_weight * mse(z, codes.detach()) (z after l2-normalisation for BSQ).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenmill.quantizers.base import Quantizer, QuantizerOutput, histogram_metrics
from tokenmill.quantizers.distributed import all_reduce_mean_with_grad

MAX_INT_INDEX_BITS = 62
MAX_HISTOGRAM_CODEBOOK = 2**16


def _bernoulli_entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), elementwise and stable for large |logits|."""
    p = torch.sigmoid(logits)
    # -p log p - (1-p) log(1-p) with log p = -softplus(-l), log(1-p) = -softplus(l)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


def _plogp(p: Tensor) -> Tensor:
    """p * log(p) with 0 log 0 = 0 and a finite gradient at p = 0.

    A batch-mean probability is exactly 0 when every token's is (saturated sigmoids, large
    inv_temperature); log(0) would then put -inf into the backward and 0 * -inf = NaN into every
    gradient. Clamping only inside the log, at the smallest normal float, changes no value.
    """
    return p * p.clamp_min(torch.finfo(p.dtype).tiny).log()


def _bernoulli_entropy(p: Tensor) -> Tensor:
    return -(_plogp(p) + _plogp(1 - p))


class LFQ(Quantizer):
    """Lookup-free quantizer (see the module docstring for the exact definitions).

    Args:
        dim: latent channels = total number of bits.
        entropy_weight: weight of the entropy loss.
        commitment_weight: weight of the commitment loss.
        diversity_gamma: weight of the codebook entropy inside the entropy loss.
        num_groups: split the bits into this many groups (group-wise LFQ, WeTok); each group has
            its own 2**(dim // num_groups) codebook and index, entropy is averaged over groups.
        spherical: BSQ - l2-normalise z and use codes sign(z) / sqrt(dim).
        inv_temperature: sharpness of the soft assignment used by the entropy loss.
        index_format: "int" (int64 per group) or "bits" (bool [B, N, dim]).
        exact_entropy_max_bits: groups with at most this many bits compute the codebook entropy
            exactly over their 2**k codes (memory ~ tokens * 2**k); larger groups factorise.
        sync_codebook_entropy: in training, average the code distribution over all ranks.
    """

    def __init__(
        self,
        dim: int,
        entropy_weight: float = 0.1,
        commitment_weight: float = 0.25,
        diversity_gamma: float = 1.0,
        num_groups: int = 1,
        spherical: bool = False,
        inv_temperature: float = 100.0,
        index_format: str = "int",
        exact_entropy_max_bits: int = 10,
        sync_codebook_entropy: bool = True,
    ):
        super().__init__()
        if dim < 1 or num_groups < 1 or dim % num_groups != 0:
            raise ValueError(f"LFQ: dim={dim} must be a positive multiple of num_groups={num_groups}")
        if index_format not in ("int", "bits"):
            raise ValueError(f"LFQ: index_format must be 'int' or 'bits', got {index_format!r}")
        bits_per_group = dim // num_groups
        if index_format == "int" and bits_per_group > MAX_INT_INDEX_BITS:
            raise ValueError(
                f"LFQ: {bits_per_group} bits per group do not fit an int64 index (max "
                f"{MAX_INT_INDEX_BITS}). Split the bits with num_groups (e.g. num_groups="
                f"{math.ceil(dim / MAX_INT_INDEX_BITS)} or more, dividing dim) or use index_format='bits'."
            )
        self.dim = dim
        self.total_bits = dim
        self.num_groups = num_groups
        self.bits_per_group = bits_per_group
        self.codebook_size = 2**bits_per_group  # per group; Python int, never materialised
        self.entropy_weight = entropy_weight
        self.commitment_weight = commitment_weight
        self.diversity_gamma = diversity_gamma
        self.spherical = spherical
        self.inv_temperature = inv_temperature
        self.index_format = index_format
        self.exact_entropy_max_bits = exact_entropy_max_bits
        self.sync_codebook_entropy = sync_codebook_entropy
        self.code_scale = 1.0 / math.sqrt(dim) if spherical else 1.0

    @property
    def bits_per_token(self) -> float:
        return float(self.total_bits)  # all groups together

    # -- codes <-> bits <-> indices ---------------------------------------------------------

    def _bits_to_codes(self, bits: Tensor) -> Tensor:
        scale = torch.tensor(self.code_scale, dtype=torch.float32, device=bits.device)
        return torch.where(bits.bool(), scale, -scale)

    def _bits_to_int(self, bits: Tensor) -> Tensor:
        """bool [..., dim] -> int64 [..., num_groups] (requires bits_per_group <= 62)."""
        grouped = bits.reshape(*bits.shape[:-1], self.num_groups, self.bits_per_group).long()
        weights = 2 ** torch.arange(self.bits_per_group - 1, -1, -1, dtype=torch.long, device=bits.device)
        return (grouped * weights).sum(-1)

    def _int_to_bits(self, indices: Tensor) -> Tensor:
        """int64 [..., num_groups] -> bool [..., dim]."""
        shifts = torch.arange(self.bits_per_group - 1, -1, -1, dtype=torch.long, device=indices.device)
        bits = (indices.long()[..., None] >> shifts) & 1
        return bits.reshape(*indices.shape[:-1], self.dim).bool()

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """int indices [B, N] / [B, N, num_groups], or bits [B, N, dim] -> codes [B, N, dim]."""
        if self.index_format == "bits":
            if indices.shape[-1] != self.dim:
                raise ValueError(f"LFQ: bit indices must end in dim={self.dim}, got {tuple(indices.shape)}")
            return self._bits_to_codes(indices)
        if self.num_groups == 1:
            indices = indices[..., None]
        elif indices.shape[-1] != self.num_groups:
            raise ValueError(
                f"LFQ: indices must end in num_groups={self.num_groups}, got {tuple(indices.shape)}"
            )
        return self._bits_to_codes(self._int_to_bits(indices))

    # -- entropy ----------------------------------------------------------------------------

    def _bit_logits(self, z: Tensor) -> Tensor:
        """logit of p(bit = +) for softmax(-inv_temperature * ||z - c||^2), per channel."""
        return (4.0 * self.inv_temperature * self.code_scale) * z

    def _exact_codebook_entropy(self, logits: Tensor) -> Tensor:
        """Exact entropy of the batch-mean distribution over each group's 2^k codes.

        logits [T, G, k]. log p(c | z) = sum_i logsigmoid(-l_i) + sum_i b_i(c) * l_i.
        """
        k = self.bits_per_group
        codes = torch.arange(2**k, device=logits.device)
        shifts = torch.arange(k - 1, -1, -1, device=logits.device)
        code_bits = ((codes[:, None] >> shifts) & 1).to(logits.dtype)  # [K, k], MSB first
        log_probs = F.logsigmoid(-logits).sum(-1, keepdim=True) + logits @ code_bits.t()  # [T, G, K]
        avg_probs = self._batch_mean(log_probs.exp())  # [G, K]
        return -_plogp(avg_probs).sum(-1).mean()

    def _batch_mean(self, probs: Tensor) -> Tensor:
        """Mean over this rank's tokens, or over all ranks' tokens when syncing in training."""
        mean = probs.mean(0)
        if self.training and self.sync_codebook_entropy:
            mean = all_reduce_mean_with_grad(mean)
        return mean

    def entropy_terms(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(mean per-sample entropy, codebook entropy), each averaged over groups, in nats."""
        logits = self._bit_logits(z).reshape(-1, self.num_groups, self.bits_per_group)  # [T, G, k]
        per_sample = _bernoulli_entropy_from_logits(logits).sum(-1).mean()
        if self.bits_per_group <= self.exact_entropy_max_bits:
            codebook = self._exact_codebook_entropy(logits)
        else:
            mean_bit_probs = self._batch_mean(torch.sigmoid(logits))  # [G, k]
            codebook = _bernoulli_entropy(mean_bit_probs).sum(-1).mean()
        return per_sample, codebook

    # -- forward ----------------------------------------------------------------------------

    def quantize(self, z: Tensor) -> QuantizerOutput:
        if self.spherical:
            z = F.normalize(z, dim=-1)
        with torch.no_grad():
            bits = z > 0  # zero -> negative code
            quantized = self._bits_to_codes(bits)
            if self.index_format == "int":
                indices = self._bits_to_int(bits)
                if self.num_groups == 1:
                    indices = indices.squeeze(-1)
            else:
                indices = bits

        per_sample_entropy, codebook_entropy = self.entropy_terms(z)
        losses = {
            "entropy": self.entropy_weight * (per_sample_entropy - self.diversity_gamma * codebook_entropy),
            "commitment": self.commitment_weight * F.mse_loss(z, quantized),
        }
        # Straight-through: the forward value is exactly the code, so indices_to_codes round-trips
        # bitwise; the backward is the identity to z.
        codes = quantized + (z - z.detach())

        metrics: dict[str, Tensor] = {}
        if self.compute_metrics and self.codebook_size <= MAX_HISTOGRAM_CODEBOOK:
            with torch.no_grad():
                group_indices = self._bits_to_int(bits).reshape(-1, self.num_groups)
                per_group = [
                    histogram_metrics(group_indices[:, g], self.codebook_size) for g in range(self.num_groups)
                ]
                for key in ("usage", "perplexity"):
                    metrics[key] = torch.stack([m[key] for m in per_group]).mean()
        metrics["per_sample_entropy"] = per_sample_entropy.detach()
        metrics["codebook_entropy"] = codebook_entropy.detach()
        return QuantizerOutput(codes, indices, losses, metrics)
