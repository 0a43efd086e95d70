"""One training run from a composed Hydra config: build, fit, validate, export, verify."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from tokenmill.export import build_model, from_pretrained
from tokenmill.trainers.checkpoint_io import AtomicCheckpointIO
from tokenmill.trainers.requeue import SaveBeforeRequeue
from tokenmill.trainers.resume import (
    configure_wandb_resume,
    record_command,
    recorded_commands,
    resolve_ckpt_path,
)

log = logging.getLogger(__name__)


def silence_expected_warnings() -> None:
    """Lightning warnings that describe intended behaviour here, not problems."""
    # The EMA copy and frozen perceptual network are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # With manual optimisation we checkpoint after the step: that is the state resume needs.
    warnings.filterwarnings("ignore", message=r".*no pre-optimization state was saved.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config_resolved.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every `_target_` entry of a config group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def build_task(cfg: DictConfig) -> L.LightningModule:
    net = build_model(cfg.model.net)  # records its config for save_pretrained
    task_cfg = OmegaConf.to_container(cfg.model, resolve=True)  # resolve against the root first
    task_cfg.pop("net")
    return instantiate(task_cfg, net=net)


def verify_export(task: L.LightningModule, export_dir: Path, run_dir: Path) -> float | None:
    """Reload the export and check it reproduces the run's last validation reconstructions."""
    batch = getattr(task, "grid_batch", None)
    if batch is None:
        return None
    reloaded = from_pretrained(export_dir)
    with torch.no_grad():
        again = reloaded(batch["image"].float(), seed=0).reconstruction  # the grid is validation batch 0
    save_file(
        {"images": batch["image"].contiguous(), "reconstructions": batch["reconstruction"].float().contiguous()},
        str(run_dir / "reconstructions.safetensors"),
    )
    return float((again - batch["reconstruction"].float()).abs().max())


def train(cfg: DictConfig) -> dict[str, float]:
    silence_expected_warnings()
    run_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0:
        record_command(run_dir)  # command.txt: one line per start (the first trained, later ones resumed)
    configure_wandb_resume(cfg.get("logger"), run_dir)  # wandb_id.txt: a resumed run logs into the same run
    save_resolved_config(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")

    datamodule = instantiate(cfg.data)
    task = build_task(cfg)
    requeue = SaveBeforeRequeue.if_submitit(run_dir / "checkpoints")  # None outside a submitit job
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*instantiate_group(cfg.get("callbacks")), *([requeue] if requeue else [])],
        logger=instantiate_group(cfg.get("logger")) or False,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(task, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), run_dir))
    if requeue is not None and requeue.pending:
        requeue.hand_over()  # submitit requeues the job (rank 0 exits here); the rerun resumes
        return {}
    if trainer.interrupted:
        return {}
    trainer.validate(task, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.export.enabled and hasattr(task, "gather_for_export"):
        task.gather_for_export()  # every rank: a sharded (FSDP) model's full weights are gathered onto rank 0

    if trainer.is_global_zero:
        summary = {"run_dir": str(run_dir), "global_step": trainer.global_step, **metrics}
        if cfg.export.enabled:
            export_dir = run_dir / "export"
            extra = {"Training command": recorded_commands(run_dir)}
            if hasattr(task, "export"):  # tasks with more than one artefact (VLM: model + connector)
                task.export(export_dir, metrics=metrics, extra=extra)
            else:
                task.eval_net.save_pretrained(export_dir, metrics=metrics, extra=extra)
            summary["export_dir"] = str(export_dir)
            diff = verify_export(task, export_dir, run_dir)
            if diff is not None:
                summary["export_max_abs_diff"] = diff
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    return metrics


def print_summary(summary: dict) -> None:
    lines = ["", "=" * 60, "tokenmill run finished"]
    for key, value in summary.items():
        lines.append(f"  {key:28s} {value:.4f}" if isinstance(value, float) else f"  {key:28s} {value}")
    if "export_max_abs_diff" in summary:
        verdict = "exactly" if summary["export_max_abs_diff"] == 0.0 else "NOT exactly"
        lines.append(f"  reloaded export reproduces the run's reconstructions {verdict}")
    lines.append("=" * 60)
    print("\n".join(lines), flush=True)
