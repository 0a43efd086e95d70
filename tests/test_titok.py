import pytest
import torch

from tokenmill.export import build_model
from tokenmill.tokenizers import Autoencoder

from .conftest import tiny_autoencoder_config


def test_titok_shapes_and_index_decoding():
    net = build_model(tiny_autoencoder_config(image_size=32, patch_size=8, tokens=8, token_dim=8))
    assert isinstance(net, Autoencoder)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    out = net(images)
    assert out.reconstruction.shape == (3, 3, 32, 32)
    assert out.codes.shape == (3, 8, 8) and out.indices.shape == (3, 8)
    assert out.indices.dtype == torch.long and int(out.indices.max()) < 32
    # decoding the indices gives the same image as the forward pass
    assert torch.allclose(net.decode_indices(out.indices), out.reconstruction, atol=1e-5)


def test_every_pixel_depends_only_on_tokens():
    net = build_model(tiny_autoencoder_config())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    q = net.encode(images)
    swapped = net.decode(q.codes.flip(0))
    assert torch.allclose(swapped, net.decode(q.codes).flip(0), atol=1e-5)


def test_wrong_image_size_and_token_count_are_refused():
    net = build_model(tiny_autoencoder_config(image_size=32))
    with pytest.raises(ValueError, match=r"built for 32x32 images, got \(64, 64\)"):
        net(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="expects 8 tokens, got 5"):
        net.decode(torch.zeros(1, 5, 8))
    with pytest.raises(Exception, match="image_size=30 is not divisible by patch_size=8"):
        build_model(tiny_autoencoder_config(image_size=30))


@pytest.mark.parametrize(
    "quantizer",
    [
        {"_target_": "tokenmill.quantizers.FSQ", "levels": [8, 5, 5, 5]},
        {"_target_": "tokenmill.quantizers.LFQ", "dim": 4},
        {"_target_": "tokenmill.quantizers.LFQ", "dim": 4, "spherical": True},
        {"_target_": "tokenmill.quantizers.ResidualFSQ", "levels": [8, 5, 5, 5], "num_quantizers": 2},
    ],
    ids=["fsq", "lfq", "bsq", "residual_fsq"],
)
def test_bottleneck_is_chosen_by_config(quantizer):
    cfg = tiny_autoencoder_config(token_dim=4)
    cfg.quantizer = quantizer
    net = build_model(cfg).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = net(images)
    assert out.reconstruction.shape == images.shape
    assert torch.equal(net.decode_indices(out.indices), out.reconstruction)
    out.reconstruction.sum().backward()  # straight-through: the encoder gets gradients
    assert net.encoder.to_tokens.weight.grad.abs().sum() > 0
