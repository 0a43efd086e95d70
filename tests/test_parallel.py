"""trainer=fsdp (FSDP2) and trainer=ddp on 2 CPU processes (gloo), end to end through train.py.

Each run is a real `python train.py ... trainer.devices=2` subprocess: Lightning's launcher starts
the second rank itself. A callback writes every rank's per-step training values to rank<r>.json,
so the tests see both ranks. Shown here:

* FSDP2 and DDP train the tiny TiTok (paper config: GAN, EMA, learnable VQ codebook with dead-code
  re-seeding) and the tiny VLM (frozen ViT and LLM layer; FSDP with activation checkpointing):
  every rank holds the same model at every step (the loss of rank 0's batch is identical on both
  ranks), each rank trains on its own half of the data, and FSDP's losses equal DDP's rank by
  rank (reduce-scatter vs all-reduce: the same gradients up to float rounding);
* frozen parameters are sharded but never get a gradient; the VQ codebook stays replicated;
* a sharded checkpoint (FSDP: a DCP directory) and a DDP checkpoint (one file) resume in a new
  process exactly where the uninterrupted run was (every later loss, weight and optimizer moment
  bitwise);
* the gathered export equals the sharded training state and a single-process model built from
  the same full state dict.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from tokenmill.export import from_pretrained
from tokenmill.trainers.run import build_task

from .conftest import TINY_MODEL_OVERRIDES, compose_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed

CPU2 = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "logger=none",
        "trainer.num_sanity_val_steps=0"]
# TiTok at test size with the paper recipe's parts: PatchGAN from step 2, (random) LPIPS slot,
# EMA, learnable l2-normalised VQ codebook, codes unused for 2 steps re-seeded in place.
TITOK = [
    "experiment=titok_s128", *TINY_MODEL_OVERRIDES, "data=embedded", "model.scheduler.warmup_steps=2",
    "model.ema_decay=0.9", "model.discriminator.base_channels=8", "model.discriminator.num_layers=2",
    "model.loss.discriminator_start=2", "model.net.quantizer.dead_code_patience=2",
    "trainer.max_steps=8", "trainer.val_check_interval=4", "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.model_checkpoint.save_top_k=-1",  # keep step 4's checkpoint: the resume test starts there
]
# The tiny VLM of test_vlm.py; the ViT and the LLM's first layer frozen, the rest trains.
VLM = [
    "experiment=vqa_tiny", "data.image_size=32", "data.batch_size=4", "data.val_batch_size=4",
    "data.train_source.num_samples=32", "data.val_source.num_samples=8", "vlm.vision_width=32",
    "vlm.llm_width=32", "vlm.grid_size=4", "model.net.vision.config.num_hidden_layers=2",
    "model.net.language_model.config.num_hidden_layers=2", "model.scheduler.warmup_steps=1",
    "model.val_budgets=[16]", "model.trainable=[connector,language_model.model.model.layers.1,language_model.model.lm_head]",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "trainer.max_steps=4", "trainer.val_check_interval=4", "callbacks.model_checkpoint.every_n_train_steps=4",
]
FSDP = ["trainer=fsdp", *CPU2]
DDP = ["trainer=ddp", *CPU2]
STRATEGIES = {"fsdp": FSDP, "ddp": DDP}


class RankRecorder(L.Callback):
    """Writes to `<dirpath>/rank<r>.json` after every step, for this rank:

    * its `train/*` values (logged without sync: the loss of this rank's own batch);
    * `probe/*`: the loss of rank 0's batch under this rank's copy of the model (eval mode, no
      gradient), equal on every rank exactly when every rank holds the same model;
    * facts about its parameters at the first optimizer step.
    """

    def __init__(self, dirpath: str):
        self.path = Path(dirpath)
        self.steps: list[dict] = []
        self.params: dict | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.params is not None:
            return
        named = list(pl_module.named_parameters())
        frozen = [(n, p) for n, p in named if not p.requires_grad and not n.startswith("ema.")]
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        self.params = {
            "frozen": len(frozen),
            "frozen_sharded": sum(isinstance(p, DTensor) for _, p in frozen),
            "frozen_replicated": sorted({n.split(".")[0] for n, p in frozen if not isinstance(p, DTensor)}),
            "frozen_with_grad": sum(p.grad is not None for _, p in frozen),
            "sharded": sum(isinstance(p, DTensor) for _, p in named),
            "replicated_trained": sorted(n for n, p in named if p.requires_grad and not isinstance(p, DTensor)),
            "trained_with_grad": sum(p.grad is not None for p in trained),
        }

    @torch.no_grad()
    def _probe(self, trainer, pl_module, batch) -> dict[str, float]:
        from tokenmill.trainers.parallel import reshard

        probe = trainer.strategy.broadcast(batch, src=0)  # rank 0's batch, on every rank
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            if "image" in probe:
                images = probe["image"]
                values = {"probe/reconstruction": float((pl_module.net(images).reconstruction - images).pow(2).mean())}
                if pl_module.discriminator is not None:
                    values["probe/discriminator"] = float(pl_module.discriminator(images).mean())
            else:
                values = {"probe/loss": float(pl_module.net(probe).loss)}
        finally:
            for m, mode in modes.items():
                m.training = mode
            reshard(pl_module)
        return values

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.steps.append({"step": trainer.global_step, **values, **self._probe(trainer, pl_module, batch)})
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"steps": self.steps, "params": self.params}
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def launch(run_dir: Path, *overrides: str, record: str = "ranks", timeout: float = 300) -> list[dict]:
    """`python train.py <overrides>` on 2 ranks; returns each rank's record."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    record_dir = run_dir / record
    cmd = [
        sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}",
        "+callbacks.rank_recorder._target_=tests.test_parallel.RankRecorder",
        f"+callbacks.rank_recorder.dirpath={record_dir}",
    ]
    log_path = run_dir.parent / f"{run_dir.name}-{record}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    with open(log_path, "w") as log:
        # Own process group: the rank Lightning starts is killed with rank 0 if anything hangs.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _reap_group(proc.pid, grace=0 if code is None else 30)
    tail = log_path.read_text()[-4000:]
    assert code is not None, f"no result within {timeout}s:\n{tail}"
    assert code == 0, f"train.py exited with {code}:\n{tail}"
    print(f"{run_dir.name}/{record}: {time.monotonic() - start:.1f}s")
    return [json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(2)]


