"""The compressor contract: vision-encoder features in, fewer tokens for the language model out.

Every compressor (MQT, M3, TokenPacker, registers, the training-free baselines, or none) is an
`nn.Module` with

    forward(features: VisionFeatures, num_tokens: int | None = None) -> CompressorOutput
    supported_num_tokens: list[int]    budgets it can produce (evaluation sweeps these)
    max_tokens: int                    the budget used when num_tokens is None outside training
    out_dim: int                       channel width of the tokens it emits
    training_budgets() -> list[int | None]

`training_budgets()` tells the task which budgets one training step uses: the task runs the
language model once per entry and averages the losses. MQT returns one randomly drawn m (the
same on every rank), M3 returns all its scales or one drawn scale, fixed compressors return
[None]. Keeping that loop in the task lets every compressor share one training step.

`VisionFeatures` carries what the vision tower produced, because some compressors need more
than the final patch grid: TokenPacker reads several encoder layers, [CLS]-attention pruning
reads the class token's attention, FALCON-style registers read register outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class VisionFeatures:
    """Output of a vision tower for a batch of images.

    patches:       [B, N, D] patch features of the selected layer, N = grid[0] * grid[1], row-major.
    grid:          (h, w) of the patch grid.
    cls:           [B, D] class-token feature of the selected layer, when the tower has one.
    cls_attention: [B, N] attention of the class token to each patch (mean over heads) in the
                   selected layer, when requested; used by [CLS]-attention pruning.
    layers:        {layer index: [B, N, D]} extra encoder layers requested (TokenPacker).
    registers:     [B, R, D] register-token outputs when the tower has registers.
    """

    patches: Tensor
    grid: tuple[int, int]
    cls: Tensor | None = None
    cls_attention: Tensor | None = None
    layers: dict[int, Tensor] = field(default_factory=dict)
    registers: Tensor | None = None

    @property
    def dim(self) -> int:
        return self.patches.shape[-1]


@dataclass
class CompressorOutput:
    """tokens [B, m, out_dim] for the projector; losses are added to the task loss (weighted)."""

    tokens: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)


class Compressor(nn.Module):
    """Base class: subclasses set `in_dim`, `out_dim`, `max_tokens` and implement `compress`."""

    in_dim: int
    out_dim: int
    max_tokens: int

    @property
    def supported_num_tokens(self) -> list[int]:
        return [self.max_tokens]

    def training_budgets(self) -> list[int | None]:
        return [None]

    def check_num_tokens(self, num_tokens: int | None) -> int:
        """None -> max_tokens; anything not in `supported_num_tokens` is refused with the options."""
        if num_tokens is None:
            return self.max_tokens
        if num_tokens not in self.supported_num_tokens:
            raise ValueError(
                f"{type(self).__name__} cannot produce num_tokens={num_tokens}; "
                f"supported: {self.supported_num_tokens}"
            )
        return num_tokens

    def check_features(self, features: VisionFeatures) -> None:
        if features.dim != self.in_dim:
            raise ValueError(
                f"{type(self).__name__} expects vision features of width {self.in_dim}, got {features.dim}"
            )

    def forward(self, features: VisionFeatures, num_tokens: int | None = None) -> CompressorOutput:
        self.check_features(features)
        return self.compress(features, self.check_num_tokens(num_tokens))

    def compress(self, features: VisionFeatures, num_tokens: int) -> CompressorOutput:
        raise NotImplementedError


class IdentityCompressor(Compressor):
    """No compression: every patch feature goes to the projector (LLaVA-1.5's connector)."""

    def __init__(self, in_dim: int, num_patches: int):
        super().__init__()
        self.in_dim = self.out_dim = in_dim
        self.max_tokens = num_patches

    def compress(self, features: VisionFeatures, num_tokens: int) -> CompressorOutput:
        if features.patches.shape[1] != self.max_tokens:
            raise ValueError(
                f"IdentityCompressor expects {self.max_tokens} patches, got {features.patches.shape[1]}"
            )
        return CompressorOutput(features.patches)
