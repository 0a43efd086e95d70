"""Resuming a run in its own directory: which checkpoint, which wandb run, which command.

A requeued or re-submitted job runs the same command in the same run directory (submitit keeps
Hydra's sweep directory; `run_name=` or `hydra.run.dir=` pins a single run's). With the default
`ckpt_path: auto` it then continues from the newest checkpoint there that can be read:

* temporary files (`.last.ckpt.tmp-<pid>`, left by a write that was killed) are never candidates;
* a candidate that does not load (truncated, not a Lightning checkpoint, a sharded directory with
  a missing or short shard) is logged and skipped, and the next newest one is tried.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import string
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Lightning writes this next to the DCP shards of a sharded (FSDP / ModelParallel) checkpoint.
SHARDED_META_NAME = "meta.pt"
DCP_METADATA_NAME = ".metadata"
WANDB_ID_NAME = "wandb_id.txt"
COMMAND_NAME = "command.txt"


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / DCP_METADATA_NAME).is_file()


def _load_light(path: Path) -> dict[str, Any]:
    """The checkpoint's pickled structure; tensors stay memory-mapped (no full read of a large file).
    A truncated file fails here: the zip directory torch.save writes sits at the end."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _missing_shard_data(path: Path) -> str | None:
    """Every byte range the DCP metadata points at must exist in its shard file."""
    from torch.distributed.checkpoint import FileSystemReader

    needed: dict[str, int] = {}
    for info in FileSystemReader(str(path)).read_metadata().storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        shard = path / name
        if not shard.is_file():
            return f"shard {name} is missing"
        if shard.stat().st_size < size:
            return f"shard {name} is truncated ({shard.stat().st_size} of {size} bytes)"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """None if `path` is a complete Lightning checkpoint (file or sharded directory), else why not."""
    try:
        if path.is_dir():
            if not is_sharded_checkpoint(path):
                return f"directory without {DCP_METADATA_NAME}"
            meta = path / SHARDED_META_NAME
            if not meta.is_file():
                return f"sharded checkpoint without {SHARDED_META_NAME}"
            short = _missing_shard_data(path)
            if short:
                return short
            checkpoint = _load_light(meta)
        else:
            checkpoint = _load_light(path)
            if "state_dict" not in checkpoint:
                return "no state_dict"
        if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
            return "not a Lightning checkpoint (no global_step)"
    except Exception as error:  # noqa: BLE001  (any failure to read makes it unusable)
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Every checkpoint in the run directory, newest first (by modification time).

    `checkpoints/*.ckpt` (ModelCheckpoint: files, or directories when sharded) and Lightning's own
    SLURM requeue checkpoints `hpc_ckpt_*.ckpt` in the run directory. Hidden names (temporary files
    of an atomic write) are skipped.
    """
    found = [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    found = [p for p in found if not p.name.startswith(".") and ".tmp" not in p.name]
    # Equal times (last.ckpt and step_N.ckpt of the same step): either one is the same state.
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    candidates = checkpoint_candidates(run_dir)
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("auto-resume: skipping %s (%s); trying an older checkpoint", path, problem)
    if candidates:
        log.warning("auto-resume: none of the %d checkpoints in %s can be read", len(candidates), run_dir)
    return None


def checkpoint_step(path: Path) -> int | None:
    try:
        meta = path / SHARDED_META_NAME if path.is_dir() else path
        return int(_load_light(meta)["global_step"])
    except Exception:  # noqa: BLE001
        return None


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`ckpt_path` as given to Trainer.fit.

    null: start fresh. "auto" (default) or "last": the newest valid checkpoint of this run
    directory, or fresh when there is none. Anything else: that checkpoint (file or sharded dir).
    """
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path in ("auto", "last"):
        found = latest_valid_checkpoint(run_dir)
        if found is None:
            log.info("auto-resume: no checkpoint in %s, starting fresh", run_dir / "checkpoints")
            return None
        log.info("auto-resume: resuming from %s (global_step %s)", found, checkpoint_step(found))
        return str(found)
    path = Path(ckpt_path)
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    return ckpt_path


# ------------------------------------------------------------------------------------- wandb
def _new_wandb_id(length: int = 8) -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def persistent_wandb_id(run_dir: Path) -> str:
    """The wandb run id of this run directory: read from wandb_id.txt, or created there once.

    Created with a hard link from a private temporary file, so when several ranks start at the
    same time exactly one id wins and every rank reads that one."""
    path = run_dir / WANDB_ID_NAME
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{WANDB_ID_NAME}.{os.getpid()}"
        tmp.write_text(_new_wandb_id() + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def configure_wandb_resume(logger_cfg: Any, run_dir: Path) -> None:
    """Give every WandbLogger node without an explicit id this run directory's persistent id and
    `resume="allow"`: a requeued or resumed run keeps logging into the same wandb run."""
    from omegaconf import open_dict

    if not logger_cfg:
        return
    for node in logger_cfg.values():
        if node is None or not str(node.get("_target_", "")).endswith("WandbLogger"):
            continue
        with open_dict(node):
            if node.get("id") is None:
                node.id = persistent_wandb_id(run_dir)
            if node.get("resume") is None:
                node.resume = "allow"


# ----------------------------------------------------------------------------------- command
def training_command() -> str:
    """The command line that reproduces this job.

    Under Hydra it is rebuilt from the job's own overrides, so a sweep job (whose process is
    `python -m submitit.core._submit ...`) records the single-run command for its point.
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hydra_cfg = HydraConfig.get()
            # job.name is the entry script's name (train.py -> "train"), also inside a submitit job.
            return shlex.join(["python", f"{hydra_cfg.job.name}.py", *hydra_cfg.overrides.task])
    except Exception:  # noqa: BLE001
        pass
    return shlex.join(["python", *sys.argv])


def record_command(run_dir: Path) -> str:
    """Append this start's command to command.txt (one line per start: the first trained it,
    later ones resumed it). Returns the command."""
    command = training_command()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / COMMAND_NAME, "a") as f:
        f.write(command + "\n")
    return command


def recorded_commands(run_dir: Path) -> str:
    """command.txt of a run (every start's command), or this process's command if there is none."""
    path = run_dir / COMMAND_NAME
    return path.read_text().strip() if path.is_file() else training_command()
