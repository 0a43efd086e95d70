"""Pre-tokenize a dataset with an exported tokenizer, and read the token shards back.

`pretokenize(export_dir, source, output_dir)` encodes every image of `source` (centre crop at the
tokenizer's image size, exactly the validation transform; no augmentation) and writes the token
indices as shards for downstream (e.g. autoregressive) training:

* ``--format wds``: WebDataset tars ``tokens-000000.tar``; per sample ``{NNNNNNNNN}.tokens.npy``
  (int16/int32/int64, the smallest signed type holding the codebook; shape [K] or [K, G]) and
  ``{NNNNNNNNN}.json`` (source key, original image size, tokenizer hash, ...). The member key is
  the global sample index, zero-padded, because source keys may contain dots or slashes.
* ``--format parquet``: ``tokens-000000.parquet`` with columns ``index`` (int64), ``key``
  (string, the source key), ``tokens`` (list<int16|int32|int64>, flattened) and ``shape``
  (list<int32>).

Resuming. Sample ``i`` of the source (its position in the deterministic source order, counting
undecodable images too) always belongs to shard ``i // shard_size``. A shard is written to a
temporary file and renamed into place, after its ``tokens-NNNNNN.stats.json`` sidecar (sample
and skip counts); so a shard file that exists is complete. A restart removes stale temporary
files, skips complete shards and re-encodes the rest, so no sample is lost or written twice.

``manifest.json`` describes the run (tokenizer hashes, codebook size, token shape and dtype,
source, shard size); it is written with ``"complete": false`` when a run starts (a restart
refuses to continue a run with different settings) and rewritten with the shard list and totals
when every shard is done.

`TokenShardDataset(output_dir)` streams ``{"key", "index", "tokens": LongTensor}`` back from
either format, splitting shards over DataLoader workers and DDP ranks.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

from tokenmill.export.pretrained import CONFIG_NAME, WEIGHTS_NAME, from_pretrained

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SHARD_PREFIX = "tokens"
FORMATS = {"wds": ".tar", "parquet": ".parquet"}
STATS_SUFFIX = ".stats.json"
TMP_MARKER = ".tmp-"
KEY_DIGITS = 9  # member keys in tars: the global sample index, zero-padded
TRANSFORM = "resize shorter edge to image_size (bicubic, antialiased), centre crop (tokenmill EvalTransform)"
# Set by the CLI's --crash-after-shards (tests): after this many new shards, start the next one and
# die without any cleanup, as a killed job would.
_CRASH_ENV = "TOKENMILL_PRETOKENIZE_CRASH_AFTER_SHARDS"


# ================================================================================== sources
@dataclass
class RawSample:
    """One position of the source order: its payload (bytes, path, PIL image, HF dict) or, when
    the source itself could not supply an image, the reason."""

    index: int
    key: str
    payload: Any = None
    error: str | None = None


@dataclass
class TokenizeSource:
    """An ordered list of images to tokenize.

    Map-style sources know their length and read any range directly; streaming sources (tar
    shards) have ``num_samples=None`` and are read front to back (samples of already complete
    shards are skipped without decoding).
    """

    description: dict[str, Any]
    num_samples: int | None
    read_range: Callable[[int, int], Iterator[RawSample]] | None = None  # map-style
    read_from: Callable[[int], Iterator[RawSample]] | None = None  # streaming

    def iterate(self, start: int = 0) -> Iterator[RawSample]:
        if self.read_range is not None:
            return self.read_range(start, int(self.num_samples))
        return self.read_from(start)


def records_source(records: Any, description: dict[str, Any]) -> TokenizeSource:
    """Any tokenmill ``Records`` (indexable ``(key, payload)``) as a source."""
    if len(records) == 0:
        raise ValueError(f"source {description} has no images")

    def read_range(start: int, end: int) -> Iterator[RawSample]:
        for index in range(start, end):
            key, payload = records[index]
            yield RawSample(index, str(key), payload)

    return TokenizeSource(description, len(records), read_range=read_range)


def imagefolder_source(root: str | os.PathLike, extensions: Sequence[str] | None = None) -> TokenizeSource:
    """Every image under ``root`` (recursive), in sorted relative-path order; keys are those paths."""
    from tokenmill.data.source_imagefolder import IMAGE_EXTENSIONS, ImageFolderSource

    source = ImageFolderSource(str(root), val_fraction=0.0, extensions=extensions or IMAGE_EXTENSIONS)
    description = {"type": "imagefolder", "root": str(Path(root).expanduser().resolve())}
    return records_source(source.train_records(), description)


def hf_source(
    path: str,
    split: str = "train",
    name: str | None = None,
    data_dir: str | None = None,
    data_files: Any = None,
    image_column: str = "image",
    cache_dir: str | None = None,
) -> TokenizeSource:
    """One split of a Hugging Face ``datasets`` dataset, in row order (keys ``split/row[:path]``)."""
    from tokenmill.data.source_hf import HFSource

    source = HFSource(
        path,
        data_dir=data_dir,
        data_files=data_files,
        name=name,
        train_split=split,
        val_split=None,
        val_fraction=0.0,
        image_column=image_column,
        cache_dir=cache_dir,
    )
    description = {
        "type": "hf",
        "path": path,
        "name": name,
        "split": split,
        "data_dir": data_dir,
        "data_files": data_files,
        "image_column": image_column,
    }
    return records_source(source.train_records(), description)


def embedded_source(split: str = "val", num_samples: int = 32) -> TokenizeSource:
    """scikit-image's bundled photographs (no download): ``train`` cycles the 15 training photos
    (whole photos, centre-cropped), ``val`` the fixed validation crops of the held-out photos."""
    from tokenmill.data.source_embedded import EmbeddedSource

    if split not in ("train", "val"):
        raise ValueError(f"embedded split must be 'train' or 'val', got {split!r}")
    source = EmbeddedSource(num_train_samples=max(num_samples, 1), num_val_samples=num_samples)
    records = source.train_records() if split == "train" else source.val_records()
    return records_source(records, {"type": "embedded", "split": split, "num_samples": num_samples})


def webdataset_source(urls: str, image_key: str = "jpg;jpeg;png;webp") -> TokenizeSource:
    """Tar shards (brace pattern, ``::`` between patterns) read in the order given; keys are the
    samples' ``__key__``. The first field of ``image_key`` present in a sample is its image."""
    from tokenmill.data.source_webdataset import expand_shards

    shards = expand_shards(urls)
    return _tar_source(shards, image_key, {"type": "webdataset", "urls": urls, "shards": shards})


