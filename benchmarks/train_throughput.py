#!/usr/bin/env python
"""Training throughput, FLOPs, MFU and peak memory of real tokenmill training steps.

    python benchmarks/train_throughput.py            # full run, rewrites docs/benchmarks.md
    python benchmarks/train_throughput.py --quick    # smoke run (1 warm-up + 2 timed steps), no docs

Every configuration is composed from conf/ exactly as `train.py experiment=...` would compose it,
then trained for W warm-up + N timed steps through `lightning.Trainer.fit` in a fresh subprocess
(`--worker NAME`, which prints one JSON line), so that peak memory and allocator/thread state of one
configuration never leak into another. Loggers, checkpointing, validation, the progress bar and
export are off; `trainer.max_steps = W + N`.

What is measured (also written next to the table in docs/benchmarks.md):

* step time: `time.perf_counter` between Lightning's `on_train_batch_start` and
  `on_train_batch_end` (CUDA synchronised on GPU) for the N timed steps: the whole
  `training_step` (forward, losses, backward, gradient clipping, optimizer and scheduler steps,
  discriminator step when active, EMA update, logging). Data loading happens before
  `on_train_batch_start` and is not in it (the time between consecutive batch starts, which
  includes it, is reported separately).
* images/s: batch size / median step time (and / mean step time).
* FLOPs: `torch.utils.flop_counter.FlopCounterMode` around the last warm-up step of the same
  `trainer.fit` (a real step, untimed). It counts matmul / convolution / attention FLOPs of every
  forward and backward in the step: generator, perceptual network and discriminator (both its
  generator-loss pass and its own update). Element-wise work (norms, activations, losses) and the
  optimizer, gradient clipping and EMA updates are not counted.
* MFU: (FLOPs per step / median step time) / peak FLOP/s, with the peak measured in the same run:
  best fp32 `torch.mm` throughput on CPU (same thread count as training), bf16 on GPU.
* peak memory: CPU, `ru_maxrss` of the worker process (whole process: Python, torch, data);
  GPU, `torch.cuda.max_memory_allocated` over the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONF_DIR = ROOT / "conf"
DOCS_PATH = ROOT / "docs" / "benchmarks.md"
START_MARKER = "<!-- train_throughput:start -->"
END_MARKER = "<!-- train_throughput:end -->"
RESULT_PREFIX = "TRAIN_THROUGHPUT_RESULT "

from benchmarks.machine import cpu_model  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    name: str
    overrides: tuple[str, ...]
    description: str
    gpu_only: bool = False
    # GAN variants: if the composed config has no discriminator (the demo sets it to null), use the
    # default one of conf/model/titok.yaml; the run fails if the timed steps are not GAN steps.
    gan: bool = False


CONFIGS: tuple[BenchConfig, ...] = (
    BenchConfig(
        "demo",
        ("experiment=demo",),
        "`experiment=demo` exactly as configured (see the last column for what its step contains)",
    ),
    BenchConfig(
        "demo+gan",
        ("experiment=demo", "model.loss.discriminator_start=0"),
        "`experiment=demo model.loss.discriminator_start=0`, with the PatchGAN discriminator of "
        "`conf/model/titok.yaml` put back when the demo config has none: the cost of a GAN step "
        "(adversarial generator loss + discriminator update) on the demo model",
        gan=True,
    ),
    BenchConfig(
        "titok_s128@64px",
        ("experiment=titok_s128", "data=embedded", "data.image_size=64", "data.batch_size=8"),
        "`experiment=titok_s128 data=embedded data.image_size=64 data.batch_size=8`: the TiTok-S-128 "
        "architecture with only image size and batch shrunk for CPU; its LPIPS perceptual loss is "
        "randomly initialised here (no weights offline), which costs the same; the discriminator "
        "starts at step 20k, so these are generator steps",
    ),
    BenchConfig(
        "titok_s128@64px+gan",
        ("experiment=titok_s128", "data=embedded", "data.image_size=64", "data.batch_size=8",
         "model.loss.discriminator_start=0"),
        "as `titok_s128@64px` with `model.loss.discriminator_start=0`: the GAN phase of the recipe "
        "(adversarial loss + LeCam-regularised PatchGAN update) on top of the perceptual loss",
        gan=True,
    ),
    BenchConfig(
        "titok_s128",
        ("experiment=titok_s128", "data=embedded", "data.batch_size=32"),
        "`experiment=titok_s128 data=embedded data.batch_size=32`: TiTok-S-128 at 256px, batch 32 "
        "per GPU as in the paper recipe (embedded photos instead of ImageNet shards; data loading is "
        "outside the timed window), generator steps with perceptual loss",
        gpu_only=True,
    ),
    BenchConfig(
        "titok_s128+gan",
        ("experiment=titok_s128", "data=embedded", "data.batch_size=32", "model.loss.discriminator_start=0"),
        "as `titok_s128` with `model.loss.discriminator_start=0`: the GAN phase of the recipe",
        gpu_only=True,
        gan=True,
    ),
)
CONFIGS_BY_NAME = {c.name: c for c in CONFIGS}

# Overrides that turn a training config into a benchmark run (max_steps is added per run).
# `++` sets a key whether or not the trainer config already has it.
BENCH_OVERRIDES = (
    "++trainer.limit_val_batches=0",
    "++trainer.num_sanity_val_steps=0",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_checkpointing=false",
    "++trainer.enable_model_summary=false",
    "++export.enabled=false",
)


# ------------------------------------------------------------------------------------------ helpers
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def vm_hwm_mib() -> float | None:
    """Peak RSS of this process's current address space (Linux /proc), a cross-check of ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0




