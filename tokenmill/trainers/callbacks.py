"""Callbacks for tokenizer runs: reconstruction pictures."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from tokenmill.trainers.images import save_grid


class ReconstructionGrid(L.Callback):
    """After each validation, writes originals (top row) over EMA reconstructions (bottom row)
    to `<dirpath>/step_XXXXXXX.png` and `<dirpath>/latest.png`."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch = getattr(pl_module, "grid_batch", None)
        if trainer.sanity_checking or not trainer.is_global_zero or batch is None:
            return
        rows = [batch["image"], batch["reconstruction"]]
        save_grid(rows, self.dirpath / f"step_{trainer.global_step:07d}.png")
        save_grid(rows, self.dirpath / "latest.png")
