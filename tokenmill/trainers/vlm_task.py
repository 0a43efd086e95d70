"""``VLMTask``: trains a VisionLanguageModel with the language model's next-token loss.

One step runs the language model once per budget the compressor asks for
(`compressor.training_budgets()`: MQT's random m, every M3 scale, or just the default) and
averages the losses. Which parameters train is configuration: `trainable` lists name patterns
(stage 1 alignment: the connector; stage 2: the connector and the language model; set by
conf/stage/), `trainable_extra` adds a method's own parts (FALCON's ViT registers), `lora` adds
adapters to a frozen language model instead. `init_connector` loads a previous stage's
connector strictly, checking widths before anything trains; `init_weights` loads a whole VLM
export (e.g. M3 fine-tuning a trained full-token model).

Validation reports answer exact-match accuracy and loss at each of `val_budgets`.

Under `trainer=fsdp`, `configure_model` shards the model with tokenmill.trainers.parallel (every
ViT / LLM block its own unit, frozen ones included: they hold 1/N of their weights per rank and
take no gradient or optimizer state); the export gathers the full model onto rank 0
(`gather_for_export`, then `export`).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from tokenmill.compressors.vlm import VisionLanguageModel, answer_exact_match
from tokenmill.export.connector import load_connector, save_connector
from tokenmill.export.pretrained import load_pretrained_weights
from tokenmill.layers.lora import apply_lora, merge_lora
from tokenmill.trainers import parallel
from tokenmill.trainers.optim import build_optimizer, warmup_cosine_scheduler

log = logging.getLogger(__name__)


def freeze_except(model: torch.nn.Module, trainable: list[str]) -> list[str]:
    """requires_grad only for parameters whose name matches one of the regexes (re.match)."""
    patterns = [re.compile(p) for p in trainable]
    unmatched = [p.pattern for p in patterns if not any(p.match(n) for n, _ in model.named_parameters())]
    if unmatched:
        raise ValueError(f"trainable patterns {unmatched} match no parameter of {type(model).__name__}")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(p.match(name) for p in patterns))
        if param.requires_grad:
            names.append(name)
    return names


class VLMTask(L.LightningModule):
    def __init__(
        self,
        net: VisionLanguageModel,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: dict | None = None,
        trainable: list[str] = ("connector\\.",),
        trainable_extra: list[str] = (),
        lora: dict | None = None,
        init_connector: str | None = None,
        init_weights: str | None = None,
        val_budgets: list[int] | None = None,
        compressor_loss_weight: float = 1.0,
        gradient_clip_norm: float | None = 1.0,
    ):
        super().__init__()
        self.net = net
        if init_weights:
            # The whole VLM from an export (M3 fine-tunes a trained LLaVA); strict, before training.
            load_pretrained_weights(net, init_weights)
            log.info("loaded VLM weights from %s", init_weights)
        if init_connector:
            log.info("loaded %s", load_connector(net, init_connector))  # refuses mismatches before training
        self.lora = dict(lora) if lora else None
        if lora:
            lora = dict(lora)
            wrapped = apply_lora(net.language_model, **lora)
            log.info("LoRA on %d linear layers of the language model", len(wrapped))
            trainable = [*trainable, r".*\.lora_[ab]$"]
        self.trainable_names = freeze_except(net, [*trainable, *trainable_extra])
        self.optimizer_factory = optimizer
        self.schedule = scheduler
        supported = net.compressor.supported_num_tokens
        self.val_budgets = list(val_budgets) if val_budgets else [net.compressor.max_tokens]
        bad = [k for k in self.val_budgets if k not in supported]
        if bad:
            raise ValueError(f"val_budgets {bad} not supported by {type(net.compressor).__name__} (supports {supported})")
        self.compressor_loss_weight = compressor_loss_weight
        self.gradient_clip_norm = gradient_clip_norm
        self._export_net: VisionLanguageModel | None = None  # the gathered model (FSDP), on rank 0

    @property
    def eval_net(self) -> VisionLanguageModel:
        return self.net

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_factory, self.net)
        if not self.schedule:
            return optimizer
        scheduler = warmup_cosine_scheduler(optimizer, **self.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def sharded(self) -> bool:
        return parallel.is_sharded(self.net)

    def configure_model(self) -> None:
        """trainer=fsdp: shard the model (tokenmill.trainers.parallel). Other strategies: nothing."""
        mesh = parallel.data_parallel_mesh(self.device_mesh)
        if mesh is None or self.sharded:
            return
        parallel.shard_model(self.net, mesh, **parallel.sharding_options(self.trainer.strategy))

    def _trained_parameters(self, optimizer) -> list[Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.sharded:  # parameters FSDP leaves replicated get their gradients averaged here
            parallel.sync_replicated_grads(self._trained_parameters(optimizer))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if not self.gradient_clip_norm:
            return
        if self.sharded:  # sharded and replicated gradients together
            parallel.clip_grad_norm_(self._trained_parameters(optimizer), self.gradient_clip_norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_norm, gradient_clip_algorithm="norm")

    def train(self, mode: bool = True):
        """Fully frozen parts stay in eval mode (no dropout), whatever Lightning switches."""
        super().train(mode)
        if mode:
            for module in self.net.children():
                if not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    def loss_at(self, batch: dict, num_tokens: int | None) -> tuple[Tensor, Tensor, int]:
        out = self.net(batch, num_tokens=num_tokens)
        extra = sum(out.losses.values(), torch.zeros((), device=out.loss.device))
        return out.loss + self.compressor_loss_weight * extra, out, out.num_image_tokens

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        # Every rank must agree to skip, or the others would wait in the gradient all-reduce.
        if not self.trainer.strategy.reduce_boolean_decision(batch["input_ids"].shape[0] > 0, all=True):
            log.warning("step %d: a batch with no usable sample on some rank was skipped", self.global_step)
            return None
        budgets = self.net.compressor.training_budgets()
        losses, tokens = [], []
        for k in budgets:
            loss, _, m = self.loss_at(batch, k)
            losses.append(loss)
            tokens.append(m)
        loss = torch.stack(losses).mean()
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            # Returning None makes Lightning skip backward and the optimizer step: weights unchanged.
            log.warning("step %d: non-finite loss %s on some rank, batch skipped", self.global_step, loss.item())
            return None
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("data/skipped_samples", batch["num_skipped"].float(), batch_size=1)
        self.log("train/image_tokens", float(sum(tokens) / len(tokens)), batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        batch_size = batch["input_ids"].shape[0]
        self.log("val/skipped_samples", batch["num_skipped"].float(), reduce_fx="sum", sync_dist=True, batch_size=1)
        if batch_size == 0:
            return
        for k in self.val_budgets:
            out = self.net(batch, num_tokens=k)
            accuracy = answer_exact_match(out.logits, out.labels).float().mean()
            self.log(f"val/loss@{k}", out.loss, batch_size=batch_size, sync_dist=True)
            self.log(f"val/acc@{k}", accuracy, batch_size=batch_size, sync_dist=True)
            if k == max(self.val_budgets):
                self.log("val/loss", out.loss, batch_size=batch_size, sync_dist=True)
                self.log("val/acc", accuracy, prog_bar=True, batch_size=batch_size, sync_dist=True)

    def gather_for_export(self) -> None:
        """Every rank calls this before `export` (a collective when sharded): rank 0 then holds
        an unsharded copy of the model (with its LoRA adapters) and the full weights."""
        if self.sharded:
            lora = self.lora
            prepare = (lambda twin: apply_lora(twin.language_model, **lora)) if lora else None
            self._export_net = parallel.gathered_copy(self.net, prepare=prepare)

    def export(self, directory: Path, metrics: dict | None = None, extra: dict | None = None) -> Path:
        """Full model (LoRA merged) as save_pretrained, plus connector/ and connector/mm_projector.bin."""
        net = parallel.model_for_export(self.net, self._export_net, self.sharded)
        if any(n.endswith(("lora_a", "lora_b")) for n, _ in net.named_parameters()):
            net = copy.deepcopy(net)
            merge_lora(net)
        net.save_pretrained(directory, metrics=metrics, extra=extra)
        save_connector(net, Path(directory) / "connector", metrics=metrics)
        return Path(directory)