def machine_info() -> dict:
    import lightning
    import torch

    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    return info


# ------------------------------------------------------------------------------- peak FLOP/s probe
PROBE_WORKER = "_probe"


def run_probe(quick: bool, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    info = machine_info()
    return {"machine": info, "peak": measure_peak_flops(quick)}


def measure_peak_flops(quick: bool = False) -> dict:
    """Best observed dense matmul throughput: fp32 on CPU, bf16 on GPU."""
    import torch

    if torch.cuda.is_available():
        sizes, dtype, repeats = (8192,), torch.bfloat16, (5 if quick else 20)
        device = "cuda"
    else:
        sizes, dtype, repeats = ((2048,) if quick else (2048, 4096)), torch.float32, (3 if quick else 8)
        device = "cpu"
    best, per_size = 0.0, {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        reps = repeats if n <= 2048 or device == "cuda" else max(2, repeats // 3)
        for _ in range(2):  # warm-up (thread pool, MKL/cuBLAS heuristics)
            torch.mm(a, b, out=out)
        _sync()
        size_best = 0.0
        for _ in range(reps):
            _sync()
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            _sync()
            size_best = max(size_best, 2 * n**3 / (time.perf_counter() - t0))
        per_size[n] = size_best
        best = max(best, size_best)
        del a, b, out
    return {
        "flops": best,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device,
        "threads": torch.get_num_threads(),
        "per_size_gflops": {str(k): v / 1e9 for k, v in per_size.items()},
    }


# ---------------------------------------------------------------------------- FLOP accounting
def _flop_counter_mapping() -> dict:
    """FLOP formulas FlopCounterMode lacks: the CPU flash-attention kernels that SDPA uses on CPU
    (torch only registers the CUDA kernels, so attention would count as 0 on CPU)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {}

    def sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    def sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_cpu
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = sdpa_cpu_backward
    return mapping


def component_flops(task, images, mapping: dict) -> dict[str, int]:
    """FLOPs of the generator and of the perceptual loss alone, forward + backward, on `images`.

    The per-module attribution of FlopCounterMode is not reliable for backward passes here
    (modules called several times per step, outputs in NamedTuples), so the split of the step
    total is measured directly: the generator's reconstruction + quantizer loss backward (weight
    and input gradients), and LPIPS on a detached reconstruction (input gradient only, as in
    training). The discriminator's share is what remains of the step total.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from tokenmill.losses import reconstruction_loss

    parts = {"generator": 0, "perceptual": 0}
    net = task.net
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = net(images)
        loss = reconstruction_loss(out.reconstruction, images, kind=task.loss_weights.reconstruction_kind)
        loss = loss + sum(out.losses.values())
        loss.backward()
    parts["generator"] = counter.get_total_flops()
    net.zero_grad(set_to_none=True)
    if task.perceptual is not None and task.loss_weights.perceptual > 0:
        rec = out.reconstruction.detach().requires_grad_(True)
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            task.perceptual(rec, images).backward()
        parts["perceptual"] = counter.get_total_flops()
    task.zero_grad(set_to_none=True)
    return parts


def hand_estimate_generator_flops(cfg) -> dict[str, float]:
    """Analytic matmul FLOPs of the TiTok generator (ViT encoder + VQ + ViT decoder), per image.

    Transformer: 2 * (matmul weights) * tokens per layer plus 2 * 2 * tokens^2 * width for the
    attention scores and their product with V; patch embedding, token projections, pixel head, the
    3x3 output conv and the codebook distances are added. Backward is 2x forward (input and weight
    gradients), so fwd+bwd = 3x forward.
    """
    e = cfg.model.net.encoder
    q = cfg.model.net.quantizer
    size, p, w, depth = int(cfg.data.image_size), int(e.patch_size), int(e.width), int(e.depth)
    mlp = int(w * float(e.mlp_ratio))
    k, d = int(e.num_latent_tokens), int(e.token_dim)
    patches = (size // p) ** 2
    tokens = patches + k  # encoder and decoder both see patches + latents
    block_weights = 3 * w * w + w * w + 2 * w * mlp
    transformer = depth * (2 * block_weights * tokens + 4 * tokens * tokens * w)
    encoder = 2 * patches * (3 * p * p) * w + transformer + 2 * k * w * d
    quantizer = 2 * k * int(q.codebook_size) * d
    decoder = 2 * k * d * w + transformer + 2 * patches * w * (3 * p * p) + 2 * size * size * 3 * 3 * 9
    forward = encoder + quantizer + decoder
    return {"forward_per_image": forward, "train_per_image": 3 * forward,
            "transformer_weight_params": 2 * depth * block_weights, "tokens": tokens}


# ------------------------------------------------------------------------------------- worker
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import tokenmill.config  # noqa: F401  (OmegaConf resolvers used by conf/)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def run_worker(name: str, warmup: int, steps: int, threads: int | None) -> dict:
    baseline_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import Callback
    from omegaconf import OmegaConf, open_dict
    from torch.utils.flop_counter import FlopCounterMode

    # the module, not the `attention` function that tokenmill.layers re-exports under that name
    attention_module = importlib.import_module("tokenmill.layers.attention")
    from tokenmill.trainers.run import build_task

    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LPIPS was built without weights_path.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    if threads:
        torch.set_num_threads(threads)
    import_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    bench = CONFIGS_BY_NAME[name]
    out_dir = tempfile.mkdtemp(prefix=f"tokenmill-bench-{name.replace('+', '_').replace('@', '_')}-")
    overrides = [*bench.overrides, *BENCH_OVERRIDES, f"trainer.max_steps={warmup + steps}",
                 f"paths.output_dir={out_dir}"]
    cfg = compose(overrides)
    if bench.gan and cfg.model.get("discriminator") is None:
        defaults = OmegaConf.load(CONF_DIR / "model" / "titok.yaml")
        with open_dict(cfg):
            cfg.model.discriminator = defaults.discriminator
            cfg.model.discriminator_optimizer = "${model.optimizer}"
    cuda = torch.cuda.is_available()

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cuda:
        torch.set_float32_matmul_precision("high")  # as tokenmill.trainers.run.train does
        torch.cuda.reset_peak_memory_stats()

    class StepProbe(Callback):
        """Times each training batch; counts FLOPs in the last warm-up batch."""

        def __init__(self) -> None:
            self.index = 0
            self.step_times: list[float] = []
            self.loop_times: list[float] = []  # batch start -> next batch start (includes data)
            self.gan_active: list[bool] = []
            self.flops: dict | None = None
            self.counted_images = None
            self.counted_gan_active = False
            self._gan_now = False
            self._counter = None
            self._backend = None
            self._t0 = 0.0
            self._cpu0 = 0.0
            self.cpu_util: list[float] = []  # process CPU seconds / wall seconds, per timed step
            self._last_start: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.index == warmup - 1:  # untimed: counting slows the step down
                # flash-attn (an optional GPU extra) is a custom op the counter cannot see; SDPA
                # computes the same attention and is counted.
                self._backend = attention_module._backend
                attention_module._backend = "sdpa"
                self._counter = FlopCounterMode(display=False, custom_mapping=_flop_counter_mapping())
                self._counter.__enter__()
            self._gan_now = bool(pl_module.gan_active)  # global_step is this batch's step here
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self._last_start is not None and self.index > warmup:
                self.loop_times.append(now - self._last_start)
            self._last_start = now
            self._t0 = now
            self._cpu0 = time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - self._t0
            cpu_seconds = time.process_time() - self._cpu0
            if self._counter is not None:
                self._counter.__exit__(None, None, None)
                attention_module._backend = self._backend
                self.flops = {"total": self._counter.get_total_flops()}
                self.counted_images = batch["image"].detach().clone()
                self.counted_gan_active = self._gan_now
                self._counter = None
            elif self.index >= warmup:
                self.step_times.append(elapsed)
                self.cpu_util.append(cpu_seconds / elapsed)
                self.gan_active.append(self._gan_now)
            self.index += 1

    datamodule = instantiate(cfg.data)
    task = build_task(cfg)
    probe = StepProbe()
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[probe], logger=False)
    t_fit = time.perf_counter()
    trainer.fit(task, datamodule=datamodule)
    fit_seconds = time.perf_counter() - t_fit
    max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before the extra FLOP split below
    hwm_mib = vm_hwm_mib()
    cuda_max_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    shutil.rmtree(out_dir, ignore_errors=True)

    if len(probe.step_times) != steps or probe.flops is None:
        raise RuntimeError(f"expected {steps} timed steps and one counted step, got {len(probe.step_times)} "
                           f"timed steps (global_step={trainer.global_step})")
    if bench.gan and not (all(probe.gan_active) and probe.counted_gan_active):
        raise RuntimeError(f"{name}: the discriminator was not active in every measured step")
    # Split of the counted step: generator and perceptual alone on the same batch; the remainder
    # is the discriminator (both of its passes) when the GAN was active, else should be ~0.
    mapping = _flop_counter_mapping()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and "bf16" in str(trainer.precision)):
        parts = component_flops(task, probe.counted_images, mapping)
    counted_step_gan = probe.counted_gan_active
    rest = probe.flops["total"] - parts["generator"] - parts["perceptual"]
    probe.flops.update(parts)
    probe.flops["discriminator" if counted_step_gan else "other"] = rest
    probe.flops["gan_active"] = counted_step_gan
    precision = str(trainer.precision)
    perceptual_on = task.perceptual is not None and task.loss_weights.perceptual > 0
    result = {
        "name": name,
        "overrides": list(bench.overrides),
        "device": "cuda" if cuda else "cpu",
        "precision": precision,
        "threads": torch.get_num_threads(),
        "image_size": int(cfg.data.image_size),
        "batch_size": int(cfg.data.batch_size),
        "warmup": warmup,
        "steps": steps,
        "params_generator": count_params(task.net),
        "params_discriminator": count_params(task.discriminator),
        "params_perceptual": count_params(task.perceptual),
        "perceptual_in_step": perceptual_on,
        "gan_in_timed_steps": all(probe.gan_active),
        "gan_in_some_timed_steps": any(probe.gan_active),
        "step_times_s": probe.step_times,
        "loop_times_s": probe.loop_times,
        "cpu_util": probe.cpu_util,
        "flops": probe.flops,
        "hand_estimate": hand_estimate_generator_flops(cfg),
        "fit_seconds": fit_seconds,
        "baseline_rss_mib": baseline_rss_kib / 1024,
        "import_rss_mib": import_rss_kib / 1024,
        "max_rss_mib": max_rss_kib / 1024,  # Linux reports KiB
        "vm_hwm_mib": hwm_mib,
        "cuda_max_allocated_mib": cuda_max_mib,
    }
    return result


# -------------------------------------------------------------------------------------- driver
def run_in_subprocess(name: str, args: list[str], threads: int | None, timeout: float) -> dict:
    """Run `--worker NAME` in a fresh interpreter and return its JSON result.

    The driver itself never imports torch: it stays ~20 MiB, so the `ru_maxrss` a worker inherits
    from its parent across fork/exec (Linux keeps the larger of the two) is negligible.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *args]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = "\n".join((proc.stdout + "\n" + proc.stderr).splitlines()[-40:])
    raise RuntimeError(f"worker {name!r} failed (exit {proc.returncode}):\n{tail}")


def summarise(r: dict, peak_flops: float) -> dict:
    times = r["step_times_s"]
    median, mean = statistics.median(times), statistics.fmean(times)
    flops = r["flops"]["total"]
    achieved = flops / median
    memory = r["cuda_max_allocated_mib"] if r["device"] == "cuda" else r["max_rss_mib"]
    parts = []
    parts.append("G fwd+bwd")
    if r["perceptual_in_step"]:
        parts.append("LPIPS")
    if r["gan_in_timed_steps"]:
        parts.append(f"adv. loss + D step (D {r['params_discriminator'] / 1e6:.2f} M)")
    elif r["gan_in_some_timed_steps"]:
        parts.append("D step in some steps")
    return {
        "config": r["name"],
        "image_size": r["image_size"],
        "batch": r["batch_size"],
        "params_g_m": r["params_generator"] / 1e6,
        "median_ms": median * 1e3,
        "mean_ms": mean * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "loop_median_ms": statistics.median(r["loop_times_s"]) * 1e3 if r["loop_times_s"] else float("nan"),
        "cpu_util": statistics.median(r["cpu_util"]),
        "images_per_s": r["batch_size"] / median,
        "images_per_s_mean": r["batch_size"] / mean,
        "gflop_step": flops / 1e9,
        "achieved_gflops": achieved / 1e9,
        "mfu_pct": 100.0 * achieved / peak_flops,
        "memory_mib": memory,
        "includes": " + ".join(parts),
    }


TABLE_HEADER = (
    "| config | image size | batch | params (generator, M) | step time (ms, median) | images/s | GFLOP/step "
    "| achieved GFLOP/s | MFU % | peak memory (MiB) | images/s (mean) | step includes |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def markdown_table(rows: list[dict]) -> str:
    lines = [TABLE_HEADER]
    for s in rows:
        lines.append(
            f"| {s['config']} | {s['image_size']} | {s['batch']} | {s['params_g_m']:.2f} | {s['median_ms']:.1f} "
            f"| {s['images_per_s']:.2f} | {s['gflop_step']:.1f} | {s['achieved_gflops']:.1f} | {s['mfu_pct']:.1f} "
            f"| {s['memory_mib']:.0f} | {s['images_per_s_mean']:.2f} | {s['includes']} |"
        )
    return "\n".join(lines)


def flop_check_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        f, h = r["flops"], r["hand_estimate"]
        hand = h["train_per_image"] * r["batch_size"]
        split = ", ".join(f"{k} {f[k] / 1e9:.1f}" for k in ("generator", "perceptual", "discriminator", "other")
                          if f.get(k))
        lines.append(
            f"- `{r['name']}`: counted {f['total'] / 1e9:.1f} GFLOP/step ({split}); generator hand estimate "
            f"3 x {h['forward_per_image'] / 1e9:.3f} GFLOP/image x {r['batch_size']} = {hand / 1e9:.1f} GFLOP "
            f"(counted generator / estimate = {f['generator'] / hand:.3f}); "
            f"{h['tokens']} tokens per transformer pass"
        )
    return lines


def format_command(argv: list[str]) -> str:
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *argv[1:]])


def render_section(info: dict, peak: dict, peaks_seen: list[float], results: list[dict], rows: list[dict],
                   command: str, warmup: int, steps: int, skipped: list[str]) -> str:
    gpu = info["gpu"]
    lines = [
        START_MARKER,
        "## Training throughput (`benchmarks/train_throughput.py`)",
        "",
        f"Produced by `{command}` on {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}. "
        "Rerun it to refresh this section (other sections of this file are left alone).",
        "",
        "Machine:",
        "",
        f"- CPU: {info['cpu']} ({info['cpu_cores']} cores, {info['cpu_cores_usable']} usable; "
        f"torch CPU capability {info['cpu_capability']})",
        f"- GPU: {gpu if gpu else 'none'}",
        f"- torch {info['torch']}, lightning {info['lightning']}, Python {info['python']}; "
        f"{results[0]['threads'] if results else info['threads']} torch threads",
        f"- measured peak: **{peak['flops'] / 1e9:.1f} GFLOP/s** ({peak['dtype']} `torch.mm` on {peak['device']}, "
        f"{peak['threads']} threads; best of "
        + ", ".join(f"{n}x{n}: {v:.1f}" for n, v in peak["per_size_gflops"].items())
        + f" GFLOP/s; probes before/after the runs: {', '.join(f'{p / 1e9:.1f}' for p in peaks_seen)})",
        f"- 1-minute load average before / after the runs: {_fmt(info['load_average'], '.2f')} / "
        f"{_fmt(info.get('load_average_after'), '.2f')} (the benchmark itself adds ~"
        f"{results[0]['threads'] if results else info['threads']} while it runs; anything else on the machine "
        "slows the steps down)",
        f"- precision: {', '.join(sorted({r['precision'] for r in results}))}; "
        f"{warmup} warm-up + {steps} timed steps per configuration, each in its own process",
        "",
        markdown_table(rows),
        "",
        "Configurations:",
        "",
    ]
    for r in results:
        lines.append(f"- `{r['name']}`: {CONFIGS_BY_NAME[r['name']].description}.")
    for name in skipped:
        lines.append(f"- `{name}` (GPU only, not run here): {CONFIGS_BY_NAME[name].description}.")
    lines += [
        "",
        "How each number is measured:",
        "",
        "- **step time**: `time.perf_counter()` from Lightning's `on_train_batch_start` to "
        "`on_train_batch_end` (CUDA synchronised on GPU), median over the timed steps; it covers the whole "
        "`training_step`: forward, losses, backward, gradient clipping, optimizer + scheduler steps, the "
        "discriminator step when active, the EMA update and logging. Data loading is outside it.",
        "- **images/s**: batch size / median step time; the mean-based figure is batch / mean step time.",
        "- **GFLOP/step**: `torch.utils.flop_counter.FlopCounterMode` around one real step of the same "
        "`trainer.fit` (the last warm-up step, not timed): matmul, convolution and attention FLOPs of every "
        "forward and backward in it (generator; LPIPS, whose frozen weights need no weight gradients but whose "
        "input gradient is computed; discriminator in the generator loss and in its own update). Attention on "
        "CPU runs `_scaled_dot_product_flash_attention_for_cpu`, which the counter does not know; the benchmark "
        "registers the standard SDPA formula for it. The optimizer, gradient clipping, EMA and element-wise "
        "ops (norms, activations, losses) are not counted.",
        "- **achieved GFLOP/s** = GFLOP/step / median step time; **MFU** = achieved / measured peak above "
        "(measured in the same invocation, same thread count, so it is the fraction of what this machine's "
        "dense fp32 GEMM reaches, not of a datasheet number).",
        "- **peak memory**: on CPU the worker process's peak resident set (`ru_maxrss`): Python, torch, "
        "Lightning, the data and the model together (an idle worker after imports is "
        f"~{statistics.median(r['import_rss_mib'] for r in results):.0f} MiB of it); on GPU "
        "`torch.cuda.max_memory_allocated()`.",
        "- On GPU the peak is a bf16 GEMM; the perceptual loss deliberately runs in fp32 (autocast off, "
        "TF32 matmuls), so configurations with LPIPS cannot reach that peak in their LPIPS share.",
        "",
        "FLOP count against a hand estimate (generator transformer: ~2 x weights x tokens per image forward, "
        "plus attention 4 x tokens^2 x width per layer, x3 for forward+backward):",
        "",
        *flop_check_lines(results),
        "",
        "Step-time spread and data loading (ms):",
        "",
        "| config | min | median | mean | max | batch start to next batch start (median, incl. data) "
        "| CPU busy (process CPU s / wall s, median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in rows:
        lines.append(f"| {s['config']} | {s['min_ms']:.1f} | {s['median_ms']:.1f} | {s['mean_ms']:.1f} "
                     f"| {s['max_ms']:.1f} | {s['loop_median_ms']:.1f} | {s['cpu_util']:.2f} |")
    lines += [
        "",
        "CPU busy is the worker's CPU time over wall time during the timed steps: close to the thread count, "
        "the step had the cores to itself; well below it, other processes took CPU time during the run (or "
        "the step has long single-threaded stretches) and the timings above are pessimistic.",
    ]
    lines += ["", END_MARKER]
    return "\n".join(lines)


def write_docs(section: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        text = path.read_text()
        start, end = text.find(START_MARKER), text.find(END_MARKER)
        if start != -1 and end != -1 and end > start:
            text = text[:start] + section + text[end + len(END_MARKER):]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        text = "# Benchmarks\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 2 timed steps, docs untouched")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3, quick 1); >= 1")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10, quick 2)")
    parser.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS_BY_NAME),
                        help="subset of configurations (default: all that fit the device)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--docs", type=Path, default=DOCS_PATH, help="markdown file to update")
    parser.add_argument("--no-docs", action="store_true", help="print only, do not touch the docs")
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per configuration")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (2 if args.quick else 10)
    if warmup < 1 or steps < 1:
        parser.error("--warmup and --steps must be >= 1 (FLOPs are counted in the last warm-up step)")

    if args.worker == PROBE_WORKER:
        result = run_probe(args.quick, args.threads)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    if args.worker:
        result = run_worker(args.worker, warmup, steps, args.threads)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    probe_args = ["--quick"] if args.quick else []
    t_start = time.perf_counter()
    probe = run_in_subprocess(PROBE_WORKER, probe_args, args.threads, args.timeout)
    info, peak = probe["machine"], probe["peak"]
    cuda = info["gpu"] is not None
    selected = [CONFIGS_BY_NAME[n] for n in args.configs] if args.configs else list(CONFIGS)
    runnable = [c for c in selected if cuda or not c.gpu_only]
    skipped = [c.name for c in selected if c not in runnable]
    print(f"# {info['cpu']} | {info['cpu_cores']} cores | torch {info['torch']} | {info['threads']} threads"
          f" | GPU: {info['gpu'] or 'none'} | load average {info['load_average']}", flush=True)
    if not cuda and info["load_average"] is not None and info["load_average"] > 0.25 * info["cpu_cores_usable"]:
        print("# warning: the machine is or was recently busy (1-min load average "
              f"{info['load_average']:.2f}); CPU timings may be low and noisy (see CPU busy below)", flush=True)

    peaks_seen = [peak["flops"]]
    print(f"# measured peak {peak['dtype']} matmul: {peak['flops'] / 1e9:.1f} GFLOP/s", flush=True)

    results = []
    for bench in runnable:
        t0 = time.perf_counter()
        print(f"# running {bench.name} ({warmup} warm-up + {steps} timed steps) ...", end="", flush=True)
        r = run_in_subprocess(bench.name, ["--warmup", str(warmup), "--steps", str(steps)], args.threads,
                              args.timeout)
        print(f" {time.perf_counter() - t0:.0f} s", flush=True)
        if r["threads"] != peak["threads"]:
            print(f"# warning: worker used {r['threads']} threads, peak measured with {peak['threads']}")
        results.append(r)

    # Probe again after the runs and keep the best: the peak is a ceiling, not an average.
    probe_after = run_in_subprocess(PROBE_WORKER, probe_args, args.threads, args.timeout)
    after = probe_after["peak"]
    info["load_average_after"] = probe_after["machine"]["load_average"]
    peaks_seen.append(after["flops"])
    if after["flops"] > peak["flops"]:
        peak = after
    rows = [summarise(r, peak["flops"]) for r in results]

    table = markdown_table(rows)
    print()
    print(f"peak {peak['dtype']} matmul measured: {peak['flops'] / 1e9:.1f} GFLOP/s "
          f"(before/after: {', '.join(f'{p / 1e9:.1f}' for p in peaks_seen)})")
    print(table)
    print()
    for row, r in zip(rows, results, strict=True):
        busy = row["cpu_util"]
        note = "" if cuda or busy >= 0.8 * r["threads"] else "  <- other processes took CPU time: timings pessimistic"
        print(f"{row['config']}: step ms min {row['min_ms']:.1f} / median {row['median_ms']:.1f} / mean "
              f"{row['mean_ms']:.1f} / max {row['max_ms']:.1f}; CPU busy {busy:.2f} of {r['threads']} threads{note}")
    print()
    print("\n".join(flop_check_lines(results)))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")

    if args.json:
        args.json.write_text(json.dumps({"machine": info, "peak": peak, "results": results}, indent=2))
    if skipped:
        print(f"(GPU-only configurations not run: {', '.join(skipped)})")
    if not args.quick and not args.no_docs and results:
        section = render_section(info, peak, peaks_seen, results, rows, format_command(sys.argv),
                                 warmup, steps, skipped)
        write_docs(section, args.docs)
        print(f"updated {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
