"""Rate-distortion of a tokenizer with a token budget, against JPEG and WebP at equal bytes.

A FlexTok / One-D-Piece style tokenizer can reconstruct from its first k of K tokens, so one
model traces a whole rate-distortion curve. This module measures that curve (PSNR / SSIM at each
k) and, at the same number of bytes per image, the quality of the two codecs anyone would
compare against. Rate is counted as the entropy-free size of the token indices,
``k * bits_per_token / 8`` bytes, which is what storing the tokens costs without an entropy coder.

Everything is judged as 8-bit images, the form a viewer (and a codec) sees: the reference, the
tokenizer's reconstructions and the codec decodes are all rounded to uint8 before PSNR / SSIM, so
no method gains or loses from sub-quantum precision.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from tokenmill.metrics.image import psnr_per_image, ssim_per_image
from tokenmill.trainers.images import save_grid, to_uint8

CODECS = ("jpeg", "webp")
METHODS = ("tokenizer", *CODECS)
CSV_COLUMNS = ("method", "k", "bytes_per_image", "psnr", "ssim", "num_images_reached")
# Quality ranges Pillow accepts; the search looks for the highest one that fits.
_QUALITY_RANGE = {"jpeg": (1, 100), "webp": (0, 100)}
_GRID_HEADER_PX = 14  # strip above the grid that names each column


# ----------------------------------------------------------------------------------- codecs


def _encode(image: np.ndarray, codec: str, quality: int) -> bytes:
    """Encode with the settings that make each codec as small as Pillow can make it, so the
    comparison does not handicap the baseline (optimized Huffman tables; WebP's slowest,
    best-compressing method)."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image)
    if codec == "jpeg":
        pil.save(buffer, format="JPEG", quality=quality, optimize=True)
    else:
        pil.save(buffer, format="WEBP", quality=quality, method=6)
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _check_codec_input(image: np.ndarray, codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")


def codec_at_bytes(image: np.ndarray, codec: str, max_bytes: float) -> tuple[np.ndarray, int, int] | None:
    """Best-quality JPEG / WebP file of ``image`` that is at most ``max_bytes`` long.

    Binary-searches the quality setting for the largest file within the cap and returns
    ``(decoded uint8 [H, W, 3], bytes used, quality)``. File size grows with quality almost
    everywhere; where it does not, the search may settle on a slightly lower quality than the
    best one that fits, but the returned file always respects the cap.

    Returns ``None`` when even the lowest quality is larger than ``max_bytes``. That is common
    at tiny token budgets: a JPEG file carries ~300+ bytes of headers and tables before any
    image data (WebP needs a few dozen), so a budget of a handful of bytes is simply below
    what the codec can reach, and callers must report it as missing rather than invent a number.
    """
    _check_codec_input(image, codec)
    low, high = _QUALITY_RANGE[codec]
    smallest = _encode(image, codec, low)
    if len(smallest) > max_bytes:
        return None
    best_quality, best_data = low, smallest
    low += 1
    while low <= high:
        quality = (low + high) // 2
        data = _encode(image, codec, quality)
        if len(data) <= max_bytes:
            best_quality, best_data, low = quality, data, quality + 1
        else:
            high = quality - 1
    return _decode(best_data), len(best_data), best_quality


# ----------------------------------------------------------------------------------- budgets


def model_max_tokens(model) -> int:
    """K of a 1D-token model, with a clear error for models without a token budget (a 2D grid
    tokenizer has no ordered tokens to truncate, so it has no rate-distortion curve here)."""
    try:
        max_tokens = getattr(model, "max_tokens", None)
    except (NotImplementedError, ValueError, TypeError) as error:
        raise ValueError(f"{type(model).__name__} has no 1D token budget: {error}") from error
    if max_tokens is None:
        raise ValueError(
            f"{type(model).__name__} has no 1D tokens (no max_tokens): rate-distortion over a token "
            "budget needs a 1D tokenizer such as ViTEncoder1D / ViTDecoder1D"
        )
    return int(max_tokens)


def default_budgets(model) -> list[int]:
    """Token counts to evaluate: the model's own evaluation budgets when it has a TokenBudget.

    Without a budget the model decodes all K tokens only (``Autoencoder.apply_budget`` refuses a
    shorter prefix, since no mask token was ever trained for the dropped tail), so its curve is
    the single point k = K, still worth comparing against the codecs at equal bytes.
    """
    max_tokens = model_max_tokens(model)
    budget = getattr(model, "budget", None)
    if budget is None:
        return [max_tokens]
    return sorted({int(k) for k in budget.eval_budgets()} | {max_tokens})


def check_budgets(model, budgets: Iterable[int]) -> list[int]:
    """Sorted, distinct budgets the model can decode; fails before any work is done otherwise."""
    max_tokens = model_max_tokens(model)
    budgets = sorted({int(k) for k in budgets})
    if not budgets:
        raise ValueError("no token budgets given")
    bad = [k for k in budgets if not 1 <= k <= max_tokens]
    if bad:
        raise ValueError(f"token budgets {bad} are outside 1..{max_tokens} (the model's max_tokens)")
    if getattr(model, "budget", None) is None and budgets != [max_tokens]:
        raise ValueError(
            f"{type(model).__name__} has no token budget, so it decodes all {max_tokens} tokens only: "
            f"budgets {[k for k in budgets if k != max_tokens]} cannot be evaluated"
        )
    return budgets


def bytes_per_image(model, k: int) -> float | None:
    """Size of k token indices; None for continuous tokens, whose size is not defined."""
    bits = getattr(model, "bits_per_token", None)
    return None if bits is None else k * float(bits) / 8


# ----------------------------------------------------------------------------------- evaluation


def _as_float(images_uint8: np.ndarray) -> Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1


def quantize_images(images: Tensor) -> Tensor:
    """Round [-1, 1] images to the 8-bit grid (clamping overshoot), as they would be saved."""
    return _as_float(to_uint8(images))


@torch.no_grad()
def reconstruct_batched(model, images: Tensor, k: int, seed: int, batch_size: int) -> Tensor:
    """Reconstruction from the first k tokens, computed on the model's device in batches (to bound
    memory) and returned on CPU. Each batch gets the same seed, so a generative decoder's result
    is reproducible run to run (for a given batch size: the noise is drawn per batch)."""
    device = next(model.parameters()).device
    outputs = [
        model.reconstruct(images[i : i + batch_size].to(device), num_tokens=k, seed=seed).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(outputs)


def _row(
    method: str, k: int, size: float | None, psnr: float | None, ssim: float | None, reached: int
) -> dict:
    return {
        "method": method,
        "k": k,
        "bytes_per_image": size,
        "psnr": psnr,
        "ssim": ssim,
        "num_images_reached": reached,
    }


def _mean(values: Tensor) -> float:
    return float(values.double().mean())


def _tokenizer_row(model, images: Tensor, reference: Tensor, k: int, seed: int, batch_size: int) -> dict:
    recon = quantize_images(reconstruct_batched(model, images, k, seed, batch_size))
    return _row(
        "tokenizer",
        k,
        bytes_per_image(model, k),
        _mean(psnr_per_image(recon, reference)),
        _mean(ssim_per_image(recon, reference)),
        len(images),
    )


def _codec_row(codec: str, originals: np.ndarray, reference: Tensor, k: int, max_bytes: float | None) -> dict:
    """Codec quality over the images that fit ``max_bytes``.

    PSNR / SSIM average only the images the codec could reach, so when
    ``num_images_reached`` is below the image count the numbers describe that subset (the
    easiest-to-compress images) and are not directly comparable; with no image reached they
    stay empty.
    """
    if max_bytes is None:
        return _row(codec, k, None, None, None, 0)
    results = [codec_at_bytes(image, codec, max_bytes) for image in originals]
    reached = [i for i, result in enumerate(results) if result is not None]
    if not reached:
        return _row(codec, k, None, None, None, 0)
    decoded = _as_float(np.stack([results[i][0] for i in reached]))
    target = reference[reached]
    size = float(np.mean([results[i][1] for i in reached]))
    return _row(
        codec,
        k,
        size,
        _mean(psnr_per_image(decoded, target)),
        _mean(ssim_per_image(decoded, target)),
        len(reached),
    )


def evaluate_rate_distortion(
    model,
    images: Tensor,
    budgets: Sequence[int],
    seed: int = 0,
    batch_size: int = 16,
    codecs: Sequence[str] = CODECS,
) -> list[dict]:
    """One row per (method, k): the tokenizer reconstructing from its first k tokens, and each
    codec at the tokenizer's byte size for that k.

    ``images`` are [N, 3, H, W] in [-1, 1]. Codec rows need a byte size, so for continuous
    tokens (``bits_per_token`` None) they are left empty.
    """
    budgets = check_budgets(model, budgets)
    unknown = [c for c in codecs if c not in CODECS]
    if unknown:
        raise ValueError(f"unknown codecs {unknown}; choose from {CODECS}")
    images = images.detach().float().cpu()
    originals = to_uint8(images)
    reference = _as_float(originals)
    rows = [_tokenizer_row(model, images, reference, k, seed, batch_size) for k in budgets]
    for codec in codecs:
        rows += [_codec_row(codec, originals, reference, k, bytes_per_image(model, k)) for k in budgets]
    return rows


# ----------------------------------------------------------------------------------- output


def format_value(value) -> str:
    """A CSV / table cell: empty for missing values, 4 decimals for floats."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Rows as CSV; a missing value (a codec that cannot reach the budget) is an empty cell."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([format_value(row[column]) for column in CSV_COLUMNS])
    return path


def format_table(rows: Sequence[dict]) -> str:
    """Fixed-width text table for the terminal; '-' marks values a codec could not reach."""
    cells = [list(CSV_COLUMNS)] + [[format_value(row[c]) or "-" for c in CSV_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(CSV_COLUMNS))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in cells
    )


def _points(rows: Sequence[dict], method: str, metric: str, complete: bool) -> tuple[list[int], list[float]]:
    """(k, value) of a method whose value covers every image (``complete``) or only some.

    A codec mean over just the images that fit is not comparable with the tokenizer's mean over
    all of them, so the plot joins complete points by a line and shows partial ones apart.
    """
    full = max((row["num_images_reached"] for row in rows), default=0)
    points = [
        (row["k"], row[metric])
        for row in rows
        if row["method"] == method
        and row[metric] is not None
        and (row["num_images_reached"] == full) == complete
    ]
    return [k for k, _ in points], [value for _, value in points]


def _tick_labels(rows: Sequence[dict], budgets: list[int]) -> list[str]:
    size = {row["k"]: row["bytes_per_image"] for row in rows if row["method"] == "tokenizer"}

    def label(k: int) -> str:
        if size.get(k) is None:
            return str(k)
        return f"{k}\n{size[k]:.1f} B" if size[k] < 10 else f"{k}\n{size[k]:.0f} B"

    return [label(k) for k in budgets]


def _plot_method(ax, rows: Sequence[dict], method: str, metric: str) -> None:
    ks, values = _points(rows, method, metric, complete=True)
    (line,) = ax.plot(ks, values, marker="o", label=method)
    ks, values = _points(rows, method, metric, complete=False)
    if ks:
        ax.plot(
            ks,
            values,
            linestyle="none",
            marker="o",
            markerfacecolor="none",
            color=line.get_color(),
            label=f"{method} (fits only some images)",
        )


def plot_rate_distortion(rows: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """PSNR and SSIM against k (log2 axis, byte size under each tick), one line per method.

    Codec points that cover only some of the images are drawn hollow and unconnected (see
    ``_points``); the CSV has their ``num_images_reached``.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    budgets = sorted({row["k"] for row in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in zip(axes, ("psnr", "ssim"), ("PSNR (dB)", "SSIM"), strict=True):
        for method in [m for m in METHODS if any(row["method"] == m for row in rows)]:
            _plot_method(ax, rows, method, metric)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, _tick_labels(rows, budgets))
        ax.minorticks_off()
        ax.set_xlabel("tokens k (bytes per image)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label_columns(path: Path, labels: list[str], column_width: int, padding: int) -> None:
    """Prepend a white strip naming each column, as in FlexTok's token-count figures."""
    grid = Image.open(path).convert("RGB")
    canvas = Image.new("RGB", (grid.width, grid.height + _GRID_HEADER_PX), "white")
    canvas.paste(grid, (0, _GRID_HEADER_PX))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels):
        draw.text((padding + c * (column_width + padding) + 1, 1), label, fill="black")
    canvas.save(path)


def reconstruction_grid(
    model,
    images: Tensor,
    budgets: Sequence[int],
    seed: int,
    path: str | Path,
    batch_size: int = 16,
    padding: int = 2,
) -> Path:
    """PNG grid: one row per image, columns = the original then its reconstruction at each k.

    Size: ``(N * (H + padding) + padding + header, (1 + len(budgets)) * (W + padding) + padding)``
    with a small header strip naming the columns ("orig", then each k).
    """
    budgets = check_budgets(model, budgets)
    images = images.detach().float().cpu()
    columns = [images] + [reconstruct_batched(model, images, k, seed, batch_size) for k in budgets]
    per_image_rows = [torch.stack([column[i] for column in columns]) for i in range(len(images))]
    path = save_grid(per_image_rows, path, padding=padding)
    _label_columns(path, ["orig", *[str(k) for k in budgets]], images.shape[-1], padding)
    return path


# ----------------------------------------------------------------------------------- data


def validation_images(datamodule, num_images: int) -> Tensor:
    """The first ``num_images`` validation images of an ImageDataModule, [N, 3, H, W] in [-1, 1].

    Fewer come back when the validation set is smaller; none at all is an error, since there is
    nothing to evaluate.
    """
    datamodule.setup("validate")
    batches, count = [], 0
    for batch in datamodule.val_dataloader():
        batches.append(batch["image"])
        count += len(batch["image"])
        if count >= num_images:
            break
    if count == 0:
        raise ValueError(f"{type(datamodule.source).__name__} yielded no validation images")
    return torch.cat(batches)[:num_images]
