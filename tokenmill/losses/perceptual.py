"""LPIPS-style perceptual distance with a pluggable feature network.

The distance follows Zhang et al. 2018 ("The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric"): images in [-1, 1] are shifted/scaled towards
ImageNet statistics, passed through a frozen backbone, each tapped feature map is
unit-normalised along channels, the squared difference between the two images is
weighted per channel by a non-negative 1x1 "linear head", averaged over space and
summed over taps.

State-dict layout of :class:`LPIPS` (what ``weights_path`` must contain, nothing more)::

    net.features.<idx>.weight / .bias   backbone convs, idx in 0,2,5,7,10,12,14,17,19,21,24,26,28
                                        (same indices as torchvision's ``vgg16().features``)
    lin<k>.weight                       head k, shape [1, C_k, 1, 1], k = 0..4

The scaling-layer constants are non-persistent buffers, so they are not part of the file.
``scripts/convert_lpips_weights.py`` builds such a file from a torchvision VGG-16
state dict plus the official LPIPS ``vgg.pth`` heads.

No pretrained weights ship with tokenmill. Without ``weights_path`` the backbone and
heads keep their random initialisation; the module still behaves like a distance
(zero on identical inputs, symmetric, differentiable) which is what CPU tests need,
but it is not a trained perceptual metric and a warning says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn

LPIPS_CHANNELS = (64, 128, 256, 512, 512)

# Scaling-layer constants LPIPS applies to [-1, 1] inputs: (x - shift) / scale is
# approximately ImageNet mean/std normalisation of the equivalent [0, 1] image.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)

# Guards the channel normalisation against all-zero feature vectors (dead ReLUs).
_NORMALISE_EPS = 1e-10

# VGG-16 "D" configuration: conv output widths, "M" = 2x2 max-pool.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class RandomWeightsWarning(UserWarning):
    """The perceptual network runs with random weights (no ``weights_path`` given)."""


class VGG16Features(nn.Module):
    """VGG-16 convolutional trunk returning the five LPIPS taps.

    Submodules live in ``self.features`` at the same indices as torchvision's
    ``vgg16().features`` so a torchvision state dict maps onto it key for key.
    The trunk stops after relu5_3 (index 29); the final max-pool has no weights and
    no tap after it, so it is omitted.
    """

    # Indices (in ``features``) of the ReLUs whose outputs are the taps:
    # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
    TAP_INDICES = (3, 8, 15, 22, 29)
    CHANNELS = LPIPS_CHANNELS

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(nn.Conv2d(in_channels, item, kernel_size=3, padding=1))
                # Not in-place: the tapped activations must survive the next layer.
                layers.append(nn.ReLU(inplace=False))
                in_channels = item
        self.features = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps: list[torch.Tensor] = []
        last_tap = self.TAP_INDICES[-1]
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.TAP_INDICES:
                taps.append(x)
            if index == last_tap:
                break
        return taps


def _normalise_channels(features: torch.Tensor) -> torch.Tensor:
    norm = torch.sqrt(torch.sum(features * features, dim=1, keepdim=True))
    return features / (norm + _NORMALISE_EPS)


class LPIPS(nn.Module):
    """Learned perceptual distance between images in [-1, 1].

    Args:
        backbone: feature network returning a list of ``len(channels)`` feature maps
            [B, C_k, H_k, W_k]. Defaults to :class:`VGG16Features`.
        weights_path: ``.safetensors`` (preferred) or ``.pt``/``.pth`` file holding the
            full state dict (backbone + heads, layout in the module docstring). Loaded
            strictly. ``None`` keeps random weights and warns once.
        channels: channel count of each tap, one linear head per tap.

    ``distance(x, y)`` returns the per-image distance [B]; ``forward`` its batch mean.
    Parameters are frozen and the module stays in eval mode, but gradients flow to
    the input images so it can serve as a training loss.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        weights_path: str | None = None,
        channels: Sequence[int] = LPIPS_CHANNELS,
    ) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"LPIPS channels must be a non-empty list of positive ints, got {channels!r}")
        self.net = backbone if backbone is not None else VGG16Features()
        for k, width in enumerate(self.channels):
            head = nn.Conv2d(width, 1, kernel_size=1, bias=False)
            # Uniform non-negative weights: with random features this makes the
            # distance a plain average of normalised squared differences.
            nn.init.constant_(head.weight, 1.0 / width)
            self.add_module(f"lin{k}", head)
        shift = torch.tensor(_LPIPS_SHIFT, dtype=torch.float32).view(1, 3, 1, 1)
        scale = torch.tensor(_LPIPS_SCALE, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

        if weights_path is None:
            warnings.warn(
                "LPIPS was built without weights_path: backbone and linear heads keep their random "
                "initialisation, so the perceptual loss is NOT a trained perceptual metric. Pass a "
                "weights file made by scripts/convert_lpips_weights.py for real training.",
                RandomWeightsWarning,
                stacklevel=2,
            )
        else:
            self.load_weights(weights_path)

        self.requires_grad_(False)
        self.eval()

    @property
    def heads(self) -> list[nn.Conv2d]:
        return [getattr(self, f"lin{k}") for k in range(len(self.channels))]

    def train(self, mode: bool = True) -> LPIPS:
        # A fixed metric: dropout/batch-norm in a plugged backbone must never switch to
        # training behaviour when the surrounding LightningModule calls .train().
        return super().train(False)

    def load_weights(self, weights_path: str | Path) -> None:
        """Strictly load a full state dict (backbone + heads) from ``weights_path``."""
        state = _read_state_dict(Path(weights_path))
        check_state_dict(state, self.state_dict(), source=str(weights_path))
        for k in range(len(self.channels)):
            key = f"lin{k}.weight"
            if bool((state[key] < 0).any()):
                raise ValueError(
                    f"{weights_path}: {key} has negative entries; LPIPS heads must be non-negative "
                    "so the distance cannot go below zero"
                )
        self.load_state_dict(dict(state), strict=True)

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image perceptual distance [B] between ``x`` and ``y`` (both [B, 3, H, W] in [-1, 1])."""
        if x.shape != y.shape:
            raise ValueError(
                f"LPIPS inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects images [B, 3, H, W], got shape {tuple(x.shape)}")
        if y.requires_grad:
            # Both sides need gradients: one backbone pass over the pair.
            taps = self._taps(torch.cat([x, y], dim=0))
            taps_x, taps_y = [t[: x.shape[0]] for t in taps], [t[x.shape[0] :] for t in taps]
        else:
            # The usual loss case (y is the real image): its features need no autograd graph,
            # which saves the backward through the backbone for half the batch (~1/4 of LPIPS cost).
            taps_x = self._taps(x)
            with torch.no_grad():
                taps_y = self._taps(y)
        total = x.new_zeros(x.shape[0])
        for tx, ty, head in zip(taps_x, taps_y, self.heads, strict=True):
            total = total + head((_normalise_channels(tx) - _normalise_channels(ty)) ** 2).mean(dim=(1, 2, 3))
        return total

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        taps = self.net((images - self.shift) / self.scale)
        if len(taps) != len(self.channels):
            raise ValueError(
                f"LPIPS backbone returned {len(taps)} feature maps, expected {len(self.channels)}"
            )
        for k, tap in enumerate(taps):
            if tap.shape[1] != self.channels[k]:
                raise ValueError(
                    f"LPIPS backbone tap {k} has {tap.shape[1]} channels, expected {self.channels[k]}"
                )
        return list(taps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(x, y).mean()


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS weights file not found: {path}. Create one with "
            "`python scripts/convert_lpips_weights.py --vgg <torchvision vgg16 .pth> "
            f"--lin <LPIPS vgg.pth> --out {path}`"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if suffix in (".pt", ".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle errors come in many types; re-raise with the file named
            raise ValueError(
                f"{path}: could not be read with torch.load(weights_only=True) ({error}); "
                "save a plain state dict of tensors or convert it to .safetensors"
            ) from error
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: expected a flat state dict of tensors, got {type(state).__name__}")
        return state
    raise ValueError(f"{path}: unsupported weights format {suffix!r}; expected .safetensors, .pt or .pth")


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    source: str,
    max_listed: int = 5,
) -> None:
    """Raise ValueError listing missing/unexpected keys and shape mismatches (first few of each)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            shown = ", ".join(items[:max_listed])
            more = f" (+{len(items) - max_listed} more)" if len(items) > max_listed else ""
            problems.append(f"{len(items)} {label}: {shown}{more}")
    if problems:
        raise ValueError(f"{source}: state dict does not match the LPIPS layout; " + "; ".join(problems))


class PerceptualLoss(nn.Module):
    """Scalar perceptual loss around any distance network ``network(pred, target)``.

    The network is built by Hydra (``_target_``), so another metric can be plugged in
    without code changes; it is treated as fixed (frozen, eval mode). It runs in fp32
    with autocast off: feature normalisation divides by small norms, which is
    unstable in bf16/fp16.
    """

    def __init__(self, network: nn.Module | None = None) -> None:
        super().__init__()
        self.network = network if network is not None else LPIPS()
        self.network.requires_grad_(False)
        self.network.eval()
        self.network.float()

    def _apply(self, fn, recurse=True):
        # Lightning's "bf16-true"/"16-true" precision casts the whole LightningModule to
        # half precision. A rounded perceptual network is a different (and less stable)
        # metric, so dtype casts are reduced to the device move they carry.
        reference = next(iter(self.network.parameters()), None)
        if reference is None:
            reference = next(iter(self.network.buffers()), None)
        if reference is not None:
            probe = fn(torch.zeros((), dtype=torch.float32, device=reference.device))
            if probe.dtype != torch.float32:
                device = probe.device
                return super()._apply(lambda t: t.to(device=device), recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.network.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            value = self.network(pred.float(), target.float())
        # Networks that return a per-image distance are reduced to the batch mean.
        return value.mean() if value.dim() > 0 else value
