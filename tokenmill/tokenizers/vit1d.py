"""ViT encoder and decoder for 1D latent-token tokenizers (TiTok and its relatives).

Encoder: patches of the image plus K learnable latent tokens go through one transformer; the K
latent outputs, projected to `token_dim`, are the 1D tokens. The patch outputs are dropped, so
the image is forced through the K tokens.

With `causal_registers=True` (FlexTok) the latent ("register") tokens attend to all patches but
only to themselves and earlier registers, and patches attend only to patches: token i cannot see
tokens after it, which gives the sequence the coarse-to-fine order nested dropout relies on.

Decoder: K (quantized) tokens plus one mask token per patch position go through a transformer;
the patch positions are read out as pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenmill.layers import Transformer, check_image_size, unpatchify

# Width / depth / heads of the ViT sizes the TiTok paper uses (ViT-S/B/L).
VIT_SIZES = {
    "small": dict(width=512, depth=8, num_heads=8),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
}


def _learned_embedding(*shape: int, width: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * width**-0.5)


class ViTEncoder1D(nn.Module):
    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        width: int = 512,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_latent_tokens: int = 128,
        token_dim: int = 12,
        causal_registers: bool = False,
    ):
        super().__init__()
        self.image_size = image_size
        self.grid = check_image_size(image_size, patch_size)
        self.num_latent_tokens = num_latent_tokens
        self.token_dim = token_dim
        self.causal_registers = causal_registers
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.patch_pos = _learned_embedding(self.grid**2, width, width=width)
        self.latent_tokens = _learned_embedding(num_latent_tokens, width, width=width)
        self.latent_pos = _learned_embedding(num_latent_tokens, width, width=width)
        self.norm_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, num_heads, mlp_ratio)
        self.norm_post = nn.LayerNorm(width)
        self.to_tokens = nn.Linear(width, token_dim)

    def no_weight_decay(self) -> set[str]:
        return {"patch_pos", "latent_tokens", "latent_pos"}

    def forward(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] in [-1, 1] -> tokens [B, K, token_dim]."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"encoder was built for {self.image_size}x{self.image_size} images, got {tuple(images.shape[-2:])}"
            )
        x = self.hidden_states(images)
        return self.to_tokens(x[:, -self.num_latent_tokens :])

    def hidden_states(self, images: Tensor) -> Tensor:
        """Final normalised states [B, P + K, width]: patch states, then latent-token states."""
        patches = self.patch_embed(images).flatten(2).transpose(1, 2) + self.patch_pos
        latents = (self.latent_tokens + self.latent_pos).expand(images.shape[0], -1, -1)
        mask = self.attention_mask(images.device) if self.causal_registers else None
        x = self.transformer(self.norm_pre(torch.cat([patches, latents], dim=1)), attn_mask=mask)
        return self.norm_post(x)

    def attention_mask(self, device: torch.device) -> Tensor:
        """bool [P+K, P+K], True = may attend: patches see patches; register i sees all patches
        and registers <= i."""
        p, k = self.grid**2, self.num_latent_tokens
        mask = torch.zeros(p + k, p + k, dtype=torch.bool, device=device)
        mask[:p, :p] = True
        mask[p:, :p] = True
        mask[p:, p:] = torch.ones(k, k, dtype=torch.bool, device=device).tril()
        return mask


class ViTDecoder1D(nn.Module):
    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        out_channels: int = 3,
        width: int = 512,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_latent_tokens: int = 128,
        token_dim: int = 12,
    ):
        super().__init__()
        self.grid = check_image_size(image_size, patch_size)
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.num_latent_tokens = num_latent_tokens
        self.from_tokens = nn.Linear(token_dim, width)
        self.latent_pos = _learned_embedding(num_latent_tokens, width, width=width)
        self.mask_token = _learned_embedding(1, 1, width, width=width)
        self.patch_pos = _learned_embedding(self.grid**2, width, width=width)
        self.norm_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, num_heads, mlp_ratio)
        self.norm_post = nn.LayerNorm(width)
        self.to_pixels = nn.Linear(width, patch_size * patch_size * out_channels)
        # A 3x3 conv over the unpatchified image smooths seams between patches.
        self.conv_out = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)

    def no_weight_decay(self) -> set[str]:
        return {"latent_pos", "mask_token", "patch_pos"}

    @property
    def last_layer(self) -> Tensor:
        """Weight the adversarial loss balances its gradient against (VQGAN's adaptive weight)."""
        return self.conv_out.weight

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, K, token_dim] -> images [B, C, H, W]."""
        b, k, _ = tokens.shape
        if k != self.num_latent_tokens:
            raise ValueError(f"decoder expects {self.num_latent_tokens} tokens, got {k}")
        latents = self.from_tokens(tokens) + self.latent_pos
        masks = self.mask_token.expand(b, self.grid**2, -1) + self.patch_pos
        x = self.transformer(self.norm_pre(torch.cat([masks, latents], dim=1)))
        patches = self.to_pixels(self.norm_post(x[:, : self.grid**2]))
        return self.conv_out(unpatchify(patches, self.grid, self.patch_size, self.out_channels))
