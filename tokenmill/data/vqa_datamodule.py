"""``VQADataModule``: image + conversation batches for the VLM stage.

Batches::

    {"pixel_values": float32 [B, 3, H, W] in [0, 1] (the vision tower normalises),
     "input_ids": long [B, L], right-padded with the tokenizer's pad id, one IMAGE_TOKEN_INDEX per row,
     "labels": long [B, L], IGNORE_INDEX on system/question/image/padding positions,
     "attention_mask": long [B, L], 1 on real tokens,
     "question_type": list[str], "answer": list[str], "key": list[str],
     "num_skipped": long scalar}

``num_skipped`` counts samples of the batch that were dropped (image missing or undecodable,
conversation too long to keep its image placeholder), so B may be smaller than the batch size.
Training uses the resumable, DDP-sharded loader of :mod:`tokenmill.data.loaders`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .datamodule_base import SkippingDataModule
from .decode import ImageDecodeError, decode_image
from .samples import SKIPPED_FIELD, skipped_sample
from .text import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, ConversationTemplate, ConversationTooLong
from .transforms import crop_resize, shorter_edge_crop_box

logger = logging.getLogger(__name__)

# OpenAI CLIP's normalisation mean: LLaVA pads with it so the padding is zero after normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


class VQAImageTransform:
    """RGB image -> float32 [3, size, size] in [0, 1].

    ``pad_to_square`` (LLaVA's "pad" aspect mode) centres the image on a square canvas of
    ``pad_color`` (three floats in [0, 1], or ``"image"`` for the image's own mean colour) and
    resizes it (bicubic); otherwise the shorter edge is resized and the centre square kept.
    """

    def __init__(
        self, image_size: int, pad_to_square: bool = True, pad_color: Sequence[float] | str = CLIP_MEAN
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if isinstance(pad_color, str):
            if pad_color != "image":
                raise ValueError(f"pad_color must be three floats in [0, 1] or 'image', got {pad_color!r}")
        elif len(pad_color) != 3 or not all(0.0 <= float(c) <= 1.0 for c in pad_color):
            raise ValueError(f"pad_color must be three floats in [0, 1] or 'image', got {pad_color!r}")
        self.image_size = int(image_size)
        self.pad_to_square = bool(pad_to_square)
        self.pad_color = pad_color if isinstance(pad_color, str) else tuple(float(c) for c in pad_color)

    def _fill(self, image: Image.Image) -> tuple[int, int, int]:
        if self.pad_color == "image":
            mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
            return tuple(int(round(v)) for v in mean)  # type: ignore[return-value]
        return tuple(int(round(255 * c)) for c in self.pad_color)  # type: ignore[return-value]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        size = self.image_size
        if self.pad_to_square:
            if width != height:
                side = max(width, height)
                canvas = Image.new("RGB", (side, side), self._fill(image))
                canvas.paste(image, ((side - width) // 2, (side - height) // 2))
                image = canvas
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
        else:
            image = crop_resize(image, shorter_edge_crop_box(width, height, size, None), size)
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class VQADataset(Dataset):
    """Source item -> ``{"image": pixel tensor, "input_ids", "labels", "question_type", "answer",
    "key", "error"}``, or a skipped sample (``image=None`` and the reason).

    Accepts ``(epoch, index)`` from :class:`EpochShardSampler` or a bare index. Nothing here is
    random, so a sample depends only on the source item.
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Any,
        template: ConversationTemplate,
        transform: VQAImageTransform,
        max_length: int | None,
    ) -> None:
        self.source = source
        self.tokenizer = tokenizer
        self.template = template
        self.transform = transform
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        _, index = item if isinstance(item, tuple) else (0, item)
        sample = self.source[index]
        key = str(sample["key"])
        image = sample.get("image")
        if image is None:
            return skipped_sample(key, sample.get("error") or "sample has no image")
        try:
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            image = decode_image(image)
        except (ImageDecodeError, TypeError, ValueError) as error:
            return skipped_sample(key, f"{type(error).__name__}: {error}")
        try:
            input_ids, labels = self.template.tokenize(
                sample["conversation"], self.tokenizer, self.max_length
            )
        except ConversationTooLong as error:
            return skipped_sample(key, str(error))
        placeholders = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        if placeholders != 1:
            return skipped_sample(
                key, f"conversation has {placeholders} {IMAGE_TOKEN} placeholders, expected 1"
            )
        return {
            "image": self.transform(image),
            "input_ids": input_ids,
            "labels": labels,
            "question_type": str(sample.get("question_type", "")),
            "answer": str(sample.get("answer", "")),
            "key": key,
            "error": None,
        }


class VQACollate:
    """Stack images, right-pad token rows, count and list the dropped samples."""

    def __init__(self, pad_token_id: int, image_size: int) -> None:
        self.pad_token_id = int(pad_token_id)
        self.image_size = int(image_size)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        kept = [sample for sample in samples if sample["image"] is not None]
        skipped = [(sample["key"], sample["error"]) for sample in samples if sample["image"] is None]
        length = max((len(sample["input_ids"]) for sample in kept), default=0)
        input_ids = torch.full((len(kept), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(kept), length), dtype=torch.long)
        for row, sample in enumerate(kept):
            size = len(sample["input_ids"])
            input_ids[row, :size] = sample["input_ids"]
            labels[row, :size] = sample["labels"]
            attention_mask[row, :size] = 1
        if kept:
            pixel_values = torch.stack([sample["image"] for sample in kept])
        else:
            pixel_values = torch.empty(0, 3, self.image_size, self.image_size)
        return {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "question_type": [sample["question_type"] for sample in kept],
            "answer": [sample["answer"] for sample in kept],
            "key": [sample["key"] for sample in kept],
            "num_skipped": torch.tensor(len(skipped), dtype=torch.long),
            SKIPPED_FIELD: skipped,
        }


class VQADataModule(SkippingDataModule):
    """Map-style VQA sources (:class:`~tokenmill.data.vqa.SyntheticVQA`,
    :class:`~tokenmill.data.llava.LLaVAJsonSource`, or any indexable of the same item dicts)
    tokenized with ``template`` and ``tokenizer`` (an instantiated tokenizer object).

    ``seed`` drives the training order (and the loader's worker seeds); sources carry their own
    seeds. ``max_length`` truncates token rows (see :meth:`ConversationTemplate.tokenize`).
    """

    def __init__(
        self,
        train_source: Any,
        val_source: Any | None,
        tokenizer: Any,
        template: ConversationTemplate | None = None,
        image_size: int = 336,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        max_length: int | None = 2048,
        pad_to_square: bool = True,
        pad_color: Sequence[float] | str = CLIP_MEAN,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        for name, source in (("train_source", train_source), ("val_source", val_source)):
            if source is not None and not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
                raise TypeError(
                    f"{name} must be a map-style source (len + indexing), got {type(source).__name__}"
                )
        if train_source is None or len(train_source) == 0:
            raise ValueError("train_source has no samples")
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(
                "the tokenizer has no pad token; use tokenmill.data.text.load_tokenizer (sets one) "
                "or set tokenizer.pad_token"
            )
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("the tokenizer has no eos token; answers must end with one")
        if batch_size <= 0 or (val_batch_size is not None and val_batch_size <= 0):
            raise ValueError(
                f"batch sizes must be positive, got batch_size={batch_size}, val_batch_size={val_batch_size}"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be positive (or None), got {max_length}")
        self.train_source = train_source
        self.val_source = val_source if val_source is not None and len(val_source) > 0 else None
        self.tokenizer = tokenizer
        self.template = template if template is not None else ConversationTemplate()
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.max_length = int(max_length) if max_length is not None else None
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.transform = VQAImageTransform(self.image_size, pad_to_square, pad_color)
        self.collate = VQACollate(tokenizer.pad_token_id, self.image_size)
        self.train_dataset: VQADataset | None = None
        self.val_dataset: VQADataset | None = None

    def _dataset(self, source: Any) -> VQADataset:
        return VQADataset(source, self.tokenizer, self.template, self.transform, self.max_length)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.train_dataset = self._dataset(self.train_source)
        self.val_dataset = self._dataset(self.val_source) if self.val_source is not None else None

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._map_train_loader(self.train_dataset)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            logger.info("VQADataModule has no validation source; validation is skipped")
            return []
        return self._map_val_loader(self.val_dataset)
