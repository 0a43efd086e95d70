"""MAGVIT-v2-style convolutional encoder/decoder: shapes, errors, and a conv + LFQ tokenizer
that trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.export import build_model
from tokenmill.tokenizers import Autoencoder, ConvDecoder2D, ConvEncoder2D
from tokenmill.tokenizers.conv2d import AdaptiveGroupNorm


@pytest.fixture(autouse=True)
def _one_thread():
    """Convs this small gain nothing from intra-op threads, and when another process holds a core
    the second OpenMP thread stalls every op: the overfit test takes ~3 s on one thread and ~100 s
    on two under such load."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def conv_kwargs(image_size=32, base=16, mults=(1, 2), blocks=1, token_dim=8, groups=8):
    return dict(
        image_size=image_size,
        base_channels=base,
        channel_multipliers=list(mults),
        num_res_blocks=blocks,
        token_dim=token_dim,
        norm_groups=groups,
    )


def conv_lfq_config(spherical=False, adaptive_norm=True, **kwargs):
    common = conv_kwargs(**kwargs)
    return {
        "_target_": "tokenmill.tokenizers.Autoencoder",
        "encoder": {"_target_": "tokenmill.tokenizers.ConvEncoder2D", **common},
        "quantizer": {
            "_target_": "tokenmill.quantizers.LFQ",
            "dim": common["token_dim"],
            "spherical": spherical,
        },
        "decoder": {
            "_target_": "tokenmill.tokenizers.ConvDecoder2D",
            **common,
            "adaptive_norm": adaptive_norm,
        },
    }


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency images in [-1, 1] (random 4x4 colour fields, bilinearly upsampled)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize(
    ("image_size", "mults", "blocks", "decoder_extra", "grid"),
    [
        (32, (1, 2), 1, {}, 16),
        (64, (1, 1, 2), 2, {"upsample": "nearest"}, 16),
        (32, (1, 2, 2, 4), 1, {"adaptive_norm": False}, 4),
        (16, (2,), 1, {}, 16),  # one level: no downsampling
    ],
    ids=["2lvl", "3lvl_nearest", "4lvl_plain_norm", "1lvl"],
)
def test_encoder_decoder_shapes(image_size, mults, blocks, decoder_extra, grid):
    kwargs = conv_kwargs(image_size=image_size, mults=mults, blocks=blocks, token_dim=6)
    encoder = ConvEncoder2D(**kwargs)
    decoder = ConvDecoder2D(**kwargs, **decoder_extra)
    images = torch.rand(2, 3, image_size, image_size) * 2 - 1
    tokens = encoder(images)
    assert tokens.shape == (2, grid * grid, 6)
    assert encoder.num_latent_tokens == decoder.num_latent_tokens == grid * grid
    assert decoder(tokens).shape == images.shape
    assert decoder.last_layer is decoder.conv_out.weight


def test_tokens_are_the_grid_flattened_row_major():
    encoder, decoder = ConvEncoder2D(**conv_kwargs()), ConvDecoder2D(**conv_kwargs())
    captured = {}
    encoder.conv_out.register_forward_hook(lambda module, args, out: captured.update(grid=out))
    tokens = encoder(torch.rand(1, 3, 32, 32))
    grid = captured["grid"]  # [1, D, 16, 16], before flattening
    assert torch.equal(tokens[0, 1 * 16 + 5], grid[0, :, 1, 5])  # token i*w + j is grid cell (i, j)
    assert torch.equal(decoder.tokens_to_grid(tokens), grid)


def test_decoder_refuses_wrong_token_count_naming_both_shapes():
    decoder = ConvDecoder2D(**conv_kwargs(image_size=32, mults=(1, 2, 2), token_dim=8))  # 8x8 grid
    with pytest.raises(
        ValueError,
        match=r"expects tokens \[B, 64, 8\] \(a 8x8 grid: 32px images downsampled x4\), got \(1, 63, 8\)",
    ):
        decoder(torch.zeros(1, 63, 8))
    with pytest.raises(ValueError, match=r"expects tokens \[B, 64, 8\].*got \(1, 64, 7\)"):
        decoder(torch.zeros(1, 64, 7))


def test_bad_sizes_are_refused():
    encoder = ConvEncoder2D(**conv_kwargs(image_size=32))
    with pytest.raises(ValueError, match=r"built for 32x32 images, got \(64, 64\)"):
        encoder(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"image_size=30 is not divisible by the downsampling factor 4"):
        ConvEncoder2D(**conv_kwargs(image_size=30, mults=(1, 2, 2)))
    with pytest.raises(ValueError, match=r"24 channels are not divisible by norm_groups=16"):
        ConvDecoder2D(**conv_kwargs(base=12, mults=(1, 2), groups=16))
    with pytest.raises(ValueError, match="upsample must be one of"):
        ConvDecoder2D(**conv_kwargs(), upsample="bilinear")


def test_adaptive_norm_starts_as_plain_group_norm():
    norm = AdaptiveGroupNorm(cond_channels=6, channels=16, norm_groups=4)
    x = torch.randn(2, 16, 5, 5)
    out = norm(x, torch.rand(2, 6), torch.randn(2, 6))
    assert torch.allclose(out, F.group_norm(x, 4, eps=1e-6), atol=1e-6)


@pytest.mark.parametrize("spherical", [False, True], ids=["lfq", "bsq"])
def test_conv_lfq_autoencoder_round_trips_indices(spherical):
    net = build_model(conv_lfq_config(spherical=spherical, token_dim=8)).eval()
    assert isinstance(net, Autoencoder) and net.codebook_size == 2**8
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    out = net(images)
    assert out.reconstruction.shape == images.shape
    assert out.codes.shape == (3, 256, 8) and out.indices.shape == (3, 256)
    assert out.indices.dtype == torch.long and int(out.indices.max()) < 2**8
    assert torch.equal(net.decode_indices(out.indices), net.decode(out.codes))
    assert torch.equal(net.decode_indices(out.indices), out.reconstruction)


def test_gradient_reaches_the_encoder_through_the_quantizer():
    net = build_model(conv_lfq_config(token_dim=8))
    out = net(torch.rand(2, 3, 32, 32) * 2 - 1)
    out.reconstruction.square().mean().backward()  # reconstruction only: no path around the quantizer
    for param in (net.encoder.conv_in.weight, net.encoder.conv_out.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    # the adaptive norms learn from the codes' statistics
    assert net.decoder.levels[0].adaptive.scale.weight.grad.abs().sum() > 0


def test_tiny_conv_lfq_tokenizer_overfits_a_batch():
    """100 Adam steps on 4 smooth 32px images: reconstruction MSE falls > 3x (about 10x in
    practice, in ~3 s). 12 bits, so LFQ uses its factorised codebook entropy."""
    torch.manual_seed(0)
    net = build_model(conv_lfq_config(token_dim=12, base=8, mults=(1, 2), blocks=1, groups=4))
    images = smooth_images(4, 32)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        out = net(images)
        rec = F.mse_loss(out.reconstruction, images)
        loss = rec + sum(out.losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(rec.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first / 3, f"reconstruction MSE {first:.4f} -> {last:.4f}"


def test_conv_tokenizer_export_round_trip_is_exact(tmp_path):
    net = build_model(conv_lfq_config(token_dim=8, mults=(1, 2, 2))).eval()
    net.save_pretrained(tmp_path / "export")
    loaded = Autoencoder.from_pretrained(tmp_path / "export")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert isinstance(loaded.decoder, ConvDecoder2D) and loaded.decoder.num_latent_tokens == 64
    assert torch.equal(loaded.reconstruct(images), net.reconstruct(images))
