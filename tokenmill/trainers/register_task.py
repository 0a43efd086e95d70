"""PH-Reg (Chen et al. 2025, "Vision Transformers with Self-Distilled Registers"): add registers
to a pretrained ViT after the fact by self-distillation.

The student is the configured `HFVisionEncoder` with `num_registers > 0`; the teacher is a frozen
deep copy of it taken here, before any training step, with the registers removed, i.e. the
pretrained ViT as it was. Each step the teacher produces denoised dense targets from several
shifted / flipped views (`tokenmill.compressors.registers.denoised_dense_targets`) and the student
learns to produce them from the plain image:

    loss = cos_weight * (1 - cosine(student, target)) + mse_weight * mse(student, target)

averaged over patches, on the patch features of the tower's `select_layer`. Only the registers
and the parameters matching `trainable` learn; everything else keeps its pretrained value.
Validation and export use the student (`eval_net`); `run.py` saves it through `export`
(`save_pretrained` with a self-contained config).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from tokenmill.compressors.registers import denoised_dense_targets
from tokenmill.compressors.vision import HFVisionEncoder
from tokenmill.export import model_config
from tokenmill.trainers.optim import build_optimizer

log = logging.getLogger(__name__)


def select_trainable(net: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Freeze every parameter of `net` except `registers` and those whose name matches a pattern
    (`re.match`: anchored at the start, so a plain name prefix works). Returns the trainable
    names; a pattern that matches no parameter is an error (a typo would silently freeze it)."""
    compiled = [(p, re.compile(p)) for p in patterns]
    names = [name for name, _ in net.named_parameters()]
    unmatched = [p for p, regex in compiled if not any(regex.match(name) for name in names)]
    if unmatched:
        quoted = ", ".join(f"'{p}'" for p in unmatched)
        raise ValueError(
            f"trainable pattern(s) {quoted} match no parameter of the student; its parameters are "
            f"named like {', '.join(names[:4])} ... {', '.join(names[-2:])}"
        )
    trainable = []
    for name, param in net.named_parameters():
        keep = name == "registers" or any(regex.match(name) for _, regex in compiled)
        param.requires_grad_(keep)
        if keep:
            trainable.append(name)
    return trainable


class RegisterDistillation(L.LightningModule):
    """Args:
    net: the student, an `HFVisionEncoder` with num_registers > 0 (pretrained weights).
    optimizer: partial optimizer (e.g. torch.optim.AdamW) over the trainable parameters.
    scheduler: partial LR scheduler taking the optimizer (e.g.
        tokenmill.trainers.optim.warmup_cosine_scheduler), stepped every training step; or None.
    trainable: regex / name-prefix patterns of parameters that train besides `registers`.
    num_augmentations: augmented teacher views per image besides the plain one.
    max_shift: largest shift of a view in pixels (a multiple of the patch size).
    flip: also flip views horizontally (probability 1/2).
    cos_weight, mse_weight: weights of (1 - cosine similarity) and of the MSE.
    gradient_clip_norm: clip the gradient norm of the trainable parameters (None: off).
    seed: seeds the draws of the teacher's views (validation draws are fixed per batch).
    """

    def __init__(
        self,
        net: HFVisionEncoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
        trainable: Sequence[str] = ("registers",),
        num_augmentations: int = 10,
        max_shift: int = 32,
        flip: bool = True,
        cos_weight: float = 1.0,
        mse_weight: float = 1.0,
        gradient_clip_norm: float | None = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        if not getattr(net, "num_registers", 0):
            raise ValueError(
                "RegisterDistillation needs a student with registers: set num_registers > 0 on the "
                "HFVisionEncoder (model.net.num_registers)"
            )
        if max_shift < 0 or max_shift % net.patch_size:
            raise ValueError(
                f"max_shift must be a non-negative multiple of the patch size {net.patch_size}, "
                f"got {max_shift}"
            )
        # The teacher: the tower as it is now, before any step, without registers.
        teacher = copy.deepcopy(net)
        teacher.registers = None
        teacher.num_registers = 0
        teacher.cross_crop_registers = False
        self.teacher = teacher.requires_grad_(False).eval()
        self.net = net
        self.trainable_names = select_trainable(net, list(trainable))
        log.info("PH-Reg: %d trainable tensors: %s", len(self.trainable_names), self.trainable_names)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.num_augmentations = num_augmentations
        self.max_shift = max_shift
        self.flip = flip
        self.cos_weight = cos_weight
        self.mse_weight = mse_weight
        self.gradient_clip_norm = gradient_clip_norm
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def eval_net(self) -> HFVisionEncoder:
        return self.net

    def export(self, directory, metrics: dict | None = None, extra: dict | None = None):
        """`save_pretrained` of the student (called by run.py), self-contained: a student loaded
        from a hub name or a local directory is recorded by its architecture (the tower's
        `portable_config`), since the export carries all its weights; reloading then needs
        neither the hub nor the original directory."""
        net = self.eval_net
        recorded = model_config(net)
        if not recorded.get("name_or_path"):
            return net.save_pretrained(directory, metrics=metrics, extra=extra)
        net._tokenmill_config = net.portable_config(recorded)
        try:
            return net.save_pretrained(directory, metrics=metrics, extra=extra)
        finally:
            net._tokenmill_config = recorded

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: never in training mode (dropout, if any, stays off)
        return self

    # ----------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_factory, self.net)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val if gradient_clip_val is not None else self.gradient_clip_norm
        if clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm"
            )

    # ----------------------------------------------------------------------------------- loss
    def targets(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """Denoised teacher features [B, N, D] for images in [0, 1]."""
        return denoised_dense_targets(
            self.teacher, images, self.num_augmentations, self.max_shift, self.flip, generator=generator
        )

    def distillation_loss(self, student: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        student, targets = student.float(), targets.float()
        cos = F.cosine_similarity(student, targets, dim=-1).mean()
        mse = F.mse_loss(student, targets)
        loss = self.cos_weight * (1.0 - cos) + self.mse_weight * mse
        return loss, {"loss": loss.detach(), "cos": cos.detach(), "mse": mse.detach()}

    def _step(self, batch: dict, generator: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
        images = (batch["image"].float() + 1.0) / 2.0  # the data pipeline's [-1, 1] -> the tower's [0, 1]
        targets = self.targets(images, generator)
        return self.distillation_loss(self.net(images).patches, targets)

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        images = batch["image"]
        # A batch whose every image failed to decode arrives empty; all ranks skip it together.
        if not self.trainer.strategy.reduce_boolean_decision(len(images) > 0, all=True):
            log.warning("step %d: a batch with no decodable image on some rank was skipped", self.global_step)
            return None
        loss, logs = self._step(batch, self.generator)
        logs["lr"] = torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"])
        if "num_skipped" in batch:
            logs["data/skipped_images"] = batch["num_skipped"].float()
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, batch_size=len(images))
        self.log("loss", logs["loss"], prog_bar=True, logger=False, batch_size=len(images))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        if len(images) == 0:
            return
        # The same views for a batch at every validation, so val/loss is comparable over time.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_idx)
        _, logs = self._step(batch, generator)
        self.log_dict(
            {f"val/{k}": v for k, v in logs.items()}, sync_dist=True, prog_bar=True, batch_size=len(images)
        )

    # ----------------------------------------------------------------- exact-resume RNG state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["register_distillation_generator"] = self.generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("register_distillation_generator")
        if state is not None:
            self.generator.set_state(state)
