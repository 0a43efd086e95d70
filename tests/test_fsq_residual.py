import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tokenmill.quantizers.fsq import FSQ
from tokenmill.quantizers.residual import ResidualFSQ, ResidualQuantizer
from tokenmill.quantizers.vq import VectorQuantizer

vqp = pytest.importorskip("vector_quantize_pytorch")

LEVEL_SETS = [[8, 8, 8, 5, 5, 5], [8, 5, 5, 5]]


def _latents(shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# ---------------------------------------------------------------- FSQ


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_fsq_matches_oracle_bitwise(levels):
    ours = FSQ(levels)
    oracle = vqp.FSQ(levels=levels)  # defaults: channel-last, return_indices, no symmetry, no noise
    assert oracle.noise_dropout == 0.0 and not oracle.preserve_symmetry
    ours.train()
    oracle.train()
    z = _latents((3, 50, len(levels)))
    out = ours(z)
    ref_codes, ref_indices = oracle(z)
    assert torch.equal(out.codes, ref_codes)
    assert out.indices.dtype == torch.int64
    assert torch.equal(out.indices, ref_indices.long())
    assert ours.codebook_size == oracle.codebook_size == math.prod(levels)
    all_indices = torch.arange(ours.codebook_size)
    assert torch.equal(ours.indices_to_codes(all_indices), oracle.indices_to_codes(all_indices))


@pytest.mark.parametrize("hard_clamp", [False, True])
def test_symmetric_fsq_matches_oracle_bitwise(hard_clamp):
    levels = [8, 5, 5, 5]
    ours = FSQ(levels, preserve_symmetry=True, hard_clamp=hard_clamp)
    oracle = vqp.FSQ(levels=levels, preserve_symmetry=True, bound_hard_clamp=hard_clamp)
    z = _latents((2, 40, 4), seed=1)
    out = ours(z)
    ref_codes, ref_indices = oracle(z)
    assert torch.equal(out.codes, ref_codes)
    assert torch.equal(out.indices, ref_indices.long())


def test_fsq_with_projection_matches_oracle():
    levels = [8, 5, 5, 5]
    oracle = vqp.FSQ(levels=levels, dim=12)
    ours = FSQ(levels, dim=12)
    ours.load_state_dict(oracle.state_dict())
    z = _latents((2, 16, 12), seed=2)
    out = ours(z)
    ref_codes, ref_indices = oracle(z)
    assert torch.equal(out.indices, ref_indices.long())
    assert torch.equal(out.codes, ref_codes)
    assert torch.equal(ours.indices_to_codes(out.indices), out.codes)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_fsq_round_trip_range_and_grid(levels):
    fsq = FSQ(levels)
    out = fsq(_latents((4, 64, len(levels)), seed=3, scale=4.0))
    assert torch.equal(fsq.indices_to_codes(out.indices), out.codes)
    assert out.indices.min() >= 0 and out.indices.max() < fsq.codebook_size
    assert out.codes.abs().max() <= 1.0
    assert out.losses == {}
    assert set(out.metrics) == {"usage", "entropy", "perplexity"}
    # The implicit codebook is a bijection: every index decodes to a distinct code.
    grid = fsq.indices_to_codes(torch.arange(fsq.codebook_size))
    assert torch.unique(grid, dim=0).shape[0] == fsq.codebook_size


def test_fsq_straight_through_gradient_is_identity_on_normalised_bounded_value():
    fsq = FSQ([8, 5, 5, 5])
    z = _latents((2, 10, 4), seed=4).requires_grad_()
    w = torch.randn(2, 10, 4)
    (fsq(z).codes * w).sum().backward()
    z2 = z.detach().clone().requires_grad_()
    bounded = torch.tanh(z2 + fsq.shift) * fsq.half_l - fsq.offset
    ((bounded / fsq.half_width) * w).sum().backward()
    assert torch.allclose(z.grad, z2.grad, rtol=1e-6, atol=0)


def test_fsq_bf16_autocast_gives_fp32_indices():
    fsq = FSQ([8, 8, 8, 5, 5, 5])
    z = _latents((2, 32, 6), seed=5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = fsq(z)
    out_fp32 = fsq(z.float())
    assert out_bf16.codes.dtype == torch.bfloat16
    assert torch.equal(out_bf16.indices, out_fp32.indices)


def test_fsq_skips_histogram_for_huge_codebooks():
    fsq = FSQ([16] * 6)  # 2**24 codes
    assert fsq(_latents((1, 4, 6))).metrics == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"levels": []}, "non-empty"),
        ({"levels": [1]}, ">= 2"),
        ({"levels": [8, 1, 5]}, ">= 2"),
        ({"levels": [8, 2]}, "preserve_symmetry"),
        ({"levels": [8, 2.5]}, "ints"),
        ({"levels": [8, 5], "dim": 0}, "positive"),
    ],
)
def test_fsq_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FSQ(**kwargs)


