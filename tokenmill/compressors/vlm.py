"""VLM assembly: vision tower -> compressor -> projector -> causal LM through `inputs_embeds`.

The collated text holds one `IMAGE_TOKEN_INDEX` placeholder per sample (LLaVA's convention);
`build_inputs` splices in however many image embeddings the compressor emitted (plus VoCo's
compression tokens when configured), masks the labels of image positions, right-pads, and
builds the attention mask: 2D normally, VoCo's 4D mask otherwise.

The compressor and projector form the *connector*: the part stage 1 trains and the part the
next stage loads (`VisualConnector`, exported with save_pretrained and as LLaVA's
mm_projector.bin).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.data.text import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tokenmill.export.pretrained import PretrainedMixin

from .base import Compressor
from .voco import IMAGE, TEXT_AFTER, TEXT_BEFORE, VOCO, VoCo, check_attn_implementation, voco_attention_mask


class VisualConnector(PretrainedMixin, nn.Module):
    """compressor + projector: what turns vision features into LLM input embeddings."""

    def __init__(self, compressor: Compressor, projector: nn.Module):
        super().__init__()
        if compressor.out_dim != projector.in_dim:
            raise ValueError(
                f"projector input width {projector.in_dim} != compressor output width {compressor.out_dim}"
            )
        self.compressor = compressor
        self.projector = projector

    @property
    def in_dim(self) -> int:
        return self.compressor.in_dim

    @property
    def out_dim(self) -> int:
        return self.projector.out_dim


@dataclass
class VLMInputs:
    """What the LLM receives for one batch (right-padded)."""

    inputs_embeds: Tensor  # [B, L, H]
    attention_mask: Tensor  # [B, L] (1 = token) or VoCo's additive [B, 1, L, L]
    position_ids: Tensor  # [B, L]
    labels: Tensor  # [B, L], IGNORE_INDEX outside the answers
    segments: Tensor  # [B, L] TEXT_BEFORE / IMAGE / VOCO / TEXT_AFTER
    padding_mask: Tensor  # [B, L] bool, True on real tokens


@dataclass
class VLMOutput:
    loss: Tensor
    logits: Tensor
    labels: Tensor
    num_image_tokens: int
    losses: dict[str, Tensor] = field(default_factory=dict)


def shifted_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token loss: position t predicts labels[t + 1]; mean over supervised tokens."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def answer_exact_match(logits: Tensor, labels: Tensor) -> Tensor:
    """bool [B]: every supervised token is the argmax of the previous position's logits.

    Under teacher forcing this equals greedy decoding reproducing the whole answer (and its end
    of sequence token), in one forward pass.
    """
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    correct = (logits[:, :-1].argmax(-1) == targets) | ~supervised
    return correct.all(dim=1) & supervised.any(dim=1)


class VisionLanguageModel(PretrainedMixin, nn.Module):
    """vision -> connector (compressor -> projector) -> language model.

    Args:
        vision: an `HFVisionEncoder` (or any module mapping [B,3,H,W] in [0,1] to VisionFeatures).
        connector: `VisualConnector(compressor, projector)`.
        language_model: a `CausalLanguageModel`.
        voco: `VoCo(num_tokens)` to compress inside the LLM (VoCo-LLaMA); the compressor then
            usually passes every patch through.
    """

    def __init__(self, vision: nn.Module, connector: VisualConnector, language_model: nn.Module, voco: VoCo | None = None):
        super().__init__()
        if vision.out_dim != connector.in_dim:
            raise ValueError(
                f"compressor input width {connector.in_dim} != vision encoder width {vision.out_dim}"
            )
        if connector.out_dim != language_model.hidden_size:
            raise ValueError(
                f"projector output width {connector.out_dim} != language model hidden size "
                f"{language_model.hidden_size}"
            )
        self.vision = vision
        self.connector = connector
        self.language_model = language_model
        self.voco = voco
        if voco is not None:
            check_attn_implementation(language_model.model.config)  # the 4D mask needs eager or sdpa
            voco.add_to_tokenizer(language_model.tokenizer)
            language_model.resize_vocabulary()

    @property
    def compressor(self) -> Compressor:
        return self.connector.compressor

    def encode_images(self, pixel_values: Tensor, num_tokens: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """[B, 3, H, W] in [0, 1] -> image embeddings [B, m, hidden] for the LLM (+ compressor losses)."""
        features = self.vision(pixel_values)
        out = self.compressor(features, num_tokens=num_tokens)
        return self.connector.projector(out.tokens), out.losses

    def build_inputs(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor, image_embeds: Tensor) -> VLMInputs:
        text_embeds = self.language_model.embed(input_ids.clamp(min=0))
        voco_embeds = None
        if self.voco is not None:
            voco_embeds = self.language_model.embed(self.voco.token_id_tensor(input_ids.device))
        rows = []
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].bool()
            ids, labs, emb = input_ids[b][real], labels[b][real], text_embeds[b][real]
            slots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
            if len(slots) != 1:
                raise ValueError(f"sample {b} has {len(slots)} image placeholders ({IMAGE_TOKEN_INDEX}); expected 1")
            p = int(slots[0])
            pieces = [(emb[:p], labs[:p], TEXT_BEFORE), (image_embeds[b], None, IMAGE)]
            if voco_embeds is not None:
                pieces.append((voco_embeds, None, VOCO))
            pieces.append((emb[p + 1 :], labs[p + 1 :], TEXT_AFTER))
            rows.append(pieces)
        return self._pad(rows, image_embeds)

    def _pad(self, rows: list, like: Tensor) -> VLMInputs:
        lengths = [sum(len(piece[0]) for piece in row) for row in rows]
        batch, length, hidden = len(rows), max(lengths), like.shape[-1]
        embeds = like.new_zeros(batch, length, hidden)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=like.device)
        segments = torch.full((batch, length), TEXT_AFTER, dtype=torch.long, device=like.device)
        padding = torch.zeros(batch, length, dtype=torch.bool, device=like.device)
        for b, row in enumerate(rows):
            embeds[b, : lengths[b]] = torch.cat([piece[0].to(like.dtype) for piece in row])
            start = 0
            for values, labs, segment in row:
                end = start + len(values)
                if labs is not None:
                    labels[b, start:end] = labs
                segments[b, start:end] = segment
                start = end
            padding[b, : lengths[b]] = True
        position_ids = (padding.long().cumsum(1) - 1).clamp(min=0)
        if self.voco is not None:
            mask = voco_attention_mask(segments, padding.long(), embeds.dtype)
        else:
            mask = padding.long()
        return VLMInputs(embeds, mask, position_ids, labels, segments, padding)

    def forward(self, batch: dict, num_tokens: int | None = None) -> VLMOutput:
        image_embeds, losses = self.encode_images(batch["pixel_values"], num_tokens)
        inputs = self.build_inputs(batch["input_ids"], batch["labels"], batch["attention_mask"], image_embeds)
        logits = self.language_model(
            inputs.inputs_embeds, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
        ).logits
        loss = shifted_cross_entropy(logits, inputs.labels)
        return VLMOutput(loss, logits, inputs.labels, image_embeds.shape[1], losses)
