import json

import pytest
import torch

from tokenmill.export import build_model, from_pretrained
from tokenmill.tokenizers import Autoencoder

from .conftest import tiny_autoencoder_config


def test_save_and_load_round_trip_is_exact(tmp_path):
    net = build_model(tiny_autoencoder_config())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    net.save_pretrained(tmp_path / "export", metrics={"val/psnr": 20.5})
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (tmp_path / "export").iterdir()}
    loaded = Autoencoder.from_pretrained(tmp_path / "export")
    assert torch.equal(loaded.reconstruct(images), net.eval().reconstruct(images))
    assert json.loads((tmp_path / "export" / "config.json").read_text())["metrics"]["val/psnr"] == 20.5
    assert "val/psnr" in (tmp_path / "export" / "README.md").read_text()


def test_mismatched_weights_are_refused_with_names(tmp_path):
    build_model(tiny_autoencoder_config(codebook=32)).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["model"]["quantizer"]["codebook_size"] = 64
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantizer.embedding.weight: checkpoint \(32, 8\) vs model \(64, 8\)"):
        from_pretrained(tmp_path / "a")


def test_untrusted_targets_and_missing_files_are_refused(tmp_path):
    build_model(tiny_autoencoder_config()).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["model"]["encoder"]["_target_"] = "os.system"
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"refusing to instantiate model.encoder._target_='os.system'"):
        from_pretrained(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        from_pretrained(tmp_path / "nowhere")


def test_model_without_recorded_config_cannot_be_saved(tmp_path):
    from hydra.utils import instantiate

    net = instantiate(tiny_autoencoder_config())
    with pytest.raises(ValueError, match="build_model"):
        net.save_pretrained(tmp_path / "x")
