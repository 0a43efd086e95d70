"""Any training checkpoint -> a `save_pretrained` directory with a model card -> (optionally) the Hub.

Accepted sources:

* a run directory (its newest readable checkpoint, as `ckpt_path=auto` would pick it);
* a Lightning `.ckpt` file (loaded with weights_only=True);
* a sharded checkpoint directory (torch.distributed.checkpoint format, as Lightning's
  ModelParallelStrategy / FSDP with sharded state dicts write it): converted to one file with
  `dcp_to_torch_save` in a temporary directory first.

The model is rebuilt from the run's `config_resolved.yaml`. For a TokenizerTask only `model.net`
is built, and loaded with the EMA weights (`ema.module.*`) when the checkpoint has them, else
with the live ones (`net.*`): what the run's own export saves. Other tasks (VLMTask: LoRA merged,
plus the connector; RegisterDistillation) are rebuilt whole, loaded strictly and export
themselves, as in `tokenmill.trainers.run.train`.

The card carries the validation metrics of the checkpoint's own weights (metrics.json for the
final step, else the CSV log of a validation at that step, else none), the data section, the command(s) that
trained it (command.txt) and the resolved training config.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import tokenmill.config  # noqa: F401  (resolvers a run config may use)
from tokenmill.export.pretrained import _check_state_dict, build_model, from_pretrained, save_pretrained
from tokenmill.trainers.resume import (
    SHARDED_META_NAME,
    is_sharded_checkpoint,
    latest_valid_checkpoint,
    recorded_commands,
)

log = logging.getLogger(__name__)

RUN_CONFIG_NAME = "config_resolved.yaml"


class HubPushError(RuntimeError):
    """Pushing to the Hugging Face Hub failed (offline, no token, no access, ...)."""


@dataclass
class HubExport:
    directory: Path
    checkpoint: Path
    run_dir: Path
    global_step: int | None
    weights: str  # "ema", "live" or "task"
    metrics: dict[str, Any] = field(default_factory=dict)
    max_abs_diff: float | None = None  # reloaded export vs the model built here (state dict and forward)


# ---------------------------------------------------------------------------------- sources
def find_run_dir(path: Path) -> Path:
    """The run directory a checkpoint belongs to: the nearest ancestor with config_resolved.yaml."""
    for candidate in [path, *path.parents][:4]:
        if (candidate / RUN_CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"no {RUN_CONFIG_NAME} in {path} or its parents: the model is rebuilt from the run's "
        "resolved config, so point at a checkpoint inside its run directory (or pass --config)"
    )


def resolve_source(source: Path) -> tuple[Path, Path]:
    """(checkpoint, run directory) for a run directory, a .ckpt file or a sharded checkpoint dir."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if source.is_dir() and not is_sharded_checkpoint(source) and (source / RUN_CONFIG_NAME).is_file():
        checkpoint = latest_valid_checkpoint(source)
        if checkpoint is None:
            raise FileNotFoundError(f"run directory {source} has no readable checkpoint in checkpoints/")
        return checkpoint, source
    if source.is_file() or is_sharded_checkpoint(source):
        return source, find_run_dir(source.parent)
    raise FileNotFoundError(f"{source} is neither a run directory, a checkpoint file nor a sharded checkpoint")


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as one dict with a `state_dict` (sharded: converted through a temp file)."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="tokenmill-dcp-") as tmp:
        converted = Path(tmp) / "checkpoint.pt"
        dcp_to_torch_save(path, converted)
        checkpoint = torch.load(converted, map_location="cpu", weights_only=True)
    if (path / SHARDED_META_NAME).is_file():  # Lightning's non-tensor state (global_step, loops, ...)
        checkpoint = {**torch.load(path / SHARDED_META_NAME, map_location="cpu", weights_only=True), **checkpoint}
    if "state_dict" not in checkpoint and "model" in checkpoint:  # FSDPStrategy's name for it
        checkpoint["state_dict"] = checkpoint.pop("model")
    return checkpoint


def select_weights(state_dict: dict[str, torch.Tensor], prefer_ema: bool = True) -> tuple[dict, str]:
    """The network's weights from a task state dict: EMA ("ema.module.*") if present, else "net.*"."""
    for prefix, kind in (("ema.module.", "ema"), ("net.", "live")):
        if kind == "ema" and not prefer_ema:
            continue
        weights = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if weights:
            return weights, kind
    prefixes = sorted({k.split(".", 1)[0] for k in state_dict})
    raise ValueError(f"checkpoint has neither ema.module.* nor net.* weights (top-level names: {prefixes})")


# ----------------------------------------------------------------------------------- metrics
def _validation_rows(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if any(k.startswith("val/") and v for k, v in r.items())]
    return rows


def checkpoint_metrics(run_dir: Path, global_step: int | None) -> dict[str, Any]:
    """Validation metrics of the weights at the checkpoint's step.

    metrics.json when it describes that step (the final one); else the validation the CSV logger
    recorded during training right after that step. Lightning logs such a validation with
    step = global_step - 1 (its logging counter advances after validation). With no validation at
    that step there are no metrics but the step: nothing measured on other weights is reported.
    """
    summary_path = run_dir / "metrics.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if global_step is None or summary.get("global_step") == global_step:
            return {"global_step": summary.get("global_step"), **{k: v for k, v in summary.items() if k.startswith("val/")}}
    if global_step is None:
        return {}
    rows = [r for r in _validation_rows(run_dir) if int(r["step"]) == global_step - 1]
    if not rows:
        log.info("no validation was logged at global_step %d: the card lists no metrics", global_step)
        return {"global_step": global_step}
    row = rows[-1]  # the newest log (a resumed run's) when a step was validated twice
    return {"global_step": global_step, **{k: float(v) for k, v in row.items() if k.startswith("val/") and v}}


