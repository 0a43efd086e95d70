"""Derive independent, reproducible random streams from tuples like ``(seed, epoch, index)``.

Randomness never comes from the global RNG: each decision draws from a fresh
``torch.Generator`` whose seed is a hash of what the decision is about. The result is the
same whichever worker or process makes it, so batches do not depend on ``num_workers``.
"""

from __future__ import annotations

import hashlib
import zlib

import torch


def derive_seed(*parts: int | str) -> int:
    """Hash ``parts`` into a 63-bit seed; different tuples give unrelated seeds."""
    text = "\x1f".join(f"{type(part).__name__}:{part}" for part in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(*parts: int | str) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*parts))
    return generator


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator behind every random choice for one sample in one epoch."""
    return make_generator("sample", seed, epoch, index)


def key_to_index(key: str) -> int:
    """A stable integer for a sample key; streaming sources use it where map-style ones use the index."""
    return zlib.crc32(key.encode("utf-8"))
