"""Behaviour of tokenmill.losses: reconstruction, LPIPS, discriminator, adversarial terms."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from tokenmill.losses import (
    LPIPS,
    LeCamEMA,
    PatchGANDiscriminator,
    PerceptualLoss,
    VGG16Features,
    adaptive_generator_weight,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
    vanilla_d_loss,
    vanilla_g_loss,
)
from tokenmill.losses.perceptual import RandomWeightsWarning

REPO_ROOT = Path(__file__).resolve().parents[1]


def _random_lpips() -> LPIPS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return LPIPS()


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    torch.manual_seed(0)
    return _random_lpips()


@pytest.fixture
def images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    return x, y


# --- reconstruction -------------------------------------------------------------------


def test_reconstruction_loss_values():
    pred = torch.tensor([[1.0, -2.0, 0.5]])
    target = torch.tensor([[0.0, 0.0, 0.5]])
    assert reconstruction_loss(pred, target, "l1").item() == pytest.approx((1 + 2 + 0) / 3)
    assert reconstruction_loss(pred, target, "l2").item() == pytest.approx((1 + 4 + 0) / 3)
    assert reconstruction_loss(pred, target).item() == pytest.approx(5 / 3)  # l2 is the default


def test_reconstruction_loss_rejects_unknown_kind_and_shape_mismatch():
    with pytest.raises(ValueError, match="'huber'.*'l1', 'l2'"):
        reconstruction_loss(torch.zeros(2), torch.zeros(2), kind="huber")
    with pytest.raises(ValueError, match=r"\(2, 3\) vs \(3,\)"):
        reconstruction_loss(torch.zeros(2, 3), torch.zeros(3))


# --- VGG trunk and LPIPS -------------------------------------------------------------------


def test_vgg16_features_layout_matches_torchvision_indices():
    trunk = VGG16Features()
    conv_indices = sorted({int(k.split(".")[1]) for k in trunk.state_dict()})
    assert conv_indices == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert trunk.state_dict()["features.28.weight"].shape == (512, 512, 3, 3)
    assert all(not m.inplace for m in trunk.features if isinstance(m, nn.ReLU))
    taps = trunk(torch.zeros(1, 3, 32, 32))
    assert [t.shape[1] for t in taps] == [64, 128, 256, 512, 512]
    assert [t.shape[-1] for t in taps] == [32, 16, 8, 4, 2]


def test_lpips_state_dict_layout(lpips):
    keys = set(lpips.state_dict())
    assert {f"lin{k}.weight" for k in range(5)} <= keys
    assert "net.features.0.weight" in keys and "net.features.28.bias" in keys
    assert lpips.state_dict()["lin3.weight"].shape == (1, 512, 1, 1)
    # The scaling constants are not part of the weights file.
    assert not any(k in keys for k in ("shift", "scale"))


def test_lpips_is_zero_on_identical_and_positive_symmetric_otherwise(lpips, images):
    x, y = images
    assert lpips(x, x).item() == pytest.approx(0.0, abs=1e-7)
    d_xy = lpips.distance(x, y)
    d_yx = lpips.distance(y, x)
    assert d_xy.shape == (2,)
    assert (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx)
    assert lpips(x, y).item() == pytest.approx(d_xy.mean().item())


def test_lpips_gradients_reach_inputs_not_parameters(lpips, images):
    x, y = images
    x = x.clone().requires_grad_(True)
    lpips(x, y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips.parameters())
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_train_call_keeps_eval_mode(lpips):
    container = nn.ModuleDict({"lpips": lpips}).train()
    assert container.training
    assert not lpips.training
    assert not any(m.training for m in lpips.modules())


def test_lpips_warns_once_without_weights():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = LPIPS()
        model(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    random_warnings = [w for w in caught if issubclass(w.category, RandomWeightsWarning)]
    assert len(random_warnings) == 1
    assert "random" in str(random_warnings[0].message)


def test_lpips_safetensors_round_trip(tmp_path, images):
    torch.manual_seed(2)
    source = _random_lpips()
    with torch.no_grad():  # non-uniform heads, so the test also covers head loading
        for head in source.heads:
            head.weight.uniform_(0.0, 0.1)
    path = tmp_path / "lpips.safetensors"
    save_file(source.state_dict(), str(path))

    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # a loaded model must not warn
        loaded = LPIPS(weights_path=str(path))
    x, y = images
    assert not torch.equal(_random_lpips().distance(x, y), source.distance(x, y))
    torch.testing.assert_close(loaded.distance(x, y), source.distance(x, y), rtol=0, atol=0)


def test_lpips_loads_pt_with_weights_only(tmp_path, lpips, images):
    path = tmp_path / "lpips.pt"
    torch.save(lpips.state_dict(), path)
    loaded = LPIPS(weights_path=str(path))
    x, y = images
    torch.testing.assert_close(loaded(x, y), lpips(x, y), rtol=0, atol=0)


def test_lpips_strict_loading_names_missing_key_and_shape_mismatch(tmp_path, lpips):
    state = dict(lpips.state_dict())
    del state["lin2.weight"]
    state["net.features.5.weight"] = torch.zeros(128, 64, 1, 1)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError) as error:
        LPIPS(weights_path=str(path))
    message = str(error.value)
    assert str(path) in message
    assert "missing keys: lin2.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "net.features.5.weight: expected (128, 64, 3, 3), got (128, 64, 1, 1)" in message


def test_lpips_rejects_negative_heads(tmp_path, lpips):
    state = dict(lpips.state_dict())
    state["lin1.weight"] = -torch.ones(1, 128, 1, 1)
    path = tmp_path / "negative.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="lin1.weight has negative entries"):
        LPIPS(weights_path=str(path))


def test_lpips_missing_file_names_path_and_converter(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="convert_lpips_weights.py") as error:
        LPIPS(weights_path=str(path))
    assert str(path) in str(error.value)


class _TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x):
        a = torch.relu(self.conv_a(x))
        return [a, torch.relu(self.conv_b(a))]


def test_lpips_accepts_plugged_backbone_and_checks_tap_channels(images):
    x, y = images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = LPIPS(backbone=_TinyBackbone(), channels=(4, 6))
        wrong = LPIPS(backbone=_TinyBackbone(), channels=(4, 8))
    assert model(x, y).item() > 0
    assert model(x, x).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="tap 1 has 6 channels, expected 8"):
        wrong(x, y)


def test_perceptual_loss_wraps_network_in_fp32(lpips, images):
    x, y = images
    loss_fn = PerceptualLoss(lpips)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        value = loss_fn(x, y)
    assert value.dtype == torch.float32 and value.dim() == 0
    torch.testing.assert_close(value, lpips(x, y))
    loss_fn.train()
    assert loss_fn.training and not loss_fn.network.training


def test_perceptual_loss_stays_fp32_when_parent_is_cast_to_bf16(images):
    torch.manual_seed(5)
    network = _random_lpips()
    reference = network.distance(*images).mean()
    parent = nn.ModuleDict({"perceptual": PerceptualLoss(network), "other": nn.Linear(2, 2)})
    parent.to(torch.bfloat16)  # what Lightning's "bf16-true" precision does to the LightningModule
    assert parent["other"].weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in network.state_dict().values())
    x, y = (image.to(torch.bfloat16) for image in images)
    value = parent["perceptual"](x, y)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, rtol=2e-2, atol=1e-4)  # only input rounding differs


def test_perceptual_loss_reduces_per_image_networks_and_freezes_them():
    class PerImageL1(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, a, b):
            return self.scale * (a - b).abs().flatten(1).mean(1)

    network = PerImageL1()
    loss_fn = PerceptualLoss(network)
    assert not network.scale.requires_grad
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), 3 * torch.ones(1, 2, 2)])
    assert loss_fn(pred, target).item() == pytest.approx(2.0 * (1 + 3) / 2)


def _load_converter():
    spec = importlib.util.spec_from_file_location(
        "convert_lpips_weights", REPO_ROOT / "scripts/convert_lpips_weights.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converter_round_trip(tmp_path, lpips, images):
    converter = _load_converter()
    generator = torch.Generator().manual_seed(4)
    # Fake torchvision checkpoint: features.* plus classifier keys that must be dropped.
    vgg_state = {
        key.removeprefix("net."): torch.randn(value.shape, generator=generator) * 0.05
        for key, value in lpips.state_dict().items()
        if key.startswith("net.")
    }
    vgg_state["classifier.0.weight"] = torch.zeros(8, 8)
    lin_state = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator)
        for k, c in enumerate(lpips.channels)
    }
    torch.save(vgg_state, tmp_path / "vgg16.pth")
    torch.save(lin_state, tmp_path / "vgg.pth")
    out = tmp_path / "out" / "lpips_vgg.safetensors"

    assert (
        converter.main(
            ["--vgg", str(tmp_path / "vgg16.pth"), "--lin", str(tmp_path / "vgg.pth"), "--out", str(out)]
        )
        == 0
    )

    written = load_file(str(out))
    assert set(written) == set(lpips.state_dict())
    torch.testing.assert_close(written["net.features.0.weight"], vgg_state["features.0.weight"])
    torch.testing.assert_close(written["lin4.weight"], lin_state["lin4.model.1.weight"])
    x, y = images
    assert LPIPS(weights_path=str(out))(x, y).item() > 0


def test_converter_rejects_wrong_head_shape(tmp_path, lpips):
    converter = _load_converter()
    vgg_state = {k.removeprefix("net."): v for k, v in lpips.state_dict().items() if k.startswith("net.")}
    lin_state = {f"lin{k}.model.1.weight": torch.ones(1, c, 1, 1) for k, c in enumerate(lpips.channels)}
    lin_state["lin0.model.1.weight"] = torch.ones(1, 32, 1, 1)
    torch.save(vgg_state, tmp_path / "vgg16.pth")
    torch.save(lin_state, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match=r"lin0.weight: expected \(1, 64, 1, 1\), got \(1, 32, 1, 1\)"):
        converter.convert(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")


# --- discriminator -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 256])
def test_patchgan_output_shape(size):
    disc = PatchGANDiscriminator(base_channels=8, num_layers=3)
    # Three stride-2 convs divide by 8; each of the two final k4/s1/p1 convs removes one pixel.
    expected = size // 8 - 2
    assert disc(torch.zeros(2, 3, size, size)).shape == (2, 1, expected, expected)


@pytest.mark.parametrize(
    "norm, norm_type", [("group", nn.GroupNorm), ("batch", nn.BatchNorm2d), ("none", None)]
)
def test_patchgan_norms(norm, norm_type):
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(base_channels=16, norm=norm)
    norms = [m for m in disc.modules() if isinstance(m, nn.GroupNorm | nn.BatchNorm2d)]
    if norm_type is None:
        assert norms == []
    else:
        assert len(norms) == 3 and all(isinstance(m, norm_type) for m in norms)
        weights = torch.cat([m.weight for m in norms])
        assert abs(weights.mean().item() - 1.0) < 0.01 and weights.std().item() < 0.05
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert convs[1].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_patchgan_channel_multiplier_is_capped():
    disc = PatchGANDiscriminator(base_channels=4, num_layers=5)
    widths = [m.out_channels for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [4, 8, 16, 32, 32, 32, 1]


def test_patchgan_unknown_norm():
    with pytest.raises(ValueError, match="'layer'.*group, batch, none"):
        PatchGANDiscriminator(norm="layer")


# --- adversarial ---------------------------------------------------------------------------


def test_hinge_losses_hand_computed():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2.0 -> mean 2.5/3
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1.0, 2.0 -> mean 1.0
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.0) / 3)


def test_vanilla_losses_hand_computed():
    real = torch.tensor([0.0, 2.0])
    fake = torch.tensor([0.0, -1.0])
    log1p_exp = lambda v: torch.log1p(torch.exp(torch.tensor(v))).item()  # noqa: E731
    expected_d = 0.5 * ((log1p_exp(0.0) + log1p_exp(-2.0)) / 2 + (log1p_exp(0.0) + log1p_exp(-1.0)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected_d)
    # Non-saturating: -log(sigmoid(f)).
    expected_g = -(torch.log(torch.sigmoid(fake))).mean().item()
    assert vanilla_g_loss(fake).item() == pytest.approx(expected_g)


def test_lecam_ema_updates_and_penalty():
    lecam = LeCamEMA(decay=0.9)
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}
    real = torch.tensor([1.0, 3.0])  # mean 2
    fake = torch.tensor([-4.0, 0.0])  # mean -2
    lecam.update(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.2)
    assert lecam.ema_fake.item() == pytest.approx(-0.2)
    lecam.update(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.9 * 0.2 + 0.1 * 2)
    assert lecam.ema_fake.item() == pytest.approx(-(0.9 * 0.2 + 0.1 * 2))

    ema_real, ema_fake = lecam.ema_real.item(), lecam.ema_fake.item()  # 0.38, -0.38
    real_term = ((real - ema_fake).clamp(min=0) ** 2).mean()
    fake_term = ((ema_real - fake).clamp(min=0) ** 2).mean()
    hand = ((1 + 0.38) ** 2 + (3 + 0.38) ** 2) / 2 + ((0.38 + 4) ** 2 + 0.38**2) / 2
    assert lecam.penalty(real, fake).item() == pytest.approx(hand, rel=1e-5)
    assert (real_term + fake_term).item() == pytest.approx(hand, rel=1e-5)
    # Logits that sit on the right side of the EMAs are not penalised.
    assert lecam.penalty(torch.tensor([-1.0]), torch.tensor([1.0])).item() == 0.0


def test_lecam_penalty_has_gradient_and_buffers_restore():
    lecam = LeCamEMA()
    lecam.update(torch.tensor([5.0]), torch.tensor([-5.0]))
    logits = torch.tensor([1.0], requires_grad=True)
    lecam.penalty(logits, torch.tensor([-1.0])).backward()
    assert logits.grad.item() == pytest.approx(2 * (1.0 - lecam.ema_fake.item()))
    restored = LeCamEMA()
    restored.load_state_dict(lecam.state_dict())
    assert restored.ema_real.item() == pytest.approx(0.005)


def test_lecam_ema_stays_fp32_under_half_precision_cast():
    lecam = LeCamEMA(decay=0.999)
    lecam.update(torch.tensor([1.0]), torch.tensor([-1.0]))
    lecam.to(torch.bfloat16)
    assert lecam.ema_real.dtype == torch.float32 and lecam.ema_real.item() == pytest.approx(0.001)
    lecam.update(torch.tensor([1.0]), torch.tensor([-1.0]))
    assert lecam.ema_real.item() == pytest.approx(0.999 * 0.001 + 0.001)
    assert "ema_real" in lecam.state_dict()


def test_adaptive_generator_weight_matches_manual_ratio_and_is_clamped():
    torch.manual_seed(0)
    last_layer = torch.randn(4, 3, requires_grad=True)
    inputs = torch.randn(5, 4)
    output = inputs @ last_layer
    nll = (output - 1).pow(2).mean()
    g = -0.01 * output.mean()

    weight = adaptive_generator_weight(nll, g, last_layer)
    (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g, last_layer, retain_graph=True)
    expected = nll_grad.norm() / (g_grad.norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not weight.requires_grad
    # The graph is retained, so the caller can still backpropagate the combined loss.
    (nll + weight * g).backward()
    assert last_layer.grad is not None

    output = inputs @ last_layer
    clamped = adaptive_generator_weight(
        (output - 1).pow(2).mean(), -1e-9 * output.mean(), last_layer, max_weight=3.0
    )
    assert clamped.item() == 3.0


def test_adaptive_generator_weight_errors():
    frozen = torch.randn(3)
    with pytest.raises(ValueError, match="requires grad"):
        adaptive_generator_weight(frozen.sum(), frozen.sum(), frozen)
    weight = torch.randn(3, requires_grad=True)
    other = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="g_loss does not depend on last_layer"):
        adaptive_generator_weight((weight**2).sum(), other.sum(), weight)