def test_fsq_rejects_mismatched_latent_dim():
    with pytest.raises(ValueError, match=r"\[B, N, 4\]"):
        FSQ([8, 5, 5, 5])(torch.randn(2, 3, 6))


# ---------------------------------------------------------------- residual FSQ


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_residual_fsq_matches_oracle_bitwise(levels):
    ours = ResidualFSQ(levels, num_quantizers=4).eval()
    oracle = vqp.ResidualFSQ(levels=levels, num_quantizers=4).eval()
    z = _latents((2, 40, len(levels)), seed=6, scale=0.7)
    out = ours(z)
    ref_codes, ref_indices = oracle(z)
    assert out.indices.shape == (2, 40, 4)
    assert torch.equal(out.indices, ref_indices.long())
    assert torch.equal(out.codes, ref_codes)
    assert torch.equal(ours.indices_to_codes(out.indices), out.codes)
    assert torch.equal(ours.indices_to_codes(out.indices), oracle.get_output_from_indices(ref_indices))
    assert ours.codebook_size == oracle.codebook_size == math.prod(levels)


def test_residual_fsq_tanh_variant_matches_oracle():
    levels = [8, 5, 5, 5]
    ours = ResidualFSQ(levels, num_quantizers=3, hard_clamp=False).eval()
    oracle = vqp.ResidualFSQ(levels=levels, num_quantizers=3, bound_hard_clamp=False).eval()
    z = _latents((2, 30, 4), seed=7, scale=0.7)
    out = ours(z)
    ref_codes, ref_indices = oracle(z)
    assert torch.equal(out.indices, ref_indices.long())
    assert torch.equal(out.codes, ref_codes)


def test_residual_fsq_stages_refine_the_reconstruction():
    rfsq = ResidualFSQ([8, 5, 5, 5], num_quantizers=3).eval()
    z = _latents((2, 64, 4), seed=8, scale=0.5)
    target = rfsq.prepare_input(z)
    errors = [(rfsq(z, num_stages=k).codes - target).pow(2).mean().item() for k in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]


# ---------------------------------------------------------------- residual VQ


def test_residual_vq_matches_oracle_indices():
    torch.manual_seed(0)
    oracle = vqp.ResidualVQ(dim=8, num_quantizers=4, codebook_size=64).eval()
    assert oracle.layers[0].ema_update and not oracle.layers[0].learnable_codebook  # eval: no EMA step
    ours = ResidualQuantizer(
        VectorQuantizer(dim=8, codebook_size=64, use_l2_norm=False), num_quantizers=4
    ).eval()
    with torch.no_grad():
        for stage, layer in zip(ours.stages, oracle.layers, strict=True):
            stage.embedding.weight.copy_(layer._codebook.embed[0])
    z = _latents((2, 50, 8), seed=9, scale=1.0)
    before = [layer._codebook.embed.clone() for layer in oracle.layers]
    out = ours(z)
    ref_codes, ref_indices, _ = oracle(z)
    assert all(torch.equal(b, layer._codebook.embed) for b, layer in zip(before, oracle.layers, strict=True))
    assert torch.equal(out.indices, ref_indices.long())
    assert torch.allclose(out.codes, ref_codes, atol=1e-5)
    assert torch.equal(ours.indices_to_codes(out.indices), out.codes)
    assert ours.codebook_size == 64
    assert set(out.losses) == {"codebook", "commitment"}
    assert "stage3/usage" in out.metrics


def test_residual_stages_are_independent_and_reinitialised():
    rq = ResidualQuantizer(VectorQuantizer(dim=4, codebook_size=16, use_l2_norm=False), num_quantizers=3)
    weights = [s.embedding.weight for s in rq.stages]
    assert len({w.data_ptr() for w in weights}) == 3
    assert not torch.equal(weights[0], weights[1])
    assert all(w.abs().max() <= 1 / 16 for w in weights)


def test_residual_quantizer_from_hydra_yaml():
    cfg = OmegaConf.create(
        {
            "_target_": "tokenmill.quantizers.residual.ResidualQuantizer",
            "stage": {
                "_target_": "tokenmill.quantizers.vq.VectorQuantizer",
                "dim": 8,
                "codebook_size": 64,
                "use_l2_norm": False,
            },
            "num_quantizers": 4,
        }
    )
    rq = instantiate(cfg)
    assert rq.num_quantizers == 4 and rq.dim == 8 and rq.codebook_size == 64
    out = rq(torch.randn(2, 5, 8))
    assert out.indices.shape == (2, 5, 4)
    partial_cfg = OmegaConf.create(
        {
            "_target_": "tokenmill.quantizers.residual.ResidualQuantizer",
            "stage": {"_target_": "tokenmill.quantizers.fsq.FSQ", "_partial_": True, "levels": [8, 5, 5, 5]},
            "num_quantizers": 2,
        }
    )
    assert instantiate(partial_cfg).num_quantizers == 2


