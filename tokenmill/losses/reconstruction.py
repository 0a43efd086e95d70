"""Pixel-space reconstruction losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_RECONSTRUCTION_LOSSES = {
    "l1": F.l1_loss,
    "l2": F.mse_loss,
}


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean absolute ("l1") or mean squared ("l2") error between ``pred`` and ``target``.

    Shapes must match exactly: silent broadcasting of e.g. [B, C, H, W] against
    [C, H, W] would average the wrong pairs and still return a plausible number.
    """
    if kind not in _RECONSTRUCTION_LOSSES:
        valid = ", ".join(repr(k) for k in sorted(_RECONSTRUCTION_LOSSES))
        raise ValueError(f"unknown reconstruction loss kind {kind!r}; expected one of {valid}")
    if pred.shape != target.shape:
        raise ValueError(
            f"reconstruction_loss: pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    return _RECONSTRUCTION_LOSSES[kind](pred, target)
