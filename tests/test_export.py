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


def test_missing_and_unexpected_tensors_are_refused_but_tied_weights_load(tmp_path):
    from safetensors.torch import load_file, save_file

    build_model(tiny_autoencoder_config()).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "model.safetensors"
    state = load_file(weights)
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(weights))
    with pytest.raises(ValueError, match=rf"missing 1 tensors \(e.g. \['{dropped}'\]\)"):
        from_pretrained(tmp_path / "a")
    save_file({**state, "extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match=r"unexpected 1 tensors \(e.g. \['extra.weight'\]\)"):
        from_pretrained(tmp_path / "a")

    # A weight shared by two modules is stored once by safetensors and still loads.
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.Linear(3, 3)
            self.b.weight = self.a.weight

    from tokenmill.export.pretrained import load_pretrained_weights, save_pretrained

    tied = Tied()
    tied._tokenmill_config = {"_target_": "torch.nn.Identity"}  # only the weights matter here
    save_pretrained(tied, tmp_path / "tied")
    fresh = Tied()
    load_pretrained_weights(fresh, tmp_path / "tied")
    assert torch.equal(fresh.b.weight, tied.a.weight) and fresh.b.weight is fresh.a.weight
