"""Rate-distortion evaluation: codecs at a byte cap, the CSV / plot / grid, and the CLI."""

from __future__ import annotations

import csv
import importlib.util
import io

import numpy as np
import pytest
import skimage.data
import torch
from omegaconf import OmegaConf
from PIL import Image

from tokenmill.evaluation import (
    CSV_COLUMNS,
    codec_at_bytes,
    default_budgets,
    evaluate_rate_distortion,
    plot_rate_distortion,
    reconstruction_grid,
    write_csv,
)
from tokenmill.evaluation.rate_distortion import model_max_tokens
from tokenmill.export import build_model
from tokenmill.tokenizers import Autoencoder

from .conftest import ROOT, tiny_autoencoder_config

K, CODEBOOK, SIZE, PAD, HEADER = 8, 32, 32, 2, 14
BITS = float(np.log2(CODEBOOK))  # 5 bits: 8 tokens are 5 bytes, below what either codec can reach


def photo(size: int, name: str = "chelsea") -> np.ndarray:
    return np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((size, size)))


def photos_tensor(size: int = SIZE) -> torch.Tensor:
    stack = np.stack([photo(size, n) for n in ("chelsea", "coffee", "astronaut")])
    return torch.from_numpy(stack).permute(0, 3, 1, 2).float() / 127.5 - 1


def budget_model(budget: bool = True) -> Autoencoder:
    cfg = tiny_autoencoder_config(image_size=SIZE, tokens=K, codebook=CODEBOOK)
    if budget:
        cfg.budget = {"_target_": "tokenmill.budget.TokenBudget", "max_tokens": K, "dim": 8}
    return build_model(cfg).eval()


def lowest_quality_size(image: np.ndarray, codec: str) -> int:
    """Size at the codec's lowest quality, computed here independently of the module."""
    buffer = io.BytesIO()
    if codec == "jpeg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=1, optimize=True)
    else:
        Image.fromarray(image).save(buffer, format="WEBP", quality=0, method=6)
    return len(buffer.getvalue())


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


# ----------------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_codec_respects_the_byte_cap_and_refuses_unreachable_budgets(codec):
    image = photo(64)
    minimum = lowest_quality_size(image, codec)
    assert codec_at_bytes(image, codec, minimum - 1) is None
    for cap in (minimum, 2 * minimum, 4 * minimum, 10**9):
        decoded, used, quality = codec_at_bytes(image, codec, cap)
        assert used <= cap and decoded.shape == image.shape and decoded.dtype == np.uint8
    assert quality == 100  # an unlimited cap gets the top quality
    assert codec_at_bytes(image, "jpeg", 100) is None  # JPEG headers alone exceed 100 bytes


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_codec_quality_rises_with_the_byte_budget(codec):
    image = photo(64, "coffee")
    minimum = lowest_quality_size(image, codec)
    results = [codec_at_bytes(image, codec, minimum * f) for f in (1, 2, 4, 8)]
    psnrs = [psnr_uint8(decoded, image) for decoded, _, _ in results]
    qualities = [quality for _, _, quality in results]
    assert qualities == sorted(qualities) and psnrs == sorted(psnrs)
    assert psnrs[-1] > psnrs[0] + 5


def test_codec_input_is_checked():
    with pytest.raises(ValueError, match="codec must be one of"):
        codec_at_bytes(photo(16), "png", 1000)
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        codec_at_bytes(photo(16).astype(np.float32), "jpeg", 1000)


# ----------------------------------------------------------------------------------- budgets


def test_budgets_follow_the_model():
    assert default_budgets(budget_model()) == [1, 2, 4, 8]
    assert default_budgets(budget_model(budget=False)) == [K]  # no mask token: all K tokens only
    with pytest.raises(ValueError, match="no 1D tokens"):
        model_max_tokens(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"outside 1..8"):
        evaluate_rate_distortion(budget_model(), photos_tensor(), [0, 16])


# ----------------------------------------------------------------------------------- evaluation


def test_csv_plot_and_grid(tmp_path):
    model, images = budget_model(), photos_tensor()
    rows = evaluate_rate_distortion(model, images, [1, 2, 4, 8], seed=0, batch_size=2)
    table = read_csv(write_csv(rows, tmp_path / "rd.csv"))
    assert tuple(table[0]) == CSV_COLUMNS
    assert [(r["method"], int(r["k"])) for r in table] == [
        (m, k) for m in ("tokenizer", "jpeg", "webp") for k in (1, 2, 4, 8)
    ]
    for row in table:
        k = int(row["k"])
        if row["method"] == "tokenizer":
            assert float(row["bytes_per_image"]) == pytest.approx(k * BITS / 8)
            assert np.isfinite(float(row["psnr"])) and -1 <= float(row["ssim"]) <= 1
            assert row["num_images_reached"] == "3"
        else:  # k * 5 bits is a few bytes: no codec file is that small, so the cells stay empty
            assert (row["bytes_per_image"], row["psnr"], row["ssim"], row["num_images_reached"]) == (
                "",
                "",
                "",
                "0",
            )

    plot = plot_rate_distortion(rows, tmp_path / "rd.png")
    assert Image.open(plot).format == "PNG"
    grid = Image.open(reconstruction_grid(model, images[:2], [1, 2, 4, 8], 0, tmp_path / "grid.png"))
    assert grid.size == (5 * (SIZE + PAD) + PAD, 2 * (SIZE + PAD) + PAD + HEADER)
    # column 0 is the original itself
    first = np.asarray(grid)[HEADER + PAD : HEADER + PAD + SIZE, PAD : PAD + SIZE]
    assert np.array_equal(first, photo(SIZE))


