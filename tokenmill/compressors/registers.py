"""Register tokens, two ways.

FALCON (Zhang et al. 2025, "FALCON: Resolving Visual Redundancy and Fragmentation in
High-resolution MLLMs via Visual Registers"): learnable registers are appended inside the ViT
(`HFVisionEncoder(num_registers=R)`) and only their outputs reach the language model
(ReCompact): `RegisterReadout` below. Register attention across the crops of a high-resolution
image (ReAtten) lives in the tower: `HFVisionEncoder(cross_crop_registers=True)`.

PH-Reg (Chen et al. 2025, "Vision Transformers with Self-Distilled Registers"): registers are
added post hoc to a pretrained ViT. A frozen copy of the ViT without registers (the teacher) sees
several shifted / flipped views of each image; undoing each transform on its feature grid and
averaging gives denoised dense targets (`denoised_dense_targets`), which the student (the same
ViT plus registers) learns to produce while only the registers and a few chosen weights train
(`tokenmill.trainers.register_task.RegisterDistillation`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Compressor, CompressorOutput, VisionFeatures


class RegisterReadout(Compressor):
    """The tower's register outputs are the visual tokens: [B, R, D] (no parameters).

    Args:
        in_dim: width of the vision features.
        num_registers: registers per image crop (the tower's `num_registers`).
        num_crops: crops per image when the tower gets multi-crop input [B, C, 3, H, W]; the
            readout then emits the C * R registers of all crops, crop by crop.
    """

    def __init__(self, in_dim: int, num_registers: int, num_crops: int = 1):
        super().__init__()
        if num_registers <= 0 or num_crops <= 0:
            raise ValueError(
                "RegisterReadout needs num_registers > 0 and num_crops > 0, "
                f"got {num_registers} and {num_crops}"
            )
        self.in_dim = self.out_dim = in_dim
        self.num_registers = num_registers
        self.num_crops = num_crops
        self.max_tokens = num_registers * num_crops

    def compress(self, features: VisionFeatures, num_tokens: int) -> CompressorOutput:
        registers = features.registers
        if registers is None:
            raise ValueError(
                "RegisterReadout reads register outputs, but the vision tower produced none: set "
                "num_registers > 0 on the vision encoder (e.g. model.net.vision.num_registers)"
            )
        if registers.shape[1] != self.max_tokens:
            raise ValueError(
                f"RegisterReadout expects {self.max_tokens} register outputs ({self.num_registers} "
                f"registers x {self.num_crops} crops), got {registers.shape[1]}: num_registers (and "
                "num_crops) must match the vision encoder and its input"
            )
        return CompressorOutput(registers)


# ------------------------------------------------------------------------------------ PH-Reg


def _draw_views(
    num_views: int, batch: int, max_cells: int, flip: bool, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Per view and sample: a shift (dy, dx) in whole patches, uniform in [-max_cells, max_cells]
    (int64 [V, B, 2]), and a horizontal flip with probability 1/2 (bool [V, B]). View 0 is the
    untouched image."""
    shifts = torch.randint(-max_cells, max_cells + 1, (num_views, batch, 2), generator=generator)
    flips = torch.rand(num_views, batch, generator=generator) < 0.5 if flip else torch.zeros(num_views, batch)
    shifts[0] = 0
    flips = flips.bool()
    flips[0] = False
    return shifts, flips


def augment_images(images: Tensor, shifts: Tensor, flips: Tensor, fill: Tensor) -> Tensor:
    """Flip (where `flips`) then translate each image by `shifts` [B, 2] pixels (dy, dx).

    Translation, not roll: content moved past the border is dropped and uncovered pixels take
    `fill` ([1, 3, 1, 1]; the tower's mean colour, which its normalisation maps to 0), so no
    wrapped-around content from the opposite side appears next to unrelated content."""
    b, _, h, w = images.shape
    device = images.device
    dy, dx = shifts[:, 0].to(device)[:, None, None], shifts[:, 1].to(device)[:, None, None]
    y = torch.arange(h, device=device)[None, :, None] - dy  # [B, H, 1] source row
    x = torch.arange(w, device=device)[None, None, :] - dx  # [B, 1, W] source column (flipped frame)
    valid = (y >= 0) & (y < h) & (x >= 0) & (x < w)  # [B, H, W]
    x = torch.where(flips.to(device)[:, None, None], w - 1 - x, x)
    y, x = y.clamp(0, h - 1).expand(b, h, w), x.clamp(0, w - 1).expand(b, h, w)
    index = torch.arange(b, device=device)[:, None, None]
    moved = images[index, :, y, x].permute(0, 3, 1, 2)  # advanced indices first: [B, H, W, 3]
    return torch.where(valid[:, None], moved, fill.to(images.dtype))


def align_features(
    features: Tensor, grid: tuple[int, int], cell_shifts: Tensor, flips: Tensor
) -> tuple[Tensor, Tensor]:
    """Undo `augment_images` on a patch-feature grid: [B, h*w, D] of the augmented view ->
    (features at the original cells [B, h*w, D], valid [B, h*w]).

    With the patch grid shifted by (sy, sx) cells, original cell (i, j) sits at (i + sy, J) where
    J = j + sx, or w - 1 - j + sx when flipped; cells whose content left the frame are invalid."""
    b, _, d = features.shape
    h, w = grid
    device = features.device
    sy, sx = cell_shifts[:, 0].to(device)[:, None, None], cell_shifts[:, 1].to(device)[:, None, None]
    i = torch.arange(h, device=device)[None, :, None] + sy  # [B, h, 1]
    j = torch.arange(w, device=device)[None, None, :]
    j = torch.where(flips.to(device)[:, None, None], w - 1 - j, j) + sx  # [B, 1 or h, w]
    valid = ((i >= 0) & (i < h) & (j >= 0) & (j < w)).expand(b, h, w)
    source = (i.clamp(0, h - 1) * w + j.clamp(0, w - 1)).expand(b, h, w).reshape(b, h * w)
    aligned = torch.gather(features, 1, source[..., None].expand(b, h * w, d))
    return aligned, valid.reshape(b, h * w)


@torch.no_grad()
def denoised_dense_targets(
    teacher: torch.nn.Module,
    pixel_values: Tensor,
    num_augmentations: int,
    max_shift: int,
    flip: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PH-Reg's test-time-augmentation targets: the teacher's patch features of the image,
    averaged with those of `num_augmentations` augmented views mapped back onto the image's grid.

    Args:
        teacher: an `HFVisionEncoder` (no registers), [B, 3, H, W] in [0, 1] -> VisionFeatures.
        pixel_values: [B, 3, H, W] in [0, 1].
        num_augmentations: augmented views besides the untouched image (0: the plain output).
        max_shift: largest translation in pixels, a multiple of the patch size so the feature grid
            moves by whole cells; each view and image draws (dy, dx) uniformly from
            {-max_shift, ..., -p, 0, p, ..., max_shift} (p = patch size).
        flip: also flip each view horizontally with probability 1/2.
        generator: CPU generator for the draws (None: torch's global RNG).

    Each view is translated with padding (see `augment_images`). Undoing it on the feature grid,
    a cell whose content was outside the view is not valid for that view, and each cell averages
    only the views where it is valid; the untouched image makes every cell valid at least once.
    Returns float [B, N, D] in the teacher's selected layer.
    """
    patch = teacher.patch_size
    if max_shift < 0 or max_shift % patch:
        raise ValueError(
            f"max_shift must be a non-negative multiple of the patch size {patch}, got {max_shift}"
        )
    if num_augmentations < 0:
        raise ValueError(f"num_augmentations must be >= 0, got {num_augmentations}")
    batch = pixel_values.shape[0]
    shifts, flips = _draw_views(num_augmentations + 1, batch, max_shift // patch, flip, generator)
    fill = teacher.image_mean
    total = count = None
    for cell_shifts, view_flips in zip(shifts, flips, strict=True):
        if bool(cell_shifts.any()) or bool(view_flips.any()):
            view = augment_images(pixel_values, cell_shifts * patch, view_flips, fill)
        else:
            view = pixel_values
        features = teacher(view)
        aligned, valid = align_features(features.patches.float(), features.grid, cell_shifts, view_flips)
        weight = valid[..., None].to(aligned.dtype)
        total = aligned * weight if total is None else total + aligned * weight
        count = weight if count is None else count + weight
    return total / count
