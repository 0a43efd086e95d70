"""Crash and requeue recovery of `python train.py`, as real subprocesses.

* SIGKILL mid-run, then the same command again: it resumes from the newest checkpoint in the run
  directory (ckpt_path=auto) and ends with the same weights as an uninterrupted run, bitwise.
* SIGKILL inside a checkpoint write: `last.ckpt` is the previous complete one, the leftover
  temporary file is never picked, and the rerun resumes from a valid checkpoint.
* submitit requeue (SIGUSR2 to a job of the local submitit launcher): a checkpoint is saved at
  the end of the current step, the job requeues itself into the same run directory and resumes.
* wandb: the run id is kept in the run directory and reused by the resumed run.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokenmill.trainers.checkpoint_io import WRITE_PAUSE_ENV
from tokenmill.trainers.resume import (
    checkpoint_problem,
    checkpoint_step,
    configure_wandb_resume,
    latest_valid_checkpoint,
    persistent_wandb_id,
)

from .conftest import ROOT, TINY_MODEL_OVERRIDES, compose_config

MAX_STEPS = 60
# Validation only at the end, so a signal sent after the first checkpoint lands in a training step.
RUN = ["experiment=demo", *TINY_MODEL_OVERRIDES, f"trainer.max_steps={MAX_STEPS}",
       f"trainer.val_check_interval={MAX_STEPS}", "callbacks.model_checkpoint.every_n_train_steps=10"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run_dir}"]


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _start(cmd: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env or ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited with {proc.returncode} too early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)


def _step_checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("step_*.ckpt"))


def _assert_same_result(run_dir: Path, reference: Path) -> None:
    """Final export (EMA weights) and final training state equal the uninterrupted run's, bitwise."""
    ours, theirs = load_file(run_dir / "export" / "model.safetensors"), load_file(reference / "export" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    a = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    for key in b["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    _run(_train_cmd(run_dir), cwd=run_dir.parent)
    return run_dir


def test_sigkill_mid_run_then_the_same_command_resumes_and_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    run_dir, log = tmp_path / "run", tmp_path / "killed.log"
    proc = _start(_train_cmd(run_dir), tmp_path, log)
    try:
        _wait_for(lambda: _step_checkpoints(run_dir / "checkpoints"), proc, log)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()  # it did not get to the end
    resume_from = latest_valid_checkpoint(run_dir)
    step = checkpoint_step(resume_from)
    assert 10 <= step < MAX_STEPS

    output = _run(_train_cmd(run_dir), cwd=tmp_path)  # the very same command
    assert f"auto-resume: resuming from {resume_from} (global_step {step})" in output
    assert "Restoring states from the checkpoint path" in output
    _assert_same_result(run_dir, uninterrupted)
    assert len((run_dir / "command.txt").read_text().splitlines()) == 2  # started, then resumed


def test_a_kill_during_a_checkpoint_write_never_leaves_a_corrupt_latest(tmp_path, uninterrupted):
    run_dir, log = tmp_path / "run", tmp_path / "killed.log"
    ckpt_dir = run_dir / "checkpoints"
    # Every checkpoint write pauses halfway; kill while last.ckpt of step 20 is half written,
    # with last.ckpt of step 10 in place.
    env = {**ENV, WRITE_PAUSE_ENV: "1.5"}
    proc = _start(_train_cmd(run_dir), tmp_path, log, env=env)
    try:
        _wait_for(lambda: (ckpt_dir / "step_0000020.ckpt").exists() and list(ckpt_dir.glob(".last.ckpt.tmp-*")),
                  proc, log)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (leftover,) = ckpt_dir.glob(".last.ckpt.tmp-*")
    assert checkpoint_problem(leftover) is not None  # half a file: it would be corrupt if picked
    assert checkpoint_problem(ckpt_dir / "last.ckpt") is None  # the previous last.ckpt, complete
    assert checkpoint_step(ckpt_dir / "last.ckpt") == 10
    assert latest_valid_checkpoint(run_dir) == ckpt_dir / "step_0000020.ckpt"

    output = _run(_train_cmd(run_dir), cwd=tmp_path)
    assert f"auto-resume: resuming from {ckpt_dir / 'step_0000020.ckpt'} (global_step 20)" in output
    _assert_same_result(run_dir, uninterrupted)


def test_auto_resume_skips_unreadable_checkpoints_and_falls_back(tmp_path, uninterrupted, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", run_dir / "checkpoints")
    good = run_dir / "checkpoints" / "last.ckpt"
    os.utime(good, (1_000_000_000, 1_000_000_000))
    data = good.read_bytes()
    (run_dir / "checkpoints" / "step_9999999.ckpt").write_bytes(data[: len(data) // 2])  # truncated copy
    (run_dir / "checkpoints" / "garbage.ckpt").write_bytes(b"not a checkpoint")
    (run_dir / "checkpoints" / ".last.ckpt.tmp-123").write_bytes(data)  # temporary names: never picked
    (run_dir / "checkpoints" / "step_0000060.ckpt").unlink()
    with caplog.at_level(logging.WARNING, logger="tokenmill.trainers.resume"):
        assert latest_valid_checkpoint(run_dir) == good
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "skipping" in skipped and "step_9999999.ckpt" in skipped and "garbage.ckpt" in skipped
    assert ".tmp-" not in skipped
    # Lightning's own SLURM requeue checkpoint (hpc_ckpt_N.ckpt in the run directory) counts too.
    shutil.copy(good, run_dir / "hpc_ckpt_1.ckpt")
    assert latest_valid_checkpoint(run_dir) == run_dir / "hpc_ckpt_1.ckpt"


def test_submitit_requeue_saves_at_the_signal_and_resumes_in_the_same_directory(tmp_path, uninterrupted):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    log = tmp_path / "launcher.log"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", *RUN,
           f"paths.log_dir={tmp_path}"]  # run_name left to the launch time: requeue must keep it
    proc = _start(cmd, tmp_path, log)
    multiruns = tmp_path / "demo" / "multiruns"
    try:
        _wait_for(lambda: list(multiruns.glob("*/0/checkpoints/step_*.ckpt")), proc, log)
        (sweep_dir,) = multiruns.iterdir()
        (controller,) = [p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
        (task,) = Path(f"/proc/{controller.name}/task/{controller.name}/children").read_text().split()
        os.kill(int(task), signal.SIGUSR2)  # what SLURM sends signal_delay_s before the time limit
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    job_log = (sweep_dir / "0" / "train.log").read_text()
    saved = [line for line in job_log.splitlines() if "requeue: saved" in line]
    assert len(saved) == 1, job_log[-3000:]
    step = int(saved[0].split("global_step ")[1].split(";")[0])
    assert 10 <= step < MAX_STEPS
    last = sweep_dir / "0" / "checkpoints" / "last.ckpt"
    assert f"auto-resume: resuming from {last} (global_step {step})" in job_log
    assert "Requeued job" in job_log
    assert [p.name for p in multiruns.iterdir()] == [sweep_dir.name]  # the same directory
    _assert_same_result(sweep_dir / "0", uninterrupted)


def test_wandb_run_id_is_kept_in_the_run_directory_and_reused(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from omegaconf import OmegaConf

    from tokenmill.trainers.run import train

    # Unit: created once, then read back; an explicit id is left alone.
    first = persistent_wandb_id(tmp_path / "unit")
    assert persistent_wandb_id(tmp_path / "unit") == first and len(first) == 8
    loggers = OmegaConf.create({"wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "id": None},
                                "mine": {"_target_": "lightning.pytorch.loggers.WandbLogger", "id": "abc"},
                                "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger"}})
    configure_wandb_resume(loggers, tmp_path / "unit")
    assert (loggers.wandb.id, loggers.wandb.resume) == (first, "allow")
    assert (loggers.mine.id, loggers.mine.resume) == ("abc", "allow") and "id" not in loggers.csv

    # End to end, offline: a run and its resumption write into the same wandb run.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    common = ["experiment=demo", *TINY_MODEL_OVERRIDES, "logger=wandb", "trainer.val_check_interval=2",
              "callbacks.model_checkpoint.every_n_train_steps=2", "export.enabled=false"]
    import wandb

    for steps in (2, 4):
        train(compose_config([*common, f"trainer.max_steps={steps}"], run_dir))
        wandb.finish()  # what the end of the process does: the resumed run starts a new session
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    offline_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(f"-{run_id}") for name in offline_runs), offline_runs


def test_requeue_callback_defers_only_inside_a_training_step(tmp_path):
    from types import SimpleNamespace

    from tokenmill.trainers.requeue import SaveBeforeRequeue

    assert SaveBeforeRequeue.if_submitit(tmp_path) is None  # not a submitit job: nothing installed
    calls = []
    callback = SaveBeforeRequeue(signal.SIGUSR2, lambda signum, frame: calls.append(signum), tmp_path)
    callback._on_signal(signal.SIGUSR2, None)  # outside fit: straight to submitit
    assert calls == [signal.SIGUSR2] and callback.pending is None
    callback.trainer = SimpleNamespace(training=False)  # validating, say
    callback._on_signal(signal.SIGUSR2, None)
    assert len(calls) == 2 and callback.pending is None
    callback.trainer = SimpleNamespace(training=True)  # mid-step: wait for the end of the step
    callback._on_signal(signal.SIGUSR2, None)
    assert len(calls) == 2 and callback.pending == (signal.SIGUSR2, None)
    callback.hand_over()
    assert calls == [signal.SIGUSR2] * 3
