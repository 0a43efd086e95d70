"""Turn whatever a source stores (file bytes, a PIL image, an HF ``{"bytes", "path"}`` dict)
into an RGB PIL image, or raise :class:`ImageDecodeError` saying why it cannot be read.

Every source funnels through :func:`decode_image`, so a broken file is handled the same
way everywhere: the dataset catches the error, drops the sample and the collate function
counts it (see ``collate.py``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image


class ImageDecodeError(Exception):
    """A sample's image could not be decoded; the message says which sample and why."""


def _payload_to_bytes(payload: Any) -> bytes | Image.Image:
    """Normalise the storage forms we accept to raw bytes, or pass a PIL image through."""
    if isinstance(payload, Image.Image):
        return payload
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, dict):
        # Hugging Face ``datasets.Image(decode=False)`` yields {"bytes": ..., "path": ...};
        # bytes win because the path may point inside an archive that is not on disk.
        if payload.get("bytes") is not None:
            return bytes(payload["bytes"])
        if payload.get("path"):
            return Path(payload["path"]).read_bytes()
        raise ImageDecodeError(f"image dict has neither 'bytes' nor 'path' (keys: {sorted(payload)})")
    if isinstance(payload, (str, Path)):
        return Path(payload).read_bytes()
    if payload is None:
        raise ImageDecodeError("image field is empty (None)")
    raise ImageDecodeError(f"unsupported image payload type {type(payload).__name__}")


def decode_image(payload: Any) -> Image.Image:
    """Decode ``payload`` to a fully loaded RGB image.

    Grayscale, RGBA, palette and CMYK images are converted to RGB (alpha is dropped).
    ``.load()`` runs inside the ``try`` because Pillow decodes lazily: a truncated file
    opens fine and only fails when its pixels are read.
    """
    try:
        data = _payload_to_bytes(payload)
        image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except ImageDecodeError:
        raise
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageDecodeError(f"{type(error).__name__}: {error}") from error
