"""Rectified-flow decoder (FlexTok's decoder): a DiT that generates the image from 1D tokens.

Flow (rectified flow / flow matching with straight paths), t in [0, 1], t = 0 data, t = 1 noise:
    x_t = (1 - t) x_0 + t e,  e ~ N(0, I);  the network predicts the velocity v = e - x_0.
Training draws t from a logit-normal distribution (t = sigmoid(n), n ~ N(mean, std): more weight
on the middle of the path, as SD3 and FlexTok do) and minimises ||v_pred - v||^2.
Sampling integrates dx/dt = v from t = 1 to 0 with `num_steps` Euler steps.

Conditioning: the (quantized, budget-masked) register tokens are projected to the DiT width and
concatenated with the noisy patches (in-context conditioning, as FlexTok); the timestep enters
through AdaLN-zero. In training, each sample's tokens are replaced by a learned null token with
probability `condition_dropout`, which gives the unconditional model that classifier-free
guidance needs: v = v_uncond + guidance_scale * (v_cond - v_uncond).

Noise is drawn per sample from a generator seeded with (seed, position in the batch), so a
sample decodes identically whatever batch it is in.

REPA (Yu et al. 2024): optionally, the hidden states of the patch positions after block
`repa.depth` are projected and pulled towards a frozen teacher's features of the clean image
(negative cosine similarity), which speeds up DiT training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.layers import (
    AdaLNFinalLayer,
    AdaLNZeroBlock,
    TimestepEmbedding,
    check_image_size,
    patchify,
    unpatchify,
)
from tokenmill.tokenizers.autoencoder import GenerativeDecoder
from tokenmill.tokenizers.teachers import REPAAlignment


def _learned(*shape: int, width: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * width**-0.5)


class RectifiedFlowDecoder(GenerativeDecoder):
    """Args:
        image_size / in_channels: the generated grid (pixels, or VAE latents when the tokenizer
            has a VAE: then the latent side and channels).
        patch_size, width, depth, num_heads, mlp_ratio: the DiT.
        num_latent_tokens, token_dim: the register tokens it is conditioned on.
        condition_dropout: probability, per training sample, of dropping all tokens (for CFG).
        logit_normal_mean / logit_normal_std: timestep sampling in training.
        num_steps / guidance_scale: default Euler steps and CFG scale for sampling.
        repa: optional REPAAlignment (teacher + projection); its loss is added in training.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int = 3,
        width: int = 512,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_latent_tokens: int = 256,
        token_dim: int = 6,
        condition_dropout: float = 0.1,
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
        num_steps: int = 25,
        guidance_scale: float = 1.0,
        flow_weight: float = 1.0,
        repa: REPAAlignment | None = None,
        qk_norm: bool = True,
    ):
        super().__init__()
        self.image_size = image_size
        self.grid = check_image_size(image_size, patch_size)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_latent_tokens = num_latent_tokens
        self.condition_dropout = condition_dropout
        self.logit_normal_mean = logit_normal_mean
        self.logit_normal_std = logit_normal_std
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.flow_weight = flow_weight

        patch_dim = patch_size * patch_size * in_channels
        self.patch_in = nn.Linear(patch_dim, width)
        self.patch_pos = _learned(self.grid**2, width, width=width)
        self.tokens_in = nn.Linear(token_dim, width)
        self.token_pos = _learned(num_latent_tokens, width, width=width)
        self.null_token = _learned(width, width=width)
        self.time_embed = TimestepEmbedding(width)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(width, num_heads, mlp_ratio, qk_norm=qk_norm) for _ in range(depth))
        self.final = AdaLNFinalLayer(width, patch_dim)
        self.repa = repa
        if repa is not None and not 1 <= repa.depth <= depth:
            raise ValueError(f"repa.depth={repa.depth} must be in 1..{depth} (the decoder's blocks)")

    def no_weight_decay(self) -> set[str]:
        return {"patch_pos", "token_pos", "null_token"}

    @property
    def last_layer(self) -> Tensor:
        return self.final.linear.weight

    # -- network --------------------------------------------------------------------------

    def velocity(self, x_t: Tensor, t: Tensor, codes: Tensor | None, drop: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(v [B, C, H, W], hidden states of the patches after block repa.depth or None).

        codes None: unconditional (every token is the null token). drop [B] bool: per-sample."""
        b = x_t.shape[0]
        patches = self.patch_in(patchify(x_t, self.patch_size)) + self.patch_pos
        if codes is None:
            tokens = self.null_token.expand(b, self.num_latent_tokens, -1)
        else:
            tokens = self.tokens_in(codes)
            if drop is not None:
                tokens = torch.where(drop[:, None, None], self.null_token.to(tokens.dtype), tokens)
        x = torch.cat([patches, tokens + self.token_pos], dim=1)
        cond = self.time_embed(t)
        aligned = None
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, cond)
            if self.repa is not None and i == self.repa.depth:
                aligned = x[:, : self.grid**2]
        out = self.final(x[:, : self.grid**2], cond)
        return unpatchify(out, self.grid, self.patch_size, self.in_channels), aligned

    # -- training -------------------------------------------------------------------------

    def sample_timesteps(self, batch: int, device: torch.device) -> Tensor:
        normal = torch.randn(batch, device=device) * self.logit_normal_std + self.logit_normal_mean
        return torch.sigmoid(normal)

    def loss(self, codes: Tensor, target: Tensor, images: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        b = target.shape[0]
        t = self.sample_timesteps(b, target.device)
        noise = torch.randn_like(target)
        x_t = (1 - t)[:, None, None, None] * target + t[:, None, None, None] * noise
        drop = torch.rand(b, device=target.device) < self.condition_dropout
        v_pred, hidden = self.velocity(x_t, t, codes, drop)
        flow = F.mse_loss(v_pred.float(), (noise - target).float())
        losses = {"flow": self.flow_weight * flow}
        if self.repa is not None:
            losses["repa"] = self.repa.loss(hidden, images, self.grid)
        return losses, {}  # the task logs every loss; no extra metrics

    # -- sampling -------------------------------------------------------------------------

    def initial_noise(self, codes: Tensor, seed: int | None) -> Tensor:
        shape = (self.in_channels, self.image_size, self.image_size)
        if seed is None:
            return torch.randn(codes.shape[0], *shape, device=codes.device)
        noise = [
            torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
            for i in range(codes.shape[0])
        ]
        return torch.stack(noise).to(codes.device)

    @torch.no_grad()
    def forward(
        self, codes: Tensor, seed: int | None = None, num_steps: int | None = None, guidance_scale: float | None = None
    ) -> Tensor:
        """Generate [B, C, H, W] from codes [B, K, D] by Euler integration from noise."""
        num_steps = num_steps or self.num_steps
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        x = self.initial_noise(codes, seed).to(codes.dtype)
        times = torch.linspace(1.0, 0.0, num_steps + 1, device=codes.device)
        for t, t_next in zip(times[:-1], times[1:], strict=True):
            t_batch = t.expand(codes.shape[0])
            v, _ = self.velocity(x, t_batch, codes)
            if scale != 1.0:
                v_uncond, _ = self.velocity(x, t_batch, None)
                v = v_uncond + scale * (v - v_uncond)
            x = x + (t_next - t) * v
        return x
