"""Vector quantization: Euclidean or cosine codebooks, learned by gradient or by EMA.

Options, each off by default and independent of the others:

codebook_dim
    Search a low-dimensional codebook (ViT-VQGAN's factorised codes): latents are projected
    dim -> codebook_dim before the search and the codes back codebook_dim -> dim after it.
ema_decay
    Update the codebook with exponential moving averages of the assigned latents (VQ-VAE-2)
    instead of the codebook loss. The codebook is then a buffer, not a parameter: no optimizer
    touches it and FSDP keeps it replicated instead of sharding it.
kmeans_init
    On the first training forward, run `kmeans_iters` rounds of k-means on the batch's latents
    (all ranks' latents: sums and counts are all-reduced) and start from the centroids.
dead_code_patience
    A code no token chose on any rank for this many training steps is replaced by a latent of
    the current batch (drawn on rank 0 and broadcast). Without it a 1D tokenizer's codebook tends
    to lock into one code per token position early in training.
rotation_trick
    Backpropagate through the quantizer with the rotation trick (Fifty et al. 2024): the gradient
    reaching z is the code's gradient rotated from the code's direction to z's and rescaled by
    |z| / |code|, instead of being copied unchanged (straight-through).

Every codebook update happens in a training forward and is computed from all-reduced statistics
or broadcast values, so all ranks hold bitwise-identical codebooks; evaluation calls no
collective (see `tokenmill/quantizers/distributed.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.quantizers.base import Quantizer, QuantizerOutput, histogram_metrics
from tokenmill.quantizers.distributed import all_reduce_sum_, broadcast_


def rotate_onto(z: Tensor, target: Tensor, eps: float = 1e-12) -> Tensor:
    """lambda * R z, with R the rotation taking z's direction to target's and lambda = |t| / |z|
    both held constant for autograd: forward ~= target, backward = lambda * R^T (rotation trick)."""
    z_norm = z.norm(dim=-1, keepdim=True).clamp_min(eps)
    t_norm = target.norm(dim=-1, keepdim=True).clamp_min(eps)
    e = (z / z_norm).detach()
    t = (target / t_norm).detach()
    # R = I - 2 r r^T + 2 t e^T with r = normalise(e + t); applied without forming the matrix.
    r = F.normalize(e + t, dim=-1)
    rotated = z - 2 * r * (z * r).sum(-1, keepdim=True) + 2 * t * (z * e).sum(-1, keepdim=True)
    return rotated * (t_norm / z_norm).detach()


class VectorQuantizer(Quantizer):
    """Nearest-code VQ (van den Oord et al. 2017); see the module docstring for the options.

    use_l2_norm: latents and codes live on the unit sphere and the nearest code is the one with
    the largest cosine similarity; TiTok (and ViT-VQGAN) use this to keep the codebook in use.

    losses: "commitment" always; "codebook" only when the codebook learns by gradient.
    metrics: usage, perplexity, entropy of the batch's code histogram; with re-seeding also
    "reseeded_codes" and "dead_fraction" (codes unused for at least `dead_code_patience` steps).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        use_l2_norm: bool = True,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        dead_code_patience: int | None = None,
        codebook_dim: int | None = None,
        ema_decay: float | None = None,
        ema_epsilon: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        rotation_trick: bool = False,
    ):
        super().__init__()
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"VectorQuantizer: ema_decay must be in [0, 1), got {ema_decay}")
        if dead_code_patience is not None and dead_code_patience < 1:
            raise ValueError(f"VectorQuantizer: dead_code_patience must be >= 1, got {dead_code_patience}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim or dim
        self.use_l2_norm = use_l2_norm
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.dead_code_patience = dead_code_patience
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        self.kmeans_iters = kmeans_iters
        self.rotation_trick = rotation_trick

        projected = self.codebook_dim != dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if projected else nn.Identity()

        if ema_decay is None:
            self.embedding = nn.Embedding(codebook_size, self.codebook_dim)
        else:
            self.register_buffer("ema_codebook", torch.empty(codebook_size, self.codebook_dim))
            self.register_buffer("ema_cluster_size", torch.empty(codebook_size))
            self.register_buffer("ema_code_sum", torch.empty(codebook_size, self.codebook_dim))
        if kmeans_init:
            self.register_buffer("kmeans_done", torch.tensor(False))
        # Training steps since each code was last chosen (identical on every rank).
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        self.reset_parameters()

    # -- codebook state -------------------------------------------------------------------

    @property
    def uses_ema(self) -> bool:
        return self.ema_decay is not None

    @property
    def code_vectors(self) -> Tensor:
        """The stored codebook [codebook_size, codebook_dim] (before any l2-normalisation)."""
        return self.ema_codebook if self.uses_ema else self.embedding.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / self.codebook_size
        nn.init.uniform_(self.code_vectors, -bound, bound)
        if self.uses_ema:
            # cluster size 1 and sum = code: an unused code keeps its value under the EMA
            # (both decay alike) instead of collapsing to zero.
            self.ema_cluster_size.fill_(1.0)
            self.ema_code_sum.copy_(self.ema_codebook)
        if hasattr(self, "kmeans_done"):
            self.kmeans_done.fill_(False)
        self.steps_unused.zero_()
        for layer in (self.project_in, self.project_out):
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    @torch.no_grad()
    def _set_codes(self, which: Tensor | slice, values: Tensor) -> None:
        self.code_vectors[which] = values.to(self.code_vectors.dtype)
        if self.uses_ema:
            self.ema_cluster_size[which] = 1.0
            self.ema_code_sum[which] = values.to(self.ema_code_sum.dtype)

    def codebook(self) -> Tensor:
        weight = self.code_vectors.float()
        return F.normalize(weight, dim=-1) if self.use_l2_norm else weight

    # -- search ---------------------------------------------------------------------------

    def nearest_indices(self, z: Tensor, codebook: Tensor) -> Tensor:
        """z [..., codebook_dim] (already projected / normalised) -> int64 indices [...]."""
        flat = z.reshape(-1, self.codebook_dim)
        if self.use_l2_norm:
            # Unit vectors: the nearest code maximises the dot product.
            return (flat @ codebook.t()).argmax(dim=-1).view(z.shape[:-1])
        distances = (
            flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(-1)[None]
        )
        return distances.argmin(dim=-1).view(z.shape[:-1])

    # -- training-time codebook updates (all ranks call these together) ---------------------

    @torch.no_grad()
    def _sums_and_counts(self, flat: Tensor, indices: Tensor) -> Tensor:
        """[codebook_size, codebook_dim + 1]: per-code sum of assigned latents and their count,
        summed over ranks (one all-reduce)."""
        stats = flat.new_zeros(self.codebook_size, self.codebook_dim + 1)
        stats[:, :-1].index_add_(0, indices, flat)
        stats[:, -1].index_add_(0, indices, torch.ones_like(indices, dtype=flat.dtype))
        return all_reduce_sum_(stats)

    @torch.no_grad()
    def kmeans_init_(self, z: Tensor) -> None:
        """Lloyd's k-means over all ranks' latents; rank 0's random picks seed the centroids."""
        flat = z.detach().reshape(-1, self.codebook_dim).float()
        n = flat.shape[0]
        picks = torch.randperm(n, device=flat.device)[: self.codebook_size]
        if n < self.codebook_size:  # small first batch: sample with replacement
            picks = torch.randint(0, n, (self.codebook_size,), device=flat.device)
        centroids = broadcast_(flat[picks].clone())
        for _ in range(self.kmeans_iters):
            stats = self._sums_and_counts(flat, self.nearest_indices(flat, centroids))
            counts = stats[:, -1]
            filled = counts > 0  # an empty cluster keeps its centroid
            centroids[filled] = stats[filled, :-1] / counts[filled, None]
            if self.use_l2_norm:
                centroids = F.normalize(centroids, dim=-1)
        self._set_codes(slice(None), broadcast_(centroids))
        self.kmeans_done.fill_(True)

    @torch.no_grad()
    def reseed_dead_codes(self, z: Tensor) -> int:
        """Replace codes unused for `dead_code_patience` steps by random latents of this batch."""
        dead = (self.steps_unused >= self.dead_code_patience).nonzero().squeeze(1)
        if dead.numel() == 0:  # steps_unused is identical on all ranks: all take this branch
            return 0
        flat = z.detach().reshape(-1, self.codebook_dim)
        picks = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        self._set_codes(dead, broadcast_(flat[picks].float().clone()))
        self.steps_unused[dead] = 0
        return int(dead.numel())

    @torch.no_grad()
    def _update_from_assignments(self, z: Tensor, indices: Tensor) -> None:
        """EMA codebook step and/or dead-code bookkeeping from this step's assignments."""
        flat = z.detach().reshape(-1, self.codebook_dim)
        stats = self._sums_and_counts(flat, indices.reshape(-1))
        counts, sums = stats[:, -1], stats[:, :-1]
        if self.uses_ema:
            decay = self.ema_decay
            self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            self.ema_code_sum.mul_(decay).add_(sums, alpha=1 - decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            total = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + self.ema_epsilon) / (
                total + self.codebook_size * self.ema_epsilon
            ) * total
            self.ema_codebook.copy_(self.ema_code_sum / smoothed[:, None])
        if self.dead_code_patience is not None:
            self.steps_unused += 1
            self.steps_unused[counts > 0] = 0

    # -- forward --------------------------------------------------------------------------

    def quantize(self, z: Tensor) -> QuantizerOutput:
        z = self.project_in(z)
        if self.use_l2_norm:
            z = F.normalize(z, dim=-1)
        reseeded = None
        if self.training:
            if hasattr(self, "kmeans_done") and not bool(self.kmeans_done):
                self.kmeans_init_(z)
            if self.dead_code_patience is not None:
                reseeded = self.reseed_dead_codes(z)

        codebook = self.codebook()
        with torch.no_grad():
            indices = self.nearest_indices(z, codebook)
        quantized = F.embedding(indices, codebook)

        losses = {"commitment": self.commitment_weight * F.mse_loss(z, quantized.detach())}
        if not self.uses_ema:
            losses["codebook"] = self.codebook_weight * F.mse_loss(quantized, z.detach())
        # The forward value is exactly the code (so indices_to_codes round-trips bitwise); only
        # the backward differs: identity (straight-through) or the rotation trick.
        surrogate = rotate_onto(z, quantized) if self.rotation_trick else z
        codes = quantized.detach() + (surrogate - surrogate.detach())

        if self.training and (self.uses_ema or self.dead_code_patience is not None):
            self._update_from_assignments(z, indices)

        metrics = histogram_metrics(indices, self.codebook_size) if self.compute_metrics else {}
        if reseeded is not None:
            metrics["reseeded_codes"] = torch.tensor(float(reseeded))
            metrics["dead_fraction"] = (self.steps_unused >= self.dead_code_patience).float().mean()
        return QuantizerOutput(self.project_out(codes), indices, losses, metrics)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        return self.project_out(F.embedding(indices, self.codebook()))
