"""Frozen feature teachers and the REPA alignment loss that uses them.

A teacher is any module mapping images [B, 3, H, W] in [-1, 1] to patch features [B, N, D] on a
square grid. Real runs load pretrained weights (e.g. a DINOv2 converted to safetensors) from a
path; tests use a randomly initialised one. Teachers are frozen: no gradients, always in eval
mode, and never part of an optimizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from tokenmill.layers import Transformer, patchify


class ViTFeatureTeacher(nn.Module):
    """A plain ViT (patch embedding + transformer) whose patch outputs are the features.

    weights_path: a .safetensors file with this module's state dict; loaded strictly (a missing or
    mis-shaped tensor is an error naming it). None keeps the random initialisation (tests).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 14,
        width: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        weights_path: str | None = None,
    ):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.feature_dim = width
        self.patch_embed = nn.Linear(3 * patch_size * patch_size, width)
        self.pos = nn.Parameter(torch.randn((image_size // patch_size) ** 2, width) * width**-0.5)
        self.transformer = Transformer(width, depth, num_heads)
        self.norm = nn.LayerNorm(width)
        if weights_path is not None:
            self.load_weights(weights_path)
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"teacher weights not found: {path}")
        state = load_file(str(path))
        own = self.state_dict()
        problems = [f"missing {k}" for k in own if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in own]
        problems += [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in own.items() if k in state and state[k].shape != v.shape
        ]
        if problems:
            raise ValueError(f"teacher weights {path} do not fit ViTFeatureTeacher: " + "; ".join(problems))
        self.load_state_dict(state)

    def train(self, mode: bool = True) -> ViTFeatureTeacher:
        return super().train(False)  # frozen: always eval

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = self.patch_embed(patchify(images, self.patch_size)) + self.pos
        return self.norm(self.transformer(x))


class REPAAlignment(nn.Module):
    """REPA: align a generator's hidden states with a frozen teacher's features of the image.

    loss = -weight * mean cosine(projector(hidden), teacher(images)), with the teacher's feature
    grid resized (bilinear) to the generator's patch grid when they differ.
    """

    def __init__(self, teacher: nn.Module, hidden_dim: int, depth: int, projector_dim: int = 2048, weight: float = 0.5):
        super().__init__()
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.depth = depth
        self.weight = weight
        feature_dim = teacher.feature_dim
        self.projector = nn.Sequential(
            nn.Linear(hidden_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, feature_dim),
        )

    @staticmethod
    def resize_grid(features: Tensor, grid: int) -> Tensor:
        """[B, N, D] on a square grid -> [B, grid*grid, D]."""
        b, n, d = features.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"teacher features must lie on a square grid, got {n} tokens")
        if side == grid:
            return features
        x = features.transpose(1, 2).reshape(b, d, side, side)
        x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)
        return x.flatten(2).transpose(1, 2)

    def loss(self, hidden: Tensor, images: Tensor, grid: int) -> Tensor:
        with torch.no_grad():
            target = self.resize_grid(self.teacher(images).float(), grid)
        predicted = self.projector(hidden).float()
        return -self.weight * F.cosine_similarity(predicted, target, dim=-1).mean()