def test_quantizer_dropout_only_in_training():
    rq = ResidualQuantizer(
        VectorQuantizer(dim=4, codebook_size=16, use_l2_norm=False),
        num_quantizers=4,
        quantizer_dropout=1.0,
        dropout_seed=0,
    )
    z = torch.randn(2, 6, 4)
    rq.train()
    active = []
    for _ in range(20):
        out = rq(z)
        k = int(out.metrics["active_stages"])
        active.append(k)
        assert (out.indices[..., :k] >= 0).all() and (out.indices[..., k:] == -1).all()
        assert torch.equal(rq.indices_to_codes(out.indices), out.codes)
        assert torch.equal(rq.indices_to_codes(out.indices[..., :k]), out.codes)
    assert min(active) < 4 and set(active) <= {1, 2, 3, 4}
    rq.eval()
    for _ in range(5):
        assert (rq(z).indices >= 0).all()
    # No dropout configured: training always uses every stage.
    rq_full = ResidualQuantizer(VectorQuantizer(dim=4, codebook_size=16, use_l2_norm=False), num_quantizers=4)
    rq_full.train()
    assert all((rq_full(z).indices >= 0).all() for _ in range(5))


def test_quantizer_dropout_is_reproducible_with_seed():
    def draws(seed):
        rfsq = ResidualFSQ([8, 5, 5, 5], num_quantizers=4, quantizer_dropout=0.5, dropout_seed=seed).train()
        z = torch.randn(1, 3, 4)
        return [int(rfsq(z).metrics["active_stages"]) for _ in range(20)]

    assert draws(3) == draws(3)
    assert 4 in draws(3) and min(draws(3)) < 4


def test_num_stages_argument():
    rfsq = ResidualFSQ([8, 5, 5, 5], num_quantizers=4).eval()
    z = _latents((2, 8, 4), seed=10, scale=0.5)
    full = rfsq(z)
    out = rfsq(z, num_stages=2)
    assert torch.equal(out.indices[..., :2], full.indices[..., :2])
    assert (out.indices[..., 2:] == -1).all()
    assert torch.equal(rfsq.indices_to_codes(out.indices), out.codes)
    with pytest.raises(ValueError, match="num_stages"):
        rfsq(z, num_stages=5)


def test_residual_bf16_autocast_matches_fp32_indices():
    rfsq = ResidualFSQ([8, 8, 8, 5, 5, 5], num_quantizers=3)
    z = _latents((2, 16, 6), seed=11, scale=0.5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rfsq(z)
    assert out.codes.dtype == torch.bfloat16
    assert torch.equal(out.indices, rfsq(z.float()).indices)


def test_residual_rejects_bad_config():
    with pytest.raises(ValueError, match="use_l2_norm"):
        ResidualQuantizer(VectorQuantizer(dim=4, codebook_size=16, use_l2_norm=True), num_quantizers=2)
    with pytest.raises(ValueError, match="exactly one"):
        ResidualQuantizer(num_quantizers=2)
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualQuantizer(FSQ([8, 5]), num_quantizers=0)
    with pytest.raises(ValueError, match="dims differ"):
        ResidualQuantizer(quantizers=[FSQ([8, 5]), FSQ([8, 5, 5])])
    with pytest.raises(ValueError, match="codebook sizes differ"):
        ResidualQuantizer(quantizers=[FSQ([8, 5]), FSQ([5, 5])])
    with pytest.raises(ValueError, match="quantizer_dropout"):
        ResidualQuantizer(FSQ([8, 5]), num_quantizers=2, quantizer_dropout=1.5)
    with pytest.raises(ValueError, match=">= 2"):
        ResidualFSQ([1, 5], num_quantizers=2)
    with pytest.raises(ValueError, match=r"\[B, N, 4\]"):
        ResidualFSQ([8, 5, 5, 5], num_quantizers=2)(torch.randn(1, 2, 3))


def test_residual_fsq_with_projection_matches_oracle():
    levels = [8, 5, 5, 5]
    oracle = vqp.ResidualFSQ(levels=levels, num_quantizers=3, dim=12).eval()
    ours = ResidualFSQ(levels, num_quantizers=3, dim=12).eval()
    ours.load_state_dict(oracle.state_dict())
    z = _latents((2, 20, 12), seed=12, scale=1.0)
    out = ours(z)
    ref_codes, ref_indices = oracle(z)
    assert torch.equal(out.indices, ref_indices.long())
    assert torch.equal(out.codes, ref_codes)
    assert torch.equal(ours.indices_to_codes(out.indices), out.codes)
