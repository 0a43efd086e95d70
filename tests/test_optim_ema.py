import math

import torch
from torch import nn

from tokenmill.export import build_model
from tokenmill.trainers import EMA
from tokenmill.trainers.optim import no_weight_decay_names, param_groups, warmup_cosine

from .conftest import tiny_autoencoder_config


def test_weight_decay_excludes_norms_biases_tokens_and_embeddings():
    net = build_model(tiny_autoencoder_config())
    excluded = no_weight_decay_names(net)
    for name in ["encoder.latent_tokens", "encoder.patch_pos", "decoder.mask_token", "quantizer.embedding.weight",
                 "encoder.norm_pre.weight", "encoder.to_tokens.bias"]:
        assert name in excluded, name
    assert "encoder.transformer.blocks.0.attn.qkv.weight" not in excluded
    decay, no_decay = param_groups(net, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    n_params = sum(1 for _ in net.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def test_warmup_then_cosine_to_end_factor():
    f = warmup_cosine(warmup_steps=10, total_steps=110, end_factor=0.1)
    assert f(0) == 0.1 and f(9) == 1.0
    assert math.isclose(f(60), 0.1 + 0.9 * 0.5, rel_tol=1e-6)  # halfway through the cosine
    assert math.isclose(f(110), 0.1) and math.isclose(f(500), 0.1)


def test_ema_tracks_weights_with_warmup():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.module.weight.fill_(0.0)
    ema.update(model)  # warmup decay min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.module.weight, torch.full((2, 2), 0.9))
    assert not any(p.requires_grad for p in ema.module.parameters())
    ema.train()
    assert not ema.module.training