def _reap_group(pgid: int, grace: float) -> None:
    deadline = time.monotonic() + grace
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() >= deadline:
            os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.2)


def losses(record: dict, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in record["steps"] if key in row}


def dcp_state(directory: Path) -> dict:
    """A sharded checkpoint directory as one full state dict (torch's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = directory.parent / f"{directory.name}.pt"
    if not out.exists():
        dcp_to_torch_save(directory, out)
    return torch.load(out, weights_only=True)


def checkpoint(path: Path) -> dict:
    """A Lightning checkpoint, sharded (directory) or not (file), as one dict with the full
    `state_dict`, `optimizer_<i>` and the loop metadata (`global_step`, ...)."""
    if path.is_file():
        ckpt = torch.load(path, weights_only=True)
        ckpt.update({f"optimizer_{i}": s for i, s in enumerate(ckpt.pop("optimizer_states"))})
        return ckpt
    return {**torch.load(path / "meta.pt", weights_only=True), **dcp_state(path)}


def same_on_both_ranks(records: list[dict], key: str, steps: int) -> dict[int, float]:
    rank0, rank1 = (losses(r, key) for r in records)
    assert sorted(rank0) == list(range(1, steps + 1)), rank0
    assert rank0 == rank1, f"{key} differs between ranks: {rank0} vs {rank1}"
    return rank0


def same_as_ddp(runs: dict, key: str) -> None:
    """FSDP and DDP split the data alike and must compute the same gradients: each rank's losses
    agree to float rounding (reduce-scatter and all-reduce sum in different orders)."""
    for rank in (0, 1):
        fsdp, ddp = losses(runs["fsdp"][1][rank], key), losses(runs["ddp"][1][rank], key)
        assert fsdp and fsdp.keys() == ddp.keys(), (key, rank)
        assert fsdp == pytest.approx(ddp, rel=1e-4, abs=1e-6), f"{key} rank {rank}: FSDP {fsdp} vs DDP {ddp}"


# ------------------------------------------------------------------------------------- TiTok
@pytest.fixture(scope="module")
def titok_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("titok")
    return {
        "fsdp": (root / "fsdp", launch(root / "fsdp", *TITOK, *FSDP)),
        "ddp": (root / "ddp", launch(root / "ddp", *TITOK, *DDP, "export.enabled=false")),
    }


def test_fsdp_and_ddp_train_the_tiny_titok_identically_on_both_ranks(titok_runs):
    for _, records in titok_runs.values():
        same_on_both_ranks(records, "probe/reconstruction", steps=8)  # one model on both ranks
        same_on_both_ranks(records, "probe/discriminator", steps=8)
        # each rank trained on its own half of the data
        assert losses(records[0], "train/loss/total") != losses(records[1], "train/loss/total")
    for key in ("train/loss/total", "train/loss/quantizer_codebook", "train/loss/discriminator", "probe/reconstruction"):
        same_as_ddp(titok_runs, key)
    assert sorted(losses(titok_runs["fsdp"][1][0], "train/loss/discriminator")) == list(range(3, 9))

    run_dir, records = titok_runs["fsdp"]
    facts = records[0]["params"]
    assert facts["sharded"] > 0 and facts["frozen_with_grad"] == 0
    assert facts["frozen_replicated"] == ["perceptual"]  # the (random) LPIPS network stays replicated
    # the learnable codebook stays a plain replicated tensor (re-seeding writes it in place)
    assert facts["replicated_trained"] == ["net.quantizer.embedding.weight"]
    assert (run_dir / "checkpoints" / "last.ckpt" / "meta.pt").is_file()  # sharded: a directory
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries left
    assert (titok_runs["ddp"][0] / "checkpoints" / "last.ckpt").is_file()  # DDP: one file


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_checkpoint_resumes_exactly_like_an_uninterrupted_run(titok_runs, strategy):
    """FSDP: a sharded checkpoint directory; DDP: a single file. Either resumes in a new process."""
    straight_dir, straight = titok_runs[strategy]
    middle = straight_dir / "checkpoints" / "step_0000004.ckpt"  # written mid-run by the straight run
    assert middle.is_dir() if strategy == "fsdp" else middle.is_file()
    assert checkpoint(middle)["global_step"] == 4
    run_dir = straight_dir.parent / f"resumed-{strategy}"
    resumed = launch(run_dir, *TITOK, *STRATEGIES[strategy], f"ckpt_path={middle}", "export.enabled=false")

    for key in ("train/loss/total", "train/loss/discriminator", "probe/reconstruction"):
        for rank in (0, 1):
            expected = {s: v for s, v in losses(straight[rank], key).items() if s > 4}
            assert losses(resumed[rank], key) == expected, f"{key} rank {rank}"
    a, b = checkpoint(straight_dir / "checkpoints" / "last.ckpt"), checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("discriminator.") for k in a["state_dict"]) and any(k.startswith("ema.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for opt in ("optimizer_0", "optimizer_1"):  # generator and discriminator
        assert a[opt]["state"].keys() == b[opt]["state"].keys()
        for name, state in a[opt]["state"].items():
            for moment in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state[moment], b[opt]["state"][name][moment]), (opt, name, moment)


def test_gathered_export_equals_the_unsharded_model(titok_runs, tmp_path):
    run_dir, _ = titok_runs["fsdp"]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["global_step"] == 8 and summary["export_max_abs_diff"] == 0.0
    full = checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    exported = load_file(run_dir / "export" / "model.safetensors")
    ema = {k.removeprefix("ema.module."): v for k, v in full.items() if k.startswith("ema.module.")}
    assert exported.keys() == ema.keys()
    for key, value in exported.items():
        assert torch.equal(value, ema[key]), key

    # One process, no sharding: the task built from the same config, given the full state.
    task = build_task(compose_config(TITOK, tmp_path))
    task.load_state_dict(full, strict=True)
    model = from_pretrained(run_dir / "export")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(images).reconstruction, task.eval_net.eval()(images).reconstruction)


def test_hub_export_of_the_sharded_fsdp_checkpoint_reloads_with_the_same_outputs(titok_runs, tmp_path):
    """scripts/export_to_hub.py's library path on a real 2-rank FSDP checkpoint directory."""
    from tokenmill.export.hub import export_checkpoint

    run_dir, _ = titok_runs["fsdp"]
    sharded = run_dir / "checkpoints" / "last.ckpt"
    assert sharded.is_dir()
    result = export_checkpoint(sharded, tmp_path / "hub")
    assert result.weights == "ema" and result.global_step == 8 and result.max_abs_diff == 0.0
    from_hub, from_run = from_pretrained(tmp_path / "hub"), from_pretrained(run_dir / "export")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(from_hub(images).reconstruction, from_run(images).reconstruction)


