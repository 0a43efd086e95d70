"""The training task refuses to apply non-finite updates and stops with a clear message."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tokenmill.export import build_model
from tokenmill.trainers import TokenizerTask

from .conftest import tiny_autoencoder_config


def _loader(images: torch.Tensor) -> DataLoader:
    batches = [{"image": images, "num_skipped": torch.tensor(0), "key": [str(i) for i in range(len(images))]}]
    return DataLoader(batches, batch_size=None)


def test_nonfinite_losses_skip_the_step_then_stop_with_a_message(caplog):
    net = build_model(tiny_autoencoder_config())
    task = TokenizerTask(net, partial(torch.optim.AdamW, lr=1e-3), ema_decay=None, max_consecutive_nonfinite=3,
                         scheduler={"warmup_steps": 0, "total_steps": 10})
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    nan_images = torch.full((2, 3, 32, 32), float("nan"))
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite generator losses"):
        trainer.fit(task, train_dataloaders=_loader(nan_images))
    assert "non-finite generator loss" in caplog.text and "step skipped" in caplog.text
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed although every step was skipped"


def test_task_configuration_errors_are_explicit():
    net = build_model(tiny_autoencoder_config())
    opt = partial(torch.optim.AdamW, lr=1e-3)
    with pytest.raises(ValueError, match="discriminator needs its own `discriminator_optimizer`"):
        TokenizerTask(net, opt, discriminator=torch.nn.Conv2d(3, 1, 3))
    with pytest.raises(ValueError, match="no `perceptual` network is configured"):
        TokenizerTask(net, opt, loss={"perceptual": 1.0})