# ------------------------------------------------------------------------------------ export
def _is_tokenizer_task(cfg: DictConfig) -> bool:
    """TokenizerTask exports its eval net (EMA) as is: rebuilding model.net alone is enough, and
    avoids building the perceptual network and discriminator. Other tasks are rebuilt whole."""
    from hydra.utils import get_class

    from tokenmill.trainers.tokenizer_task import TokenizerTask

    return issubclass(get_class(cfg.model._target_), TokenizerTask)


def _forward_diff(a: nn.Module, b: nn.Module, cfg: DictConfig) -> float | None:
    """Max |a(x) - b(x)| of two autoencoders on fixed random images (None for other models)."""
    from tokenmill.tokenizers import Autoencoder

    size = OmegaConf.select(cfg, "data.image_size")
    if not (isinstance(a, Autoencoder) and size):
        return None
    images = torch.rand(2, 3, int(size), int(size), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ya = a.eval()(images, seed=0).reconstruction
        yb = b.eval()(images, seed=0).reconstruction
    return float((ya - yb).abs().max())


def _state_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    diffs = [float((sa[k].float() - sb[k].float()).abs().max()) if sa[k].numel() else 0.0 for k in sa if k in sb]
    if set(sa) != set(sb):
        raise ValueError(f"reloaded export has different tensors: {sorted(set(sa) ^ set(sb))[:5]}")
    return max(diffs, default=0.0)


def model_card_extra(run_dir: Path, cfg: DictConfig, checkpoint: Path, step: int | None, weights: str) -> dict:
    described = {"ema": "EMA weights", "live": "live (non-EMA) weights", "task": "the task's own export"}[weights]
    return {
        "Training command": recorded_commands(run_dir) if (run_dir / "command.txt").is_file() else "(not recorded)",
        "Source checkpoint": f"{checkpoint} (global_step {step}; {described})",
        "Data": OmegaConf.to_yaml(cfg.data, resolve=True).strip() if "data" in cfg else "(none)",
        f"Training config ({RUN_CONFIG_NAME})": OmegaConf.to_yaml(cfg, resolve=True).strip(),
    }


def export_checkpoint(
    source: Path | str, out: Path | str, config: Path | str | None = None, prefer_ema: bool = True
) -> HubExport:
    """Write a save_pretrained directory for `source` into `out`, reload it and compare."""
    checkpoint_path, run_dir = resolve_source(Path(source))
    cfg = OmegaConf.load(Path(config) if config else run_dir / RUN_CONFIG_NAME)
    checkpoint = load_training_checkpoint(checkpoint_path)
    state_dict = checkpoint["state_dict"]
    step = checkpoint.get("global_step")
    step = int(step) if step is not None else None
    metrics = checkpoint_metrics(run_dir, step)
    out = Path(out)

    if not _is_tokenizer_task(cfg):  # e.g. VLMTask: LoRA merged, plus connector/
        from tokenmill.trainers.run import build_task

        task = build_task(cfg)
        task.load_state_dict(state_dict, strict=True)
        kind, model = "task", task.eval_net
        extra = model_card_extra(run_dir, cfg, checkpoint_path, step, kind)
        if hasattr(task, "export"):
            task.export(out, metrics=metrics, extra=extra)
        else:
            model.save_pretrained(out, metrics=metrics, extra=extra)
    else:
        model = build_model(cfg.model.net)
        weights, kind = select_weights(state_dict, prefer_ema)
        _check_state_dict(model, weights, checkpoint_path)
        model.load_state_dict(weights, strict=False)  # strictness checked above; tied aliases allowed
        model.eval()
        save_pretrained(model, out, metrics=metrics, extra=model_card_extra(run_dir, cfg, checkpoint_path, step, kind))

    reloaded = from_pretrained(out)
    diff = None
    if kind != "task" or not any(n.endswith(("lora_a", "lora_b")) for n, _ in model.named_parameters()):
        diff = _state_diff(model, reloaded)
        forward = _forward_diff(model, reloaded, cfg)
        diff = max(diff, forward) if forward is not None else diff
    return HubExport(out, checkpoint_path, run_dir, step, kind, metrics, diff)


# -------------------------------------------------------------------------------------- push
def push_to_hub(
    directory: Path | str,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
) -> str:
    """Create (if needed) the model repo and upload `directory` with HfApi.upload_folder.
    Returns the repo URL; raises HubPushError with the reason when it cannot."""
    from huggingface_hub import HfApi, constants

    directory = Path(directory)
    later = f"the export is complete in {directory}; upload it later with `hf upload {repo_id} {directory} .`"
    if api is None and constants.HF_HUB_OFFLINE:
        raise HubPushError(f"HF_HUB_OFFLINE is set, not pushing to {repo_id}: {later}")
    api = api if api is not None else HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(directory),
            commit_message=commit_message or f"tokenmill export of {directory.name}",
        )
    except Exception as error:  # noqa: BLE001  (network, auth and permission errors all end here)
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise HubPushError(
            f"could not push to the Hugging Face Hub repo {repo_id} ({reason}). Check the network and "
            f"your token (`hf auth login` or HF_TOKEN); {later}"
        ) from error
    return str(repo_url)
