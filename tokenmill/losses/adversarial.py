"""GAN objectives, LeCam regularisation and VQGAN's adaptive generator weight."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss, halved as in VQGAN so it is on the scale of one term."""
    loss_real = F.relu(1.0 - logits_real).mean()
    loss_fake = F.relu(1.0 + logits_fake).mean()
    return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge generator loss: raise the discriminator's logits on generated images."""
    return -logits_fake.mean()


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy discriminator loss on logits, halved like :func:`hinge_d_loss`.

    softplus(-x) = -log(sigmoid(x)) and softplus(x) = -log(1 - sigmoid(x)), in a
    numerically stable form.
    """
    loss_real = F.softplus(-logits_real).mean()
    loss_fake = F.softplus(logits_fake).mean()
    return 0.5 * (loss_real + loss_fake)


def vanilla_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log(sigmoid(D(G(z)))): strong gradients when D wins."""
    return F.softplus(-logits_fake).mean()


def _global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over all ranks' logits (plain mean when not distributed)."""
    local = torch.stack(
        [values.detach().float().sum(), values.new_tensor(values.numel(), dtype=torch.float32)]
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return local[0] / local[1]


class LeCamEMA(nn.Module):
    """LeCam regulariser (Tseng et al. 2021) for the discriminator.

    Keeps exponential moving averages of the mean real and fake logits in buffers
    (so they are checkpointed and follow ``.to(device)``), and penalises real logits
    above the fake EMA and fake logits below the real EMA. The EMAs are updated from
    the all-rank mean under DDP so every rank holds the same values.
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCamEMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros((), dtype=torch.float32))
        self.register_buffer("ema_fake", torch.zeros((), dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Keep the EMAs fp32 when a "16-true" precision plugin casts the whole model: a
        # (1 - decay) step is below bf16 resolution and the averages would stop moving.
        ema_real, ema_fake = self.ema_real, self.ema_fake
        super()._apply(fn, recurse)
        self.ema_real = ema_real.to(device=self.ema_real.device)
        self.ema_fake = ema_fake.to(device=self.ema_fake.device)
        return self

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        self.ema_real.mul_(self.decay).add_(_global_mean(logits_real).to(self.ema_real), alpha=1 - self.decay)
        self.ema_fake.mul_(self.decay).add_(_global_mean(logits_fake).to(self.ema_fake), alpha=1 - self.decay)

    def penalty(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        real_term = F.relu(logits_real - self.ema_fake).pow(2).mean()
        fake_term = F.relu(self.ema_real - logits_fake).pow(2).mean()
        return real_term + fake_term


def adaptive_generator_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN's balance between reconstruction and adversarial gradients.

    Returns ||d nll / d last_layer|| / (||d g / d last_layer|| + eps), clamped to
    [0, max_weight] and detached, so the adversarial term cannot swamp the
    reconstruction at the decoder's output. Both graphs are retained because the
    caller backpropagates the combined loss afterwards.
    """
    if not isinstance(last_layer, torch.Tensor) or not last_layer.requires_grad:
        raise ValueError(
            "adaptive_generator_weight: last_layer must be a tensor that requires grad (the decoder's "
            "final weight); got one with requires_grad=False. Is the decoder frozen, or is this running "
            "under torch.no_grad()?"
        )
    grads = []
    for name, loss in (("nll_loss", nll_loss), ("g_loss", g_loss)):
        if not loss.requires_grad:
            raise ValueError(
                f"adaptive_generator_weight: {name} does not require grad (no graph to differentiate)"
            )
        (grad,) = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
        if grad is None:
            raise ValueError(f"adaptive_generator_weight: {name} does not depend on last_layer")
        grads.append(grad)
    nll_grad, g_grad = grads
    weight = torch.norm(nll_grad) / (torch.norm(g_grad) + eps)
    return torch.clamp(weight, 0.0, max_weight).detach()
