"""Hydra sweeps through the submitit launcher (conf/hydra/launcher/): the SLURM and local configs
agree on everything but the scheduler, and a local 2-point sweep gives each point its own run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tokenmill.export import from_pretrained

from .conftest import CONF_DIR, ROOT, TINY_MODEL_OVERRIDES

submitit_config = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.config")
# submitit_local.yaml shares its name with the plugin's schema: Hydra validates it against that
# schema and warns that such matching is deprecated (train.py silences the same warning).
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema:UserWarning")


def _launcher(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={name}", "experiment=demo", "run_name=sweep"], return_hydra_config=True)
    # (a fixed run_name: the default is the launch time, which may tick between two composes)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def _env_free(monkeypatch) -> None:
    for key in list(os.environ):
        if key.startswith("TOKENMILL_SLURM_"):
            monkeypatch.delenv(key)


def test_slurm_and_local_launchers_share_every_non_launcher_key(monkeypatch):
    _env_free(monkeypatch)
    slurm, local = _launcher("slurm"), _launcher("submitit_local")
    base = {f.name for f in fields(submitit_config.BaseQueueConf)}
    slurm_only = {f.name for f in fields(submitit_config.SlurmQueueConf)} - base - {"_target_"}
    assert slurm["_target_"].endswith("SlurmLauncher") and local["_target_"].endswith("LocalLauncher")
    # The local file sets exactly the keys common to both executors, with the same values.
    assert set(local) - {"_target_"} == base
    assert {k: v for k, v in slurm.items() if k in base} == {k: v for k, v in local.items() if k in base}
    assert set(slurm) - {"_target_"} == base | slurm_only
    # Defaults: one task per GPU, requeue on timeout enabled, USR2 two minutes ahead.
    assert slurm["tasks_per_node"] == slurm["gpus_per_node"] == 1
    assert slurm["max_num_timeout"] > 0 and slurm["signal_delay_s"] == 120
    assert slurm["name"] == "demo" and slurm["submitit_folder"].endswith("/.submitit/%j")


def test_launcher_values_come_from_the_environment(monkeypatch):
    _env_free(monkeypatch)
    env = {"PARTITION": "gpu", "ACCOUNT": "lab", "NODES": "2", "GPUS_PER_NODE": "8", "CPUS_PER_TASK": "12",
           "MEM_GB": "480", "TIMEOUT_MIN": "2880", "MAX_REQUEUES": "5"}
    for key, value in env.items():
        monkeypatch.setenv(f"TOKENMILL_SLURM_{key}", value)
    slurm, local = _launcher("slurm"), _launcher("submitit_local")
    assert (slurm["partition"], slurm["account"]) == ("gpu", "lab")
    assert (slurm["nodes"], slurm["gpus_per_node"], slurm["tasks_per_node"]) == (2, 8, 8)
    assert (slurm["cpus_per_task"], slurm["mem_gb"], slurm["timeout_min"], slurm["max_num_timeout"]) == (12, 480, 2880, 5)
    assert {k: local[k] for k in ("nodes", "gpus_per_node", "mem_gb")} == {"nodes": 2, "gpus_per_node": 8, "mem_gb": 480}


def test_local_two_point_sweep_gives_each_job_its_own_run_and_export(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", "experiment=demo",
        *[o for o in TINY_MODEL_OVERRIDES if "num_latent_tokens" not in o],
        "trainer.max_steps=4", "trainer.val_check_interval=4", "callbacks.model_checkpoint.every_n_train_steps=4",
        f"paths.log_dir={tmp_path}", "run_name=sweep", "model.net.encoder.num_latent_tokens=8,16",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    sweep_dir = tmp_path / "demo" / "multiruns" / "sweep"  # stable: named by run_name, one subdir per job
    assert sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".") and p.is_dir()) == ["0", "1"]
    configs = {}
    for job, tokens in (("0", 8), ("1", 16)):
        run_dir = sweep_dir / job
        summary = json.loads((run_dir / "metrics.json").read_text())
        assert summary["global_step"] == 4 and summary["export_max_abs_diff"] == 0.0
        assert summary["run_dir"] == str(run_dir)
        configs[job] = OmegaConf.load(run_dir / "config_resolved.yaml")
        assert configs[job].model.net.encoder.num_latent_tokens == tokens
        assert configs[job].run_name == "sweep"
        model = from_pretrained(run_dir / "export")
        assert model.encoder.num_latent_tokens == tokens
        with torch.no_grad():
            assert model.encode(torch.zeros(1, 3, 32, 32)).codes.shape[1] == tokens
        # The job's own command (not submitit's entry point) is recorded for its model card.
        command = (run_dir / "command.txt").read_text()
        assert command.startswith("python train.py ") and f"model.net.encoder.num_latent_tokens={tokens}" in command
    assert configs["0"] != configs["1"]
    assert (sweep_dir / "multirun.yaml").is_file() and any((sweep_dir / ".submitit").iterdir())



def test_slurm_launcher_writes_the_expected_sbatch_script(tmp_path, monkeypatch):
    """No cluster here: stand-in `srun` / `sbatch` executables; the fake sbatch keeps the script
    submitit hands it and refuses the submission, so the launch ends right there."""
    _env_free(monkeypatch)
    bin_dir, script = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "sbatch: error: test stand-in" >&2\nexit 1\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "TOKENMILL_SLURM_PARTITION": "gpu", "TOKENMILL_SLURM_GPUS_PER_NODE": "8", "TOKENMILL_SLURM_NODES": "2",
           "TOKENMILL_SLURM_MEM_GB": "400"}
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", "experiment=demo",
           f"paths.log_dir={tmp_path}", "run_name=s", "+hydra.launcher.additional_parameters.requeue=true"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "test stand-in" in proc.stderr
    lines = set(script.read_text().splitlines())
    submitit_dir = tmp_path / "demo" / "multiruns" / "s" / ".submitit"
    expected = {"--partition=gpu", "--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=8",
                "--mem=400GB", "--time=1440", "--signal=USR2@120", "--job-name=demo", "--requeue",
                f"--output={submitit_dir}/%j/%j_0_log.out"}
    assert {f"#SBATCH {flag}" for flag in expected} <= lines, sorted(lines)
