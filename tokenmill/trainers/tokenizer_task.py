"""LightningModule that trains any config-composed tokenizer (encoder -> quantizer -> decoder).

One training step, in order:
  1. generator: reconstruction + quantizer losses (+ perceptual) (+ adversarial once the
     discriminator has started), one optimizer step;
  2. discriminator (optional, from `discriminator_start`): hinge loss + LeCam, its own optimizer;
  3. EMA update. Validation and export use the EMA weights.

Manual optimisation because two optimizers take turns. The discriminator steps through the
strategy directly so that Lightning's `global_step` counts batches (one generator step each):
`max_steps`, schedules and checkpoint intervals then mean the same with and without a GAN.

Under `trainer=fsdp`, `configure_model` shards the generator, its EMA copy and the discriminator
with tokenmill.trainers.parallel (the frozen perceptual network stays replicated); the export
gathers the full EMA model onto rank 0 (`gather_for_export`, then `export`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from tokenmill.losses import LeCamEMA, PerceptualLoss, adaptive_generator_weight, hinge_d_loss, hinge_g_loss
from tokenmill.losses import reconstruction_loss as recon_loss_fn
from tokenmill.metrics import CodebookUsage, ImageQualityMeter
from tokenmill.quantizers import quantizer_metrics
from tokenmill.tokenizers.autoencoder import Autoencoder
from tokenmill.trainers import parallel
from tokenmill.trainers.ema import EMA
from tokenmill.trainers.optim import build_optimizer, warmup_cosine_scheduler

log = logging.getLogger(__name__)


@dataclass
class LossWeights:
    """Weights of the generator objective (names follow the TiTok / VQGAN recipes)."""

    reconstruction_kind: str = "l2"
    reconstruction: float = 1.0
    quantizer: float = 1.0
    perceptual: float = 0.0
    adversarial: float = 0.1
    adaptive_adversarial_weight: bool = False
    lecam: float = 0.001
    discriminator_start: int = 0


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    total_steps: int = 1000
    end_factor: float = 0.1


class TokenizerTask(L.LightningModule):
    def __init__(
        self,
        net: Autoencoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        loss: dict | None = None,
        scheduler: dict | None = None,
        perceptual: PerceptualLoss | None = None,
        discriminator: nn.Module | None = None,
        discriminator_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        ema_decay: float | None = 0.9999,
        gradient_clip_norm: float | None = 1.0,
        max_consecutive_nonfinite: int = 10,
        num_grid_images: int = 8,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.net = net
        self.loss_weights = LossWeights(**(loss or {}))
        self.schedule = ScheduleConfig(**(scheduler or {}))
        self.perceptual = perceptual
        self.discriminator = discriminator
        if discriminator is not None and discriminator_optimizer is None:
            raise ValueError("a discriminator needs its own `discriminator_optimizer`")
        if perceptual is None and self.loss_weights.perceptual > 0:
            raise ValueError("loss.perceptual > 0 but no `perceptual` network is configured")
        if net.is_generative and (discriminator is not None or perceptual is not None):
            raise ValueError(
                f"{type(net.decoder).__name__} is a generative decoder trained by its own loss: "
                "set model.discriminator and model.perceptual to null"
            )
        self.optimizer_factory = optimizer
        self.discriminator_optimizer_factory = discriminator_optimizer
        self.lecam = LeCamEMA() if discriminator is not None else None
        self.ema = EMA(net, decay=ema_decay) if ema_decay else None
        self.gradient_clip_norm = gradient_clip_norm
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.num_grid_images = num_grid_images
        self.consecutive_nonfinite = 0
        self.quality = ImageQualityMeter()
        self.usage = CodebookUsage(net.codebook_size) if net.codebook_size else None
        self.grid_batch: dict[str, Tensor] | None = None  # first validation batch, for pictures
        self._export_net: Autoencoder | None = None  # the gathered eval model (FSDP), on rank 0

    # ----------------------------------------------------------------- model used for eval/export
    @property
    def eval_net(self) -> Autoencoder:
        return self.ema.module if self.ema is not None else self.net

    @property
    def sharded(self) -> bool:
        return parallel.is_sharded(self.net)

    def gather_for_export(self) -> None:
        """Every rank calls this before `export` (a collective when sharded): rank 0 then holds
        an unsharded copy of the eval (EMA) model with the full weights. No-op when unsharded."""
        if self.sharded:
            self._export_net = parallel.gathered_copy(self.eval_net)

    def export(self, directory, metrics: dict | None = None, extra: dict | None = None) -> Path:
        """`save_pretrained` of the eval (EMA) model, on rank 0 (called by run.py)."""
        net = parallel.model_for_export(self.eval_net, self._export_net, self.sharded)
        return net.save_pretrained(directory, metrics=metrics, extra=extra)

    # ------------------------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """trainer=fsdp: shard the generator, its EMA copy (alike, so the average runs on local
        shards) and the discriminator. Other strategies: nothing to do."""
        mesh = parallel.data_parallel_mesh(self.device_mesh)
        if mesh is None or self.sharded:
            return
        options = parallel.sharding_options(self.trainer.strategy)
        parallel.shard_model(self.net, mesh, **options)
        if self.ema is not None:
            # never runs backward: no activation checkpointing, shards registered after forward
            parallel.shard_model(self.ema.module, mesh, **{**options, "activation_checkpointing": False},
                                 root_reshard_after_forward=True)
        if self.discriminator is not None:
            parallel.shard_model(self.discriminator, mesh, **options)

    # ----------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        opt_g = build_optimizer(self.optimizer_factory, self.net)
        optimizers = [opt_g]
        schedulers = [warmup_cosine_scheduler(opt_g, **vars(self.schedule))]
        if self.discriminator is not None:
            opt_d = build_optimizer(self.discriminator_optimizer_factory, self.discriminator)
            optimizers.append(opt_d)
            schedulers.append(warmup_cosine_scheduler(opt_d, **vars(self.schedule)))
        return optimizers, schedulers

    def _optimizers(self):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        scheds = self.lr_schedulers()
        scheds = scheds if isinstance(scheds, list) else [scheds]
        return opts, scheds

    @property
    def gan_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.loss_weights.discriminator_start

    # ------------------------------------------------------------------------------ training
    def generator_loss(self, images: Tensor, out) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.loss_weights
        logs: dict[str, Tensor] = {}
        total = torch.zeros((), device=images.device)
        if out.reconstruction is not None:  # None: a generative decoder, scored by its own loss
            rec = recon_loss_fn(out.reconstruction, images, kind=w.reconstruction_kind)
            logs["loss/reconstruction"] = rec.detach()
            total = w.reconstruction * rec
        for name, value in out.losses.items():
            total = total + w.quantizer * value
            logs[f"loss/quantizer_{name}"] = value.detach()
        for name, value in out.decoder_losses.items():  # already weighted by the decoder
            total = total + value
            logs[f"loss/decoder_{name}"] = value.detach()
        if out.reconstruction is None:
            logs["loss/total"] = total.detach()
            return total, logs
        if self.perceptual is not None and w.perceptual > 0:
            perceptual = self.perceptual(out.reconstruction, images)
            total = total + w.perceptual * perceptual
            logs["loss/perceptual"] = perceptual.detach()
        if self.gan_active:
            g_loss = hinge_g_loss(self.discriminator(out.reconstruction))
            weight = torch.ones((), device=images.device)
            if w.adaptive_adversarial_weight:
                weight = adaptive_generator_weight(total, g_loss, self.net.last_layer)
            total = total + w.adversarial * weight * g_loss
            logs["loss/generator_adversarial"] = g_loss.detach()
            logs["loss/adaptive_weight"] = weight.detach()
        logs["loss/total"] = total.detach()
        return total, logs

    def discriminator_loss(self, images: Tensor, reconstruction: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits_real = self.discriminator(images)
        logits_fake = self.discriminator(reconstruction.detach())
        d_loss = hinge_d_loss(logits_real, logits_fake)
        total = d_loss
        if self.loss_weights.lecam > 0:
            total = total + self.loss_weights.lecam * self.lecam.penalty(logits_real, logits_fake)
        self.lecam.update(logits_real.detach(), logits_fake.detach())
        return total, {
            "loss/discriminator": d_loss.detach(),
            "disc/logits_real": logits_real.detach().mean(),
            "disc/logits_fake": logits_fake.detach().mean(),
        }

    def _logs_this_step(self) -> bool:
        """Whether Lightning will write this step's logs (every `log_every_n_steps` steps)."""
        return bool(getattr(self.trainer._logger_connector, "should_update_logs", True))

    def _finite_everywhere(self, loss: Tensor) -> bool:
        # Every rank must take the same branch, or the next collective hangs.
        return self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)

    def _skip_nonfinite(self, loss: Tensor, what: str) -> None:
        self.consecutive_nonfinite += 1
        log.warning(
            "non-finite %s loss (%s) at step %d: step skipped (%d in a row, limit %d)",
            what, float(loss), self.global_step, self.consecutive_nonfinite, self.max_consecutive_nonfinite,
        )
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise FloatingPointError(
                f"{self.consecutive_nonfinite} consecutive non-finite {what} losses at step "
                f"{self.global_step}: stopping. Lower the learning rate or check the data."
            )

    def _step(self, optimizer, scheduler, loss: Tensor, through_strategy: bool = False) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.sharded:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            parallel.sync_replicated_grads(params)  # the quantizer's codebook is not sharded
            if self.gradient_clip_norm:
                parallel.clip_grad_norm_(params, self.gradient_clip_norm)
        elif self.gradient_clip_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_norm, gradient_clip_algorithm="norm")
        if through_strategy:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)
        else:
            optimizer.step()
        scheduler.step()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        # A batch whose every image failed to decode arrives empty; all ranks skip it together.
        if not self.trainer.strategy.reduce_boolean_decision(len(images) > 0, all=True):
            log.warning("step %d: a batch with no decodable image on some rank was skipped", self.global_step)
            return
        (opt_g, *opt_d), (sched_g, *sched_d) = self._optimizers()
        gan_active = self.gan_active

        if self.discriminator is not None:
            self.toggle_optimizer(opt_g)  # no gradients into the discriminator from this pass
        with quantizer_metrics(self.net, enabled=self._logs_this_step()):
            out = self.net(images)
        g_total, logs = self.generator_loss(images, out)
        if not self._finite_everywhere(g_total):
            self._skip_nonfinite(g_total, "generator")
            if self.discriminator is not None:
                self.untoggle_optimizer(opt_g)
            return
        self._step(opt_g, sched_g, g_total)
        if self.discriminator is not None:
            self.untoggle_optimizer(opt_g)

        if gan_active:
            self.toggle_optimizer(opt_d[0])
            d_total, d_logs = self.discriminator_loss(images, out.reconstruction)
            if self._finite_everywhere(d_total):
                self._step(opt_d[0], sched_d[0], d_total, through_strategy=True)
                logs.update(d_logs)
            else:
                self._skip_nonfinite(d_total, "discriminator")
            self.untoggle_optimizer(opt_d[0])

        self.consecutive_nonfinite = 0
        if self.ema is not None:
            self.ema.update(self.net)
        logs.update({f"quantizer/{k}": v for k, v in out.metrics.items()})
        logs["lr"] = torch.tensor(sched_g.get_last_lr()[0])
        logs["data/skipped_images"] = batch["num_skipped"].float()
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, prog_bar=False, batch_size=len(images))
        self.log("loss", logs["loss/total"], prog_bar=True, logger=False, batch_size=len(images))

    # ---------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self.quality.reset()
        if self.usage is not None:
            self.usage.reset()
        self.grid_batch = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        self.log("val/skipped_images", batch["num_skipped"].float(), reduce_fx="sum", sync_dist=True, batch_size=1)
        if len(images) == 0:  # every image of this batch failed to decode (counted above)
            return
        out = self.eval_net(images, seed=batch_idx)  # seeded: a generative decoder samples reproducibly
        self.quality.update(out.reconstruction.clamp(-1, 1), images)
        if self.usage is not None and out.indices is not None:
            self.usage.update(out.indices)
        if self.grid_batch is None:
            n = self.num_grid_images
            self.grid_batch = {"image": images[:n].cpu(), "reconstruction": out.reconstruction[:n].cpu()}
        rec = recon_loss_fn(out.reconstruction, images, kind=self.loss_weights.reconstruction_kind)
        self.log("val/loss_reconstruction", rec, sync_dist=True, batch_size=len(images))

    def on_validation_epoch_end(self) -> None:
        metrics = {f"val/{k}": v for k, v in self.quality.compute().items()}
        if self.usage is not None:
            usage = self.usage.compute()
            metrics["val/codebook_usage"] = usage["usage"] * 100.0
            metrics["val/codebook_perplexity"] = usage["perplexity"]
        # Already reduced across ranks by the meters.
        self.log_dict(metrics, prog_bar=True, sync_dist=False, rank_zero_only=False)

    # ------------------------------------------------------------------ exact-resume RNG state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if not states:
            return
        torch.set_rng_state(states["torch"])
        random.setstate((states["python_version"], tuple(states["python"]), states["python_gauss"]))
        np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), states["numpy_pos"], 0, 0.0))
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
