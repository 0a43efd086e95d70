"""tokenmill.export.hub and scripts/export_to_hub.py: training checkpoints (Lightning .ckpt files,
run directories, sharded DCP directories) to a save_pretrained directory with a model card,
reloaded and compared; --push goes through HfApi (mocked here; offline it fails clearly)."""

from __future__ import annotations

import functools
import importlib.util
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from tokenmill.export import from_pretrained
from tokenmill.export.hub import HubPushError, checkpoint_metrics, export_checkpoint, push_to_hub
from tokenmill.trainers.resume import checkpoint_problem
from tokenmill.trainers.run import train

from .conftest import ROOT, TINY_MODEL_OVERRIDES, compose_config

# torch.distributed.checkpoint in a single process without a process group says so once.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _script():
    spec = importlib.util.spec_from_file_location("export_to_hub", ROOT / "scripts" / "export_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hub") / "run"
    overrides = ["experiment=demo", *TINY_MODEL_OVERRIDES, "trainer.max_steps=6", "trainer.val_check_interval=3",
                 "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.model_checkpoint.save_top_k=-1"]
    train(compose_config(overrides, run_dir))
    return run_dir


def _outputs(model, seed: int = 0) -> torch.Tensor:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        return model(images, seed=0).reconstruction


def _same_weights(a, b) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_last_ckpt_exports_the_same_model_as_the_run(run_dir, tmp_path):
    result = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "out")
    assert (result.weights, result.global_step, result.max_abs_diff) == ("ema", 6, 0.0)
    _same_weights(tmp_path / "out", run_dir / "export")
    assert torch.equal(_outputs(from_pretrained(tmp_path / "out")), _outputs(from_pretrained(run_dir / "export")))

    card = (tmp_path / "out" / "README.md").read_text()
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert f"| val/psnr | {summary['val/psnr']:.4f} |" in card and "| global_step | 6 |" in card
    assert "## Training command" in card and (run_dir / "command.txt").read_text().strip() in card
    assert "## Data" in card and "EmbeddedSource" in card
    assert "## Training config (config_resolved.yaml)" in card and "num_latent_tokens: 8" in card
    assert "global_step 6; EMA weights" in card
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["metrics"]["val/psnr"] == summary["val/psnr"]


def test_run_directory_and_intermediate_checkpoints(run_dir, tmp_path):
    # A run directory means its newest checkpoint.
    assert export_checkpoint(run_dir, tmp_path / "newest").global_step == 6
    _same_weights(tmp_path / "newest", run_dir / "export")
    # An earlier checkpoint: its own weights, and the validation logged at its step.
    early = export_checkpoint(run_dir / "checkpoints" / "step_0000003.ckpt", tmp_path / "early")
    assert early.global_step == 3 and early.max_abs_diff == 0.0
    assert early.metrics["val/psnr"] != checkpoint_metrics(run_dir, 6)["val/psnr"]
    assert checkpoint_metrics(run_dir, 4) == {"global_step": 4}  # not validated at step 4: no metrics
    ckpt = torch.load(run_dir / "checkpoints" / "step_0000003.ckpt", weights_only=True)
    weights = load_file(tmp_path / "early" / "model.safetensors")
    assert all(torch.equal(weights[k], ckpt["state_dict"][f"ema.module.{k}"]) for k in weights)
    # --no-ema: the live weights.
    live = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "live", prefer_ema=False)
    assert live.weights == "live"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, last[f"net.{k}"]) for k, v in load_file(tmp_path / "live" / "model.safetensors").items())


@pytest.mark.parametrize("model_key", ["state_dict", "model"])  # ModelParallelStrategy / FSDPStrategy names
def test_sharded_dcp_checkpoint_exports_the_same_model(run_dir, tmp_path, model_key):
    """A sharded checkpoint as Lightning writes it: DCP shards of the model and optimizer states,
    plus meta.pt with everything else. Saved here in one process."""
    full = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    sharded = run_dir / "checkpoints" / f"sharded_{model_key}.ckpt"
    state = {model_key: full.pop("state_dict")}
    state.update({f"optimizer_{i}": opt for i, opt in enumerate(full.pop("optimizer_states"))})
    dcp.save(state, checkpoint_id=sharded)
    torch.save(full, sharded / "meta.pt")
    try:
        assert checkpoint_problem(sharded) is None
        result = export_checkpoint(sharded, tmp_path / "out")
        assert (result.global_step, result.weights, result.max_abs_diff) == (6, "ema", 0.0)
        _same_weights(tmp_path / "out", run_dir / "export")

        # A shard cut short (a write that did not finish) makes the directory unusable for resume.
        (shard,) = sharded.glob("*.distcp")
        shard.write_bytes(shard.read_bytes()[:100])
        assert "truncated" in checkpoint_problem(sharded)
    finally:
        import shutil

        shutil.rmtree(sharded)  # keep the module's run directory as it was for the other tests


def test_script_exports_and_pushes_with_hfapi(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", {"token": token}))

        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs))
            return f"https://huggingface.co/{kwargs['repo_id']}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    out = tmp_path / "out"
    code = _script().main([str(run_dir), "--out", str(out), "--repo-id", "me/titok-demo", "--push", "--private",
                           "--token", "hf_x"])
    assert code == 0
    assert calls == [
        ("init", {"token": "hf_x"}),
        ("create_repo", {"repo_id": "me/titok-demo", "repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", {"repo_id": "me/titok-demo", "repo_type": "model", "folder_path": str(out),
                           "commit_message": "tokenmill export of out"}),
    ]
    printed = capsys.readouterr().out
    assert "max abs diff 0 " in printed and "pushed to https://huggingface.co/me/titok-demo" in printed
    _same_weights(out, run_dir / "export")


def test_push_without_network_fails_with_a_clear_message(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    # A real HfApi aimed at a port where nothing listens: the connection is refused at once.
    monkeypatch.setattr(huggingface_hub, "HfApi", functools.partial(huggingface_hub.HfApi, endpoint="http://127.0.0.1:9"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    out = tmp_path / "out"
    code = _script().main([str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(out), "--repo-id", "me/x",
                           "--push", "--token", "hf_x"])
    err = capsys.readouterr().err
    assert code == 2
    assert "could not push to the Hugging Face Hub repo me/x" in err and "Connect" in err
    assert f"the export is complete in {out}" in err and (out / "model.safetensors").is_file()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set"):
        push_to_hub(out, "me/x")
    with pytest.raises(SystemExit):
        _script().main([str(run_dir), "--out", str(out), "--push"])  # --push needs --repo-id


def test_vlm_with_lora_is_rebuilt_whole_and_exports_merged_with_its_connector(tmp_path):
    from .test_vlm import TINY_VLM

    run_dir = tmp_path / "run"
    train(compose_config(["experiment=vqa_tiny", *TINY_VLM, "model.trainable=[connector\\.]",
                          "model.lora={target_modules: 'layers\\.\\d+\\.self_attn\\.(q|v)_proj$', rank: 4, alpha: 8}",
                          "trainer.max_steps=2", "trainer.val_check_interval=2"], run_dir))
    result = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "out")
    assert result.weights == "task" and result.max_abs_diff is None  # LoRA merged: not comparable by name
    _same_weights(tmp_path / "out", run_dir / "export")
    _same_weights(tmp_path / "out" / "connector", run_dir / "export" / "connector")
    assert not any("lora" in k for k in load_file(tmp_path / "out" / "model.safetensors"))