def test_codec_rows_at_reachable_budgets(monkeypatch):
    """With a large per-token size the codecs fit: rows hold the mean actual size, within budget."""
    monkeypatch.setattr(Autoencoder, "bits_per_token", property(lambda self: 800.0))
    rows = evaluate_rate_distortion(budget_model(), photos_tensor(), [4, 8], codecs=("jpeg", "webp"))
    for row in rows:
        assert row["num_images_reached"] == 3
        assert 0 < row["bytes_per_image"] <= row["k"] * 100
    for codec in ("jpeg", "webp"):
        low, high = (row["psnr"] for row in rows if row["method"] == codec)
        assert high > low


def test_reconstruction_is_reproducible_and_differs_with_k():
    model, images = budget_model(), photos_tensor()
    a = evaluate_rate_distortion(model, images, [1, 8], seed=3, codecs=())
    b = evaluate_rate_distortion(model, images, [1, 8], seed=3, batch_size=1, codecs=())
    assert a == b
    one, all_tokens = (model.reconstruct(images, num_tokens=k) for k in (1, 8))
    assert not torch.equal(one, all_tokens)


# ----------------------------------------------------------------------------------- CLI


def load_cli():
    spec = importlib.util.spec_from_file_location(
        "rate_distortion_cli", ROOT / "scripts" / "rate_distortion.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_on_a_bare_export(tmp_path, capsys):
    budget_model().save_pretrained(tmp_path / "tok")
    out = tmp_path / "out"
    argv = [str(tmp_path / "tok"), "--num-images", "3", "--grid-images", "2", "--out", str(out)]
    assert load_cli().main(argv) == 0
    printed = capsys.readouterr().out
    assert "embedded validation photos at 32px" in printed and "tokenizer" in printed
    assert len(read_csv(out / "rate_distortion.csv")) == 12
    assert (out / "rate_distortion.png").is_file()
    assert Image.open(out / "grid.png").size == (5 * (SIZE + PAD) + PAD, 2 * (SIZE + PAD) + PAD + HEADER)


def test_cli_on_a_run_uses_its_validation_data(tmp_path, capsys):
    run = tmp_path / "run"
    budget_model().save_pretrained(run / "export")
    data = OmegaConf.load(ROOT / "conf" / "data" / "embedded.yaml")
    data.seed, data.image_size, data.source.num_val_samples, data.batch_size = 0, SIZE, 2, 2
    OmegaConf.save({"seed": 0, "data": data}, run / "config_resolved.yaml")
    assert load_cli().main([str(run), "--budgets", "2", "8", "--no-codecs"]) == 0
    printed = capsys.readouterr().out
    assert "validation data of the run" in printed and "only 2 images" in printed
    table = read_csv(run / "rate_distortion" / "rate_distortion.csv")
    assert [(r["method"], r["k"], r["num_images_reached"]) for r in table] == [
        ("tokenizer", "2", "2"),
        ("tokenizer", "8", "2"),
    ]


def test_cli_errors_are_clear(tmp_path, capsys):
    cli = load_cli()
    assert cli.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config_resolved.yaml").write_text("seed: 0\n")
    assert cli.main([str(tmp_path / "run")]) == 2
    assert "without an export" in capsys.readouterr().err
    conv = {
        "_target_": "tokenmill.tokenizers.ConvEncoder2D",
        "image_size": SIZE,
        "base_channels": 8,
        "channel_multipliers": [1],
        "num_res_blocks": 1,
        "token_dim": 4,
        "norm_groups": 4,
    }
    build_model(
        {
            "_target_": "tokenmill.tokenizers.Autoencoder",
            "encoder": conv,
            "decoder": {**conv, "_target_": "tokenmill.tokenizers.ConvDecoder2D"},
        }
    ).save_pretrained(tmp_path / "c")
    # a grid tokenizer has no budget: asking for fewer than all its tokens is refused by name
    assert cli.main([str(tmp_path / "c"), "--num-images", "1", "--budgets", "1"]) == 2
    assert "budgets [1] cannot be evaluated" in capsys.readouterr().err
