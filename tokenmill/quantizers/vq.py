"""Vector quantization with a learnable codebook (Euclidean or l2-normalised cosine)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.quantizers.base import Quantizer, QuantizerOutput, histogram_metrics


class VectorQuantizer(Quantizer):
    """Nearest-code VQ (van den Oord et al.) trained with codebook + commitment losses.

    use_l2_norm: latents and codes live on the unit sphere and the nearest code is the one with
    the largest cosine similarity; TiTok (and ViT-VQGAN) use this to keep the codebook in use.

    dead_code_patience: a code not chosen by any token (on any rank) for this many training
    steps is re-seeded with a latent from the current batch. Without it a 1D tokenizer's codebook
    tends to lock into one code per token position early in training.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        use_l2_norm: bool = True,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        dead_code_patience: int | None = None,
    ):
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.use_l2_norm = use_l2_norm
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.dead_code_patience = dead_code_patience
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        # Training steps since each code was last chosen (identical on every rank).
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))

    def codebook(self) -> Tensor:
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.use_l2_norm else weight

    def nearest_indices(self, z: Tensor, codebook: Tensor) -> Tensor:
        flat = z.reshape(-1, self.dim)
        if self.use_l2_norm:
            # Unit vectors: the nearest code maximises the dot product.
            return (flat @ codebook.t()).argmax(dim=-1).view(z.shape[:-1])
        distances = (
            flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(-1)[None]
        )
        return distances.argmin(dim=-1).view(z.shape[:-1])

    @torch.no_grad()
    def reseed_dead_codes(self, z: Tensor) -> int:
        """Replace codes unused for `dead_code_patience` steps by random latents of this batch.

        Runs at the start of a training forward (before the codebook enters the autograd graph).
        Rank 0 draws the replacements and broadcasts them, so all ranks keep one codebook.
        """
        dead = (self.steps_unused >= self.dead_code_patience).nonzero().squeeze(1)
        if dead.numel() == 0:  # steps_unused is identical on all ranks: all take this branch
            return 0
        flat = z.detach().reshape(-1, self.dim)
        picks = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        replacements = flat[picks].to(self.embedding.weight.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(replacements, src=0)
        self.embedding.weight[dead] = replacements
        self.steps_unused[dead] = 0
        return int(dead.numel())

    @torch.no_grad()
    def _track_usage(self, indices: Tensor) -> None:
        used = torch.bincount(indices.reshape(-1), minlength=self.codebook_size)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(used)
        self.steps_unused += 1
        self.steps_unused[used > 0] = 0

    def quantize(self, z: Tensor) -> QuantizerOutput:
        if self.use_l2_norm:
            z = F.normalize(z, dim=-1)
        reseeding = self.training and self.dead_code_patience is not None
        reseeded = self.reseed_dead_codes(z) if reseeding else 0
        codebook = self.codebook()
        with torch.no_grad():
            indices = self.nearest_indices(z, codebook)
        if reseeding:
            self._track_usage(indices)
        quantized = F.embedding(indices, codebook)
        losses = {
            "codebook": self.codebook_weight * F.mse_loss(quantized, z.detach()),
            "commitment": self.commitment_weight * F.mse_loss(z, quantized.detach()),
        }
        # Straight-through: forward value is exactly the code (so indices_to_codes round-trips
        # bitwise), backward is the identity to z. z + (q - z).detach() would be off by rounding.
        codes = quantized.detach() + (z - z.detach())
        metrics = histogram_metrics(indices, self.codebook_size)
        if reseeding:
            metrics["reseeded_codes"] = torch.tensor(float(reseeded))
        return QuantizerOutput(codes, indices, losses, metrics)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.codebook())