# --------------------------------------------------------------------------------------- VLM
@pytest.fixture(scope="module")
def vlm_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {
        # with activation checkpointing (Hugging Face layers' own switch): same losses as DDP without
        "fsdp": (root / "fsdp", launch(root / "fsdp", *VLM, *FSDP, "trainer.strategy.activation_checkpointing=true")),
        "ddp": (root / "ddp", launch(root / "ddp", *VLM, *DDP, "export.enabled=false")),
    }


def test_fsdp_and_ddp_train_the_tiny_vlm_identically_on_both_ranks(vlm_runs):
    for _, records in vlm_runs.values():
        same_on_both_ranks(records, "probe/loss", steps=4)
        assert losses(records[0], "train/loss") != losses(records[1], "train/loss")
    for key in ("train/loss", "probe/loss"):
        same_as_ddp(vlm_runs, key)
    facts = vlm_runs["fsdp"][1][0]["params"]
    # the frozen ViT and LLM layer are sharded like the rest, and take no gradient
    assert facts["frozen"] > 0 and facts["frozen_replicated"] == [] and facts["frozen_with_grad"] == 0
    assert facts["replicated_trained"] == [] and facts["trained_with_grad"] > 0


def test_vlm_export_gathers_the_full_model(vlm_runs):
    run_dir, _ = vlm_runs["fsdp"]
    full = checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    model = from_pretrained(run_dir / "export")
    state = model.state_dict()
    net = {k.removeprefix("net."): v for k, v in full.items() if k.startswith("net.")}
    assert state.keys() == net.keys()
    for key, value in state.items():
        assert torch.equal(value, net[key]), key
    assert (run_dir / "export" / "connector" / "mm_projector.bin").is_file()


# ------------------------------------------------------------------------- the policy, in-process
def test_blocks_are_transformer_blocks_and_hugging_face_layers(tmp_path):
    from tokenmill.trainers.parallel import find_blocks, replicated_params

    titok = build_task(compose_config(TITOK, tmp_path)).net
    assert [type(b).__name__ for b in find_blocks(titok)] == ["TransformerBlock"] * 2  # encoder, decoder
    assert replicated_params(titok) == {titok.quantizer.embedding.weight}
    vlm = build_task(compose_config(VLM, tmp_path)).net
    # CLIPVisionEmbeddings is in CLIP's _no_split_modules too, but not a repeated layer: it stays in the root
    assert [type(b).__name__ for b in find_blocks(vlm)] == ["CLIPEncoderLayer"] * 2 + ["LlamaDecoderLayer"] * 2
    assert replicated_params(vlm) == set()


def test_clip_grad_norm_equals_torch_on_unsharded_gradients():
    from tokenmill.trainers.parallel import clip_grad_norm_

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = torch.randn_like(a) * 10
        b.grad = a.grad.clone()
    assert torch.allclose(clip_grad_norm_(ours, 1.0), torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)