def _tar_source(shards: list[str], image_key: str, description: dict[str, Any]) -> TokenizeSource:
    from tokenmill.data.source_webdataset import _read_samples

    image_keys = tuple(part.strip().lower() for part in image_key.split(";") if part.strip())
    if not image_keys:
        raise ValueError(f"image_key {image_key!r} names no field")
    description = {**description, "image_key": ";".join(image_keys)}

    def read_from(start: int) -> Iterator[RawSample]:
        for index, raw in enumerate(_read_samples(list(shards))):
            if index < start:
                continue
            key = str(raw.get("__key__", f"?{index}"))
            field_name = next((name for name in image_keys if name in raw), None)
            if field_name is None:
                fields = sorted(name for name in raw if not name.startswith("__"))
                error = f"no image field (looked for {list(image_keys)}); sample has {fields} in {raw.get('__url__')}"
                yield RawSample(index, key, error=error)
            else:
                yield RawSample(index, key, raw[field_name])

    return TokenizeSource(description, None, read_from=read_from)


def hydra_source(
    overrides: Sequence[str], config_dir: str | os.PathLike, split: str = "train"
) -> TokenizeSource:
    """The source of a training data config, composed like ``train.py`` composes it, e.g.
    ``["data=imagefolder", "data.source.root=/data/images"]``. ``split`` picks the training
    records/shards or the validation ones (a held-out fraction is held out exactly as in training;
    set ``data.source.val_fraction=0`` to take everything)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import tokenmill.config  # noqa: F401  (resolvers)
    from tokenmill.data.source_base import MapImageSource
    from tokenmill.data.source_webdataset import WebDatasetSource

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    source = instantiate(cfg.data.source)
    description = {
        "type": "hydra",
        "overrides": list(overrides),
        "split": split,
        "target": cfg.data.source._target_,
    }
    if isinstance(source, MapImageSource):
        records = source.train_records() if split == "train" else source.val_records()
        return records_source(records, description)
    if isinstance(source, WebDatasetSource):
        shards = source.shard_lists()[0 if split == "train" else 1]
        return _tar_source(shards, ";".join(source.image_keys), {**description, "shards": shards})
    raise TypeError(f"cannot pretokenize a {type(source).__name__}: not a map-style or WebDataset source")


# ================================================================================ tokenizer
def model_image_size(model: nn.Module) -> int | None:
    """Pixel size the tokenizer was built for (looks through a frozen VAE to its pixel encoder)."""
    size = getattr(model, "image_size", None)
    vae = getattr(model, "vae", None)
    if size is None and vae is not None:
        inner = getattr(vae, "autoencoder", None)
        size = getattr(getattr(inner, "encoder", None), "image_size", None)
    if size is None and vae is None:
        size = getattr(getattr(model, "encoder", None), "image_size", None)
    return int(size) if size is not None else None


def token_dtype(codebook_size: int | None, index_format: str) -> np.dtype:
    """Smallest signed integer type that holds every index (signed: residual quantizers use -1)."""
    if index_format == "bits":
        return np.dtype(np.int16)  # 0/1 bits
    if codebook_size is None:
        return np.dtype(np.int64)
    for dtype in (np.int16, np.int32):
        if codebook_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class TokenizerInfo:
    model: nn.Module
    image_size: int
    info: dict[str, Any]  # what goes into the manifest
    dtype: np.dtype
    shape: tuple[int, ...]


def load_tokenizer(
    export_dir: str | os.PathLike, device: str = "cpu", image_size: int | None = None
) -> TokenizerInfo:
    export = Path(export_dir).expanduser().resolve()
    model = from_pretrained(export, map_location=device)
    if not hasattr(model, "encode") or getattr(model, "quantizer", None) is None:
        raise ValueError(
            f"{export} holds a {type(model).__name__} without a quantizer: it has no tokens to write"
        )
    size = image_size or model_image_size(model)
    if size is None:
        raise ValueError(f"cannot tell the image size {export} was built for: pass --image-size")
    with torch.no_grad():
        probe = model.encode(torch.zeros(1, 3, size, size, device=device)).indices
    if probe is None:
        raise ValueError(f"{export}'s quantizer returned no indices")
    index_format = "bits" if probe.dtype == torch.bool else "int"
    codebook_size = getattr(model, "codebook_size", None)
    dtype = token_dtype(codebook_size, index_format)
    model_config = json.loads((export / CONFIG_NAME).read_text())["model"]
    config_hash = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()
    info = {
        "export_path": str(export),
        "class": model_config.get("_target_"),
        "config_sha256": config_hash,
        "weights_sha256": _sha256_file(export / WEIGHTS_NAME),
        "codebook_size": codebook_size,
        "bits_per_token": getattr(model, "bits_per_token", None),
        "index_format": index_format,
        "max_tokens": getattr(model, "max_tokens", None),
    }
    return TokenizerInfo(model, int(size), info, dtype, tuple(probe.shape[1:]))


# ==================================================================================== shards
def shard_name(shard: int, fmt: str) -> str:
    return f"{SHARD_PREFIX}-{shard:06d}{FORMATS[fmt]}"


def stats_name(shard: int) -> str:
    return f"{SHARD_PREFIX}-{shard:06d}{STATS_SUFFIX}"


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, payload: Any) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    _commit(tmp, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mtime, member.mode = len(data), 0, 0o644  # fixed: same input, same bytes
    tar.addfile(member, io.BytesIO(data))


def _write_wds(path: Path, rows: list[dict[str, Any]], crash_midway: bool = False) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for position, row in enumerate(rows):
            if crash_midway and position >= len(rows) // 2:
                break
            member = f"{row['index']:0{KEY_DIGITS}d}"
            _add_member(tar, f"{member}.json", json.dumps(row["meta"], sort_keys=True).encode())
            _add_member(tar, f"{member}.tokens.npy", _npy_bytes(row["tokens"]))
        if crash_midway:  # die with a half-written temporary file, as a kill would leave it
            tar.fileobj.flush()
            os._exit(75)


def _write_parquet(
    path: Path, rows: list[dict[str, Any]], dtype: np.dtype, crash_midway: bool = False
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    value_type = pa.from_numpy_dtype(dtype)
    table = pa.table(
        {
            "index": pa.array([row["index"] for row in rows], pa.int64()),
            "key": pa.array([row["meta"]["key"] for row in rows], pa.string()),
            "tokens": pa.array([row["tokens"].reshape(-1) for row in rows], pa.list_(value_type)),
            "shape": pa.array([list(row["tokens"].shape) for row in rows], pa.list_(pa.int32())),
            "width": pa.array([row["meta"]["width"] for row in rows], pa.int32()),
            "height": pa.array([row["meta"]["height"] for row in rows], pa.int32()),
        }
    )
    if crash_midway:
        with open(path, "wb") as f:
            f.write(b"PAR1")  # a torn file, as a kill during the write leaves it
            f.flush()
        os._exit(75)
    pq.write_table(table, path)


# ================================================================================ pretokenize
class _Progress:
    """tqdm when installed, else a counter printed every few seconds."""

    def __init__(self, total: int | None, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        self.count, self.total = initial, total
        self._bar = None
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, unit="img", desc="pretokenize", dynamic_ncols=True)

    def update(self, n: int, **postfix: Any) -> None:
        self.count += n
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        elif time.monotonic() - self._last > 5 or (self.total is not None and self.count >= self.total):
            self._last = time.monotonic()
            of = f"/{self.total}" if self.total is not None else ""
            print(f"pretokenize: {self.count}{of} images {postfix or ''}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class PretokenizeResult:
    output_dir: Path
    manifest: dict[str, Any]
    shards_written: int = 0
    shards_skipped: int = 0
    skipped_keys: dict[str, str] = field(default_factory=dict)


def _spec(fmt: str, shard_size: int, tokenizer: TokenizerInfo, source: TokenizeSource) -> dict[str, Any]:
    """Everything a restart must agree with to continue the same run."""
    return {
        "format": fmt,
        "shard_size": shard_size,
        "image_size": tokenizer.image_size,
        "transform": TRANSFORM,
        "tokenizer": tokenizer.info,
        "token_shape": list(tokenizer.shape),
        "token_dtype": tokenizer.dtype.name,
        "source": source.description,
    }


def _comparable(spec: dict[str, Any]) -> dict[str, Any]:
    # The export may have moved; its hashes say whether it is the same tokenizer.
    tokenizer = {k: v for k, v in spec["tokenizer"].items() if k != "export_path"}
    return json.loads(json.dumps({**spec, "tokenizer": tokenizer}, default=str))


def _remove_stale_tmp(output: Path) -> list[Path]:
    stale = [
        p
        for p in output.iterdir()
        if p.name.startswith(f".{SHARD_PREFIX}-") or p.name.startswith(f".{MANIFEST_NAME}")
    ]
    stale = [p for p in stale if TMP_MARKER in p.name]
    for path in stale:
        path.unlink()
    return stale


def _complete_shards(output: Path, fmt: str) -> dict[int, dict[str, Any]]:
    """Shards whose data file exists (its stats sidecar was committed before it)."""
    done: dict[int, dict[str, Any]] = {}
    for path in output.glob(f"{SHARD_PREFIX}-*{FORMATS[fmt]}"):
        number = path.name[len(SHARD_PREFIX) + 1 : -len(FORMATS[fmt])]
        stats = output / stats_name(int(number)) if number.isdigit() else None
        if stats is not None and stats.is_file():
            done[int(number)] = json.loads(stats.read_text())
    return done


def _decode(sample: RawSample, transform: Callable) -> dict[str, Any]:
    from tokenmill.data.decode import ImageDecodeError, decode_image

    if sample.error is not None:
        return {"sample": sample, "error": sample.error}
    try:
        image = decode_image(sample.payload)
    except ImageDecodeError as error:
        return {"sample": sample, "error": str(error)}
    return {"sample": sample, "image": transform(image), "size": image.size}


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _source_shards(
    source: TokenizeSource, shard_size: int, done: dict[int, dict]
) -> Iterator[tuple[int, int, list[RawSample] | None]]:
    """(shard, first index, raw samples or None for a complete shard), in order."""
    if source.num_samples is not None:
        for shard in range(math.ceil(source.num_samples / shard_size)):
            start, end = shard * shard_size, min((shard + 1) * shard_size, source.num_samples)
            yield shard, start, None if shard in done else list(source.read_range(start, end))
        return
    # A stream: resume at the first sample of the first incomplete shard; later complete shards
    # (possible when several runs shared the folder) are read past without decoding.
    first_missing = next(i for i in range(len(done) + 1) if i not in done)
    for shard in range(first_missing):
        yield shard, shard * shard_size, None
    pending: list[RawSample] = []
    for sample in source.iterate(first_missing * shard_size):
        pending.append(sample)
        if len(pending) == shard_size:
            shard = sample.index // shard_size
            yield shard, shard * shard_size, None if shard in done else pending
            pending = []
    if pending:
        shard = pending[0].index // shard_size
        yield shard, shard * shard_size, None if shard in done else pending


def pretokenize(
    export_dir: str | os.PathLike,
    source: TokenizeSource,
    output_dir: str | os.PathLike,
    fmt: str = "wds",
    shard_size: int = 1000,
    batch_size: int = 32,
    num_workers: int = 4,
    device: str = "cpu",
    image_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PretokenizeResult:
    """Encode ``source`` with the tokenizer in ``export_dir`` into token shards in ``output_dir``
    (see the module docstring). Safe to call again after a crash: complete shards are kept."""
    from tokenmill.data.transforms import EvalTransform

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
    output = Path(output_dir).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(export_dir, device=device, image_size=image_size)
    spec = _spec(fmt, shard_size, tokenizer, source)

    manifest_path = output / MANIFEST_NAME
    if overwrite:
        for path in output.glob(f"{SHARD_PREFIX}-*"):
            path.unlink()
        manifest_path.unlink(missing_ok=True)
    if manifest_path.is_file():
        previous = _comparable(json.loads(manifest_path.read_text()).get("spec") or {"tokenizer": {}})
        current = _comparable(spec)
        if previous != current:
            differing = sorted(k for k in current if previous.get(k) != current[k])
            raise ValueError(
                f"{output} holds tokens from another run (different {', '.join(differing)}): "
                "use another output directory, or pass overwrite=True / --overwrite to start over"
            )
    elif any(output.glob(f"{SHARD_PREFIX}-*")):
        raise ValueError(
            f"{output} has token shards but no {MANIFEST_NAME}: not a pretokenize output directory"
        )
    stale = _remove_stale_tmp(output)
    if stale:
        logger.info("removed %d unfinished temporary files from an interrupted run", len(stale))
    done = _complete_shards(output, fmt)
    if done:
        logger.info("resuming: %d complete shards kept", len(done))
    _atomic_write_json(manifest_path, {"manifest_version": MANIFEST_VERSION, "complete": False, "spec": spec})

    crash_after = int(os.environ.get(_CRASH_ENV, "0") or 0)
    transform = EvalTransform(tokenizer.image_size)
    model, dtype = tokenizer.model, tokenizer.dtype
    limits = np.iinfo(dtype)
    result = PretokenizeResult(output, {})
    initial = sum(stats["end_index"] - stats["first_index"] for stats in done.values())
    bar = _Progress(source.num_samples, initial, progress)
    pool = ThreadPoolExecutor(max(1, num_workers)) if num_workers > 0 else None
    seen: list[int] = []
    try:
        for shard, start, raw in _source_shards(source, shard_size, done):
            seen.append(shard)
            if raw is None:
                result.shards_skipped += 1
                continue
            decoded = (
                list(pool.map(lambda s: _decode(s, transform), raw))
                if pool
                else [_decode(s, transform) for s in raw]
            )
            good = [d for d in decoded if "image" in d]
            skipped = [
                {"index": d["sample"].index, "key": d["sample"].key, "reason": d["error"]}
                for d in decoded
                if "error" in d
            ]
            for item in skipped:
                logger.warning(
                    "skipped undecodable image %r (sample %d): %s", item["key"], item["index"], item["reason"]
                )
                result.skipped_keys[item["key"]] = item["reason"]
            rows: list[dict[str, Any]] = []
            for batch in _chunks(good, batch_size):
                images = torch.stack([d["image"] for d in batch]).to(device)
                with torch.no_grad():
                    indices = model.encode(images).indices.cpu()
                if (
                    indices.dtype != torch.bool
                    and indices.numel()
                    and (int(indices.min()) < limits.min or int(indices.max()) > limits.max)
                ):
                    raise ValueError(
                        f"token indices in [{int(indices.min())}, {int(indices.max())}] do not fit {dtype.name}"
                    )
                array = indices.numpy().astype(dtype)
                for d, tokens in zip(batch, array, strict=True):
                    sample = d["sample"]
                    meta = {
                        "key": sample.key,
                        "index": sample.index,
                        "width": d["size"][0],
                        "height": d["size"][1],
                        "image_size": tokenizer.image_size,
                        "tokenizer": tokenizer.info["config_sha256"][:16],
                        "weights": tokenizer.info["weights_sha256"][:16],
                    }
                    rows.append({"index": sample.index, "tokens": tokens, "meta": meta})
            end = raw[-1].index + 1
            stats = {
                "shard": shard,
                "name": shard_name(shard, fmt),
                "first_index": start,
                "end_index": end,
                "num_samples": len(rows),
                "num_skipped": len(skipped),
                "skipped": skipped,
            }
            crash = bool(crash_after) and result.shards_written >= crash_after
            path = output / shard_name(shard, fmt)
            tmp = _tmp_path(path)
            _atomic_write_json(output / stats_name(shard), stats)
            if fmt == "wds":
                _write_wds(tmp, rows, crash_midway=crash)
            else:
                _write_parquet(tmp, rows, dtype, crash_midway=crash)
            _commit(tmp, path)  # the shard exists from here on, complete
            done[shard] = stats
            result.shards_written += 1
            bar.update(len(raw), shard=shard, skipped=sum(s["num_skipped"] for s in done.values()))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()

    if not seen:
        raise ValueError(f"source {source.description} gave no samples")
    extra = sorted(set(done) - set(seen))
    if extra:
        raise RuntimeError(
            f"{output} holds shards {extra} beyond the end of the source (it has {seen[-1] + 1} shards): "
            "the source changed since they were written; start over with --overwrite"
        )
    shards = [done[i] for i in seen]
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "complete": True,
        "spec": spec,
        "format": fmt,
        "tokenizer": tokenizer.info,
        "codebook_size": tokenizer.info["codebook_size"],
        "token_shape": list(tokenizer.shape),
        "token_dtype": tokenizer.dtype.name,
        "image_size": tokenizer.image_size,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_skipped": sum(s["num_skipped"] for s in shards),
        "num_source_samples": shards[-1]["end_index"] if shards else 0,
        "skipped": [item for s in shards for item in s["skipped"]],
        "shards": [
            {k: s[k] for k in ("name", "first_index", "end_index", "num_samples", "num_skipped")}
            for s in shards
        ],
    }
    _atomic_write_json(manifest_path, manifest)
    result.manifest = manifest
    return result


# ===================================================================================== loading
def load_manifest(path: str | os.PathLike, require_complete: bool = True) -> dict[str, Any]:
    path = Path(path).expanduser()
    manifest_path = path / MANIFEST_NAME if path.is_dir() else path
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: not a pretokenize output directory")
    manifest = json.loads(manifest_path.read_text())
    if require_complete and not manifest.get("complete"):
        raise ValueError(f"{manifest_path} belongs to an unfinished run: rerun pretokenize to complete it")
    return manifest


def read_shard(path: str | os.PathLike, fmt: str | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard in order: ``{"key", "index", "tokens": np.ndarray}`` (+ metadata)."""
    path = Path(path)
    fmt = fmt or next((name for name, ext in FORMATS.items() if path.name.endswith(ext)), None)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        tokens = table.column("tokens").combine_chunks()
        values, offsets = tokens.values.to_numpy(), tokens.offsets.to_numpy()  # keeps the stored dtype
        keys, indices, shapes = (table.column(name).to_pylist() for name in ("key", "index", "shape"))
        for row in range(table.num_rows):
            array = values[offsets[row] : offsets[row + 1]].reshape(shapes[row])
            yield {"key": keys[row], "index": indices[row], "tokens": array}
        return
    if fmt != "wds":
        raise ValueError(f"cannot tell the format of {path}")
    with tarfile.open(path, "r") as tar:
        current: dict[str, Any] = {}
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            if current and current["__key__"] != stem:
                yield _wds_sample(current, path)
                current = {}
            current["__key__"] = stem
            current[ext] = data
        if current:
            yield _wds_sample(current, path)


