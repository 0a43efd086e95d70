"""LLaVA-format instruction data (``llava_v1_5_mix665k.json``, ``blip_laion_cc_sbu_558k.json``, ...).

The JSON (or JSON Lines) file is a list of::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

Every entry is validated when the source is built, so a malformed file fails at once with the
file, the entry index and what is wrong. Entries are then kept as one byte buffer plus offsets
rather than Python objects, so forked data-loader workers do not copy them page by page.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .decode import ImageDecodeError, decode_image
from .text import GPT, HUMAN, IMAGE_TOKEN

logger = logging.getLogger(__name__)


class LLaVAFormatError(ValueError):
    """The annotation file is not valid LLaVA format; the message names file, entry and key."""


def _read_entries(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        entries = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise LLaVAFormatError(
                    f"{path}: line {line_number} is not valid JSON: {error.msg}"
                ) from error
        return entries
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise LLaVAFormatError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from error
    if not isinstance(entries, list):
        raise LLaVAFormatError(f"{path}: expected a JSON list of entries, got a {type(entries).__name__}")
    return entries


def _normalise_entry(path: Path, index: int, entry: Any) -> dict[str, Any]:
    """Validated ``{"key", "image" (str or None), "conversations"}``; raises LLaVAFormatError."""
    if not isinstance(entry, dict):
        raise LLaVAFormatError(f"{path}: entry {index} is a {type(entry).__name__}, expected an object")
    where = f"{path}: entry {index}" + (f" (id={entry['id']!r})" if "id" in entry else "")
    if "conversations" not in entry:
        raise LLaVAFormatError(f"{where} is missing key 'conversations' (keys: {sorted(entry)})")
    turns = entry["conversations"]
    if not isinstance(turns, list) or not turns:
        raise LLaVAFormatError(f"{where}: 'conversations' must be a non-empty list")
    conversation = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise LLaVAFormatError(f"{where}: conversations[{position}] is not an object")
        for name in ("from", "value"):
            if name not in turn:
                raise LLaVAFormatError(
                    f"{where}: conversations[{position}] is missing key {name!r} (keys: {sorted(turn)})"
                )
        if turn["from"] not in (HUMAN, GPT):
            raise LLaVAFormatError(
                f"{where}: conversations[{position}] has from={turn['from']!r}; expected {HUMAN!r} or {GPT!r}"
            )
        if not isinstance(turn["value"], str):
            raise LLaVAFormatError(f"{where}: conversations[{position}] value is not a string")
        conversation.append({"from": turn["from"], "value": turn["value"]})
    # LLaVA's rule: a conversation that opens with the assistant loses that turn.
    if conversation[0]["from"] == GPT:
        conversation = conversation[1:]
    if conversation and conversation[-1]["from"] == HUMAN:
        conversation = conversation[:-1]  # an unanswered last question trains nothing
    for position, turn in enumerate(conversation):
        if turn["from"] != (HUMAN if position % 2 == 0 else GPT):
            raise LLaVAFormatError(f"{where}: turns must alternate {HUMAN!r}/{GPT!r}")
    if not conversation:
        raise LLaVAFormatError(f"{where} has no question with an answer")

    image = entry.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            raise LLaVAFormatError(f"{where}: {len(image)} images; only one image per entry is supported")
        image = image[0]
    if image is not None and not isinstance(image, str):
        raise LLaVAFormatError(f"{where}: 'image' must be a relative path string, got {type(image).__name__}")
    if image:
        # As LLaVA does: drop the placeholder wherever it is and put it at the start of the first question.
        for turn in conversation:
            turn["value"] = turn["value"].replace(IMAGE_TOKEN, "").strip()
        conversation[0]["value"] = f"{IMAGE_TOKEN}\n{conversation[0]['value']}"
    key = str(entry["id"]) if "id" in entry else f"{path.name}:{index}"
    return {"key": key, "image": image or None, "conversations": conversation}


class LLaVAJsonSource(Dataset):
    """Map-style source over a LLaVA annotation file and the folder its image paths are relative to.

    Items match :class:`~tokenmill.data.vqa.SyntheticVQA`: ``{"image": PIL RGB or None,
    "conversation", "question_type": "llava", "answer": first gpt value, "key", "error"}``.
    A missing or undecodable image gives ``image=None`` and ``error`` naming the file; the
    VQA datamodule drops, counts and logs such samples.

    Text-only entries (no ``image``) are left out when loading (their number is logged and kept
    in ``num_text_only``): every batch row carries exactly one image. ``limit`` keeps the first
    ``limit`` usable entries.
    """

    def __init__(
        self, json_path: str | Path, image_folder: str | Path | None = None, limit: int | None = None
    ):
        self.json_path = Path(json_path).expanduser()
        if not self.json_path.is_file():
            raise FileNotFoundError(f"LLaVA annotation file {str(self.json_path)!r} does not exist")
        self.image_folder = Path(image_folder).expanduser() if image_folder is not None else None
        blobs: list[bytes] = []
        self.num_text_only = 0
        for index, raw in enumerate(_read_entries(self.json_path)):
            entry = _normalise_entry(self.json_path, index, raw)
            if entry["image"] is None:
                self.num_text_only += 1
                continue
            if limit is None or len(blobs) < limit:
                blobs.append(json.dumps(entry, ensure_ascii=False).encode("utf-8"))
        if self.num_text_only:
            logger.info("%s: left out %d text-only entries", self.json_path, self.num_text_only)
        if not blobs:
            raise ValueError(f"{self.json_path} has no entries with an image")
        if self.image_folder is None:
            raise ValueError(f"{self.json_path} has image entries, so image_folder must be given")
        if not self.image_folder.is_dir():
            raise FileNotFoundError(f"image folder {str(self.image_folder)!r} does not exist")
        self._offsets = np.cumsum([0] + [len(blob) for blob in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def entry(self, index: int) -> dict[str, Any]:
        """The validated entry ``{"key", "image", "conversations"}``."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} entries of {self.json_path}")
        start, end = self._offsets[index], self._offsets[index + 1]
        return json.loads(self._buffer[start:end].tobytes().decode("utf-8"))

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entry(index)
        conversation = entry["conversations"]
        path = self.image_folder / entry["image"]
        try:
            image, error = decode_image(path), None
        except ImageDecodeError as failure:
            image, error = None, f"{path}: {failure}"
        return {
            "image": image,
            "conversation": conversation,
            "question_type": "llava",
            "answer": next(turn["value"] for turn in conversation if turn["from"] == GPT),
            "key": entry["key"],
            "error": error,
        }
