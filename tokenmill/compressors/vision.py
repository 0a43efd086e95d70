"""Vision towers for the VLM stage: any Hugging Face ViT (CLIP, SigLIP) by name or by config.

The tower runs the ViT layer by layer instead of calling the model's `forward`, because the
compressors need more than the last hidden state: LLaVA takes the penultimate layer without the
class token, TokenPacker reads several layers, [CLS]-attention pruning reads the class token's
attention, and FALCON-style registers are extra tokens that must pass through every layer.

Images arrive as float [B, 3, H, W] in [0, 1]; the tower applies its own mean/std (CLIP's by
default), so the data pipeline never needs to know which encoder follows.

Several crops of one image (e.g. the sub-images of a high-resolution image) arrive as
[B, C, 3, H, W]. By default the crops are folded into the batch and encoded independently. With
`cross_crop_registers` (FALCON's ReAtten), the C crops of one image run through each layer as a
single sequence of C * (prefix + N + R) tokens under an additive attention mask: every token sees
its own crop, and register tokens also see the registers of the image's other crops, so the
register representation stays continuous across crops while patches never see another crop.
Multi-crop outputs concatenate the crops in order: patches [B, C*N, D] on the grid (C*h, w)
(crops stacked vertically, each row-major), registers [B, C*R, D], cls [B, C, D].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokenmill.export.pretrained import PretrainedMixin

from .base import VisionFeatures

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _vision_config(name_or_path: str | None, config: dict | None, model_type: str):
    from transformers import CONFIG_MAPPING, AutoConfig

    if config is not None:
        config = dict(config)
        config_type = config.pop("model_type", model_type)
        return CONFIG_MAPPING[config_type](**config)
    loaded = AutoConfig.from_pretrained(name_or_path)
    return getattr(loaded, "vision_config", loaded)  # a full CLIP/SigLIP checkpoint: its vision half


def build_hf_vision_model(name_or_path: str | None, config: dict | None, model_type: str) -> nn.Module:
    """A CLIPVisionModel / SiglipVisionModel / ... from a hub name (pretrained) or a config dict."""
    from transformers import AutoModel

    if (name_or_path is None) == (config is None):
        raise ValueError("HFVisionEncoder needs exactly one of name_or_path (pretrained) or config (random init)")
    vision_config = _vision_config(name_or_path, config, model_type)
    model_class = AutoModel._model_mapping[type(vision_config)]
    if name_or_path is None:
        return model_class(vision_config)
    try:
        return model_class.from_pretrained(name_or_path, config=vision_config)
    except OSError as error:
        raise OSError(f"could not load the vision encoder {name_or_path!r}: {error}") from error


class HFVisionEncoder(PretrainedMixin, nn.Module):
    """A Hugging Face ViT as a feature extractor returning `VisionFeatures`.

    Args:
        name_or_path: hub id or local directory of pretrained weights (e.g.
            "openai/clip-vit-large-patch14-336"); or
        config: a vision config dict (random init; tests and the CPU task use this), with
            `model_type` e.g. "clip_vision_model" or "siglip_vision_model".
        select_layer: which hidden state feeds the compressor, Hugging Face numbering (0 = the
            embeddings, -1 = the last layer); LLaVA uses -2.
        extra_layers: further hidden states to return in `VisionFeatures.layers` (TokenPacker).
        num_registers: learnable register tokens appended after the patches before the first
            layer (FALCON-style visual registers); their outputs are `VisionFeatures.registers`.
        with_cls_attention: also return the class token's attention over patches in the selected
            layer ([CLS]-attention pruning); costs one extra q/k product.
        cross_crop_registers: for multi-crop input [B, C, 3, H, W], let the registers of all C
            crops of an image attend to each other in every layer (FALCON's ReAtten); needs
            num_registers > 0. Without it crops are encoded independently.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict | None = None,
        model_type: str = "clip_vision_model",
        select_layer: int = -2,
        extra_layers: list[int] | None = None,
        num_registers: int = 0,
        with_cls_attention: bool = False,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
        cross_crop_registers: bool = False,
    ):
        super().__init__()
        if cross_crop_registers and not num_registers:
            raise ValueError("cross_crop_registers needs register tokens: set num_registers > 0")
        self.name_or_path = name_or_path
        self.model = build_hf_vision_model(name_or_path, config, model_type)
        cfg = self.model.config
        self.hidden_size = cfg.hidden_size
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.grid = (cfg.image_size // cfg.patch_size,) * 2
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_layers = cfg.num_hidden_layers
        self.select_layer = self._layer_index(select_layer)
        self.extra_layers = [self._layer_index(i) for i in (extra_layers or [])]
        self.with_cls_attention = with_cls_attention
        # CLIP prepends a class token; SigLIP has none.
        self.num_prefix_tokens = 1 if hasattr(self.model.embeddings, "class_embedding") else 0
        self.num_registers = num_registers
        self.registers = nn.Parameter(torch.randn(num_registers, self.hidden_size) * 0.02) if num_registers else None
        self.cross_crop_registers = cross_crop_registers
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def out_dim(self) -> int:
        return self.hidden_size

    def no_weight_decay(self) -> set[str]:
        """Learned tokens take no weight decay (read by tokenmill.trainers.optim)."""
        return {"registers"} if self.registers is not None else set()

    def _layer_index(self, index: int) -> int:
        resolved = index if index >= 0 else self.num_layers + 1 + index
        if not 0 <= resolved <= self.num_layers:
            raise ValueError(f"layer {index} out of range for a {self.num_layers}-layer vision encoder")
        return resolved

    def portable_config(self, node: dict) -> dict:
        """Exports carry the weights, so record the architecture instead of a hub name."""
        node = dict(node)
        node["name_or_path"] = None
        node["config"] = self.model.config.to_diff_dict() | {"model_type": self.model.config.model_type}
        return node

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    def embed(self, pixel_values: Tensor, use_registers: bool = True) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> input tokens of the first layer: [prefix, patches, registers].

        use_registers=False leaves the registers out: the tower as it was before they were added
        (PH-Reg's teacher view of a student)."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"vision encoder expects {self.image_size}x{self.image_size} images, got "
                f"{tuple(pixel_values.shape[-2:])}"
            )
        x = (pixel_values - self.image_mean) / self.image_std
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        tokens = self.model.embeddings(x.to(dtype))
        if self.registers is not None and use_registers:
            tokens = torch.cat([tokens, self.registers.to(tokens.dtype).expand(tokens.shape[0], -1, -1)], dim=1)
        pre_norm = getattr(self.model, "pre_layrnorm", None)  # CLIP normalises before layer 0
        return pre_norm(tokens) if pre_norm is not None else tokens

    def run_layers(self, tokens: Tensor, last: int, attention_mask: Tensor | None = None) -> list[Tensor]:
        """Hidden states 0..last (0 = the embeddings), Hugging Face's numbering.

        attention_mask: optional additive mask [B or 1, 1, L, L] passed to every layer."""
        hidden = [tokens]
        for layer in self.layers[:last]:
            tokens = layer(tokens, attention_mask)
            hidden.append(tokens)
        return hidden

    def split(
        self, hidden: Tensor, num_registers: int | None = None
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """[B, prefix + N + R, D] -> (cls, patches, registers); R = num_registers (default: the tower's)."""
        p, n = self.num_prefix_tokens, self.num_patches
        r = self.num_registers if num_registers is None else num_registers
        cls = hidden[:, 0] if p else None
        registers = hidden[:, p + n :] if r else None
        return cls, hidden[:, p : p + n], registers

    def cls_attention(self, layer_input: Tensor, layer: nn.Module) -> Tensor:
        """Class-token attention over patches in `layer`, averaged over heads: [B, N]."""
        if not self.num_prefix_tokens:
            raise ValueError(f"{type(self.model).__name__} has no class token, so no [CLS] attention")
        attn = layer.self_attn
        x = layer.layer_norm1(layer_input)
        b, length, _ = x.shape
        heads = attn.num_heads
        q = attn.q_proj(x[:, :1]).view(b, 1, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).view(b, length, heads, -1).transpose(1, 2)
        weights = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)  # [B, heads, 1, L]
        return weights.mean(1)[:, 0, 1 : 1 + self.num_patches]

    def cross_crop_attention_mask(
        self, num_crops: int, num_registers: int | None = None, dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Additive mask [1, 1, C*L, C*L] over the crops of one image, L = prefix + N + R.

        0 where attention is allowed, the dtype's minimum where it is not: a token sees every
        token of its own crop, and a register also sees the registers of the other crops."""
        r = self.num_registers if num_registers is None else num_registers
        length = self.num_prefix_tokens + self.num_patches + r
        position = torch.arange(num_crops * length, device=device)
        crop = position // length
        is_register = (position % length) >= length - r if r else torch.zeros_like(position, dtype=torch.bool)
        allowed = (crop[:, None] == crop[None, :]) | (is_register[:, None] & is_register[None, :])
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    def forward(self, pixel_values: Tensor, use_registers: bool = True) -> VisionFeatures:
        """[B, 3, H, W] or multi-crop [B, C, 3, H, W] in [0, 1] -> VisionFeatures (see the module
        docstring for the multi-crop layout). use_registers=False runs the tower without its
        registers (`registers` is then None)."""
        if pixel_values.dim() not in (4, 5):
            raise ValueError(
                f"expected images [B, 3, H, W] or crops [B, C, 3, H, W], got {tuple(pixel_values.shape)}"
            )
        num_crops = pixel_values.shape[1] if pixel_values.dim() == 5 else None
        batch = pixel_values.shape[0]
        r = self.num_registers if use_registers else 0
        last = max([self.select_layer, *self.extra_layers])
        tokens = self.embed(pixel_values.flatten(0, 1) if num_crops else pixel_values, use_registers)
        if num_crops and num_crops > 1 and r and self.cross_crop_registers:
            length, width = tokens.shape[1:]
            mask = self.cross_crop_attention_mask(num_crops, r, tokens.dtype, tokens.device)
            joint = tokens.reshape(batch, num_crops * length, width)
            hidden = self.run_layers(joint, last, mask.expand(batch, -1, -1, -1))
            hidden = [h.reshape(batch * num_crops, length, width) for h in hidden]
        else:
            hidden = self.run_layers(tokens, last)
        cls, patches, registers = self.split(hidden[self.select_layer], r)
        cls_attention = None
        if self.with_cls_attention:
            if self.select_layer == 0:
                raise ValueError("with_cls_attention needs select_layer >= 1")
            layer = self.layers[self.select_layer - 1]
            # the class token only ever sees its own crop, so per-crop rows are exact
            cls_attention = self.cls_attention(hidden[self.select_layer - 1], layer)
        layers = {i: self.split(hidden[i], r)[1] for i in self.extra_layers}
        grid = self.grid
        if num_crops:
            def fold(x: Tensor | None) -> Tensor | None:  # [B*C, n, ...] -> [B, C*n, ...]
                return None if x is None else x.reshape(batch, num_crops * x.shape[1], *x.shape[2:])

            patches, registers, cls_attention = fold(patches), fold(registers), fold(cls_attention)
            layers = {i: fold(v) for i, v in layers.items()}
            cls = None if cls is None else cls.reshape(batch, num_crops, -1)
            grid = (num_crops * self.grid[0], self.grid[1])
        return VisionFeatures(
            patches=patches,
            grid=grid,
            cls=cls,
            cls_attention=cls_attention,
            layers=layers,
            registers=registers,
        )

    def extra_repr(self) -> str:
        source: Any = self.name_or_path or "config"
        cross = ", cross_crop_registers=True" if self.cross_crop_registers else ""
        return (
            f"source={source}, grid={self.grid}, select_layer={self.select_layer}, "
            f"registers={self.num_registers}{cross}"
        )


class TokenizerVisionEncoder(PretrainedMixin, nn.Module):
    """A tokenmill 1D tokenizer's ViT encoder (TiTok, FlexTok, One-D-Piece) as the vision tower.

    Returns the encoder's final patch states on its grid (`features="patches"`), or its latent
    tokens' states as a 1 x K sequence (`features="latents"`), both before the bottleneck.

    Args:
        pretrained_path: a tokenizer export (save_pretrained directory); its encoder is used.
        encoder: an encoder module instead (how a VLM export rebuilds it; see portable_config).
    """

    def __init__(self, pretrained_path: str | None = None, encoder: nn.Module | None = None, features: str = "patches"):
        super().__init__()
        from tokenmill.export.pretrained import from_pretrained, model_config

        if (pretrained_path is None) == (encoder is None):
            raise ValueError("TokenizerVisionEncoder needs exactly one of pretrained_path or encoder")
        if features not in ("patches", "latents"):
            raise ValueError(f"features must be 'patches' or 'latents', got {features!r}")
        self.encoder_config = None
        if pretrained_path is not None:
            tokenizer = from_pretrained(pretrained_path)
            encoder = tokenizer.encoder
            self.encoder_config = model_config(tokenizer)["encoder"]
        if not hasattr(encoder, "hidden_states"):
            raise TypeError(f"{type(encoder).__name__} has no hidden_states(); use a tokenmill ViT encoder")
        self.encoder = encoder
        self.features = features
        self.image_size = encoder.image_size
        self.out_dim = encoder.patch_embed.out_channels
        patches, latents = encoder.grid**2, encoder.num_latent_tokens
        self.grid = (encoder.grid, encoder.grid) if features == "patches" else (1, latents)
        self.num_patches = patches if features == "patches" else latents
        self.with_cls_attention = False  # no class token

    def portable_config(self, node: dict) -> dict:
        node = dict(node)
        if self.encoder_config is not None:
            node["pretrained_path"] = None
            node["encoder"] = self.encoder_config
        return node

    def forward(self, pixel_values: Tensor) -> VisionFeatures:
        if self.with_cls_attention:
            raise ValueError("a tokenizer encoder has no class token: [CLS]-attention pruning does not apply")
        states = self.encoder.hidden_states(pixel_values * 2 - 1)  # tokenizers take [-1, 1]
        patches = self.encoder.grid**2
        chosen = states[:, :patches] if self.features == "patches" else states[:, patches:]
        return VisionFeatures(patches=chosen, grid=self.grid)