def _wds_sample(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    if "json" not in raw or "tokens.npy" not in raw:
        raise ValueError(f"sample {raw['__key__']!r} in {path} lacks json or tokens.npy ({sorted(raw)})")
    meta = json.loads(raw["json"])
    tokens = np.load(io.BytesIO(raw["tokens.npy"]), allow_pickle=False)
    return {"key": meta["key"], "index": int(meta["index"]), "tokens": tokens}


class TokenShardDataset(IterableDataset):
    """Streams ``{"key": source key, "index": source position, "tokens": LongTensor [K] or [K, G]}``
    from a pretokenize output directory (either format).

    Shards are split over ``world_size * num_workers`` readers: with at least one shard per reader
    each takes ``shards[slot::slots]``; with fewer shards every reader reads all of them and keeps
    every ``slots``-th sample. Without ``shuffle`` a single reader yields samples in source order.
    With ``shuffle`` the shard order and the order inside each shard are drawn from
    ``(seed, epoch)``; call ``set_epoch`` for a new order.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        from tokenmill.data.sampler import distributed_rank_and_world

        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            self.root = self.root.parent
        self.manifest = load_manifest(self.root)
        self.format = self.manifest["format"]
        self.shards = [str(self.root / s["name"]) for s in self.manifest["shards"]]
        self.num_samples = int(self.manifest["num_samples"])
        self.codebook_size = self.manifest.get("codebook_size")
        self.token_shape = tuple(self.manifest["token_shape"])
        default_rank, default_world = distributed_rank_and_world()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.world_size != 1:
            raise TypeError("TokenShardDataset has no fixed per-rank length with several ranks")
        return self.num_samples

    def _samples(self, shard: str) -> Iterator[dict[str, Any]]:
        samples = read_shard(shard, self.format)
        if self.shuffle:
            samples = list(samples)
            random.Random(f"{self.seed}/{self.epoch}/{Path(shard).name}").shuffle(samples)
        yield from samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(shards)
        if len(shards) >= slots:
            stream: Iterable[dict[str, Any]] = (
                s for shard in shards[slot::slots] for s in self._samples(shard)
            )
        else:
            stream = (
                s
                for i, s in enumerate(s for shard in shards for s in self._samples(shard))
                if i % slots == slot
            )
        for sample in stream:
            yield {
                "key": sample["key"],
                "index": sample["index"],
                "tokens": torch.from_numpy(sample["tokens"].astype(np.int64)),
            }
