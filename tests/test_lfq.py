import math

import pytest
import torch
import torch.nn.functional as F

from tokenmill.quantizers.lfq import LFQ


def oracle_lfq(dim: int, num_groups: int = 1, spherical: bool = False):
    """vector-quantize-pytorch's LFQ configured like ours: no projections, no random sub-sampling."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    return vqp.LFQ(
        dim=dim,
        codebook_size=2 ** (dim // num_groups),
        num_codebooks=num_groups,
        entropy_loss_weight=0.1,
        commitment_loss_weight=0.25,
        diversity_gamma=1.0,
        has_projections=False,
        frac_per_sample_entropy=1.0,
        codebook_scale=1.0,
        spherical=spherical,
    )


PARITY_CASES = [
    # dim, groups, spherical, inv_temperature, input scale
    (8, 1, False, 100.0, 1.0),
    (10, 1, False, 100.0, 1.0),
    (8, 1, False, 1.0, 0.3),
    (10, 2, False, 1.0, 0.3),
    (12, 3, False, 100.0, 1.0),
    (8, 1, True, 100.0, 1.0),
    (8, 1, True, 1.0, 1.0),
]


@pytest.mark.parametrize("dim,groups,spherical,tau,scale", PARITY_CASES)
def test_parity_with_vector_quantize_pytorch(dim, groups, spherical, tau, scale):
    torch.manual_seed(dim + groups)
    z = torch.randn(4, 64, dim) * scale
    z[0, 0, 0] = 0.0  # sign convention at exactly zero
    ours = LFQ(dim, num_groups=groups, spherical=spherical, inv_temperature=tau)
    oracle = oracle_lfq(dim, groups, spherical)
    out = ours(z)

    with torch.no_grad():
        q_eval, idx_eval, _ = oracle.eval()(z)
    (q_train, idx, aux), breakdown = oracle.train()(z, inv_temperature=tau, return_loss_breakdown=True)

    assert torch.equal(out.indices, idx)
    assert torch.equal(out.indices, idx_eval)
    if spherical:  # 1/sqrt(d) computed by F.normalize vs a constant: up to an ulp
        torch.testing.assert_close(out.codes, q_eval, atol=1e-6, rtol=0)
    else:
        assert torch.equal(out.codes, q_eval)
    torch.testing.assert_close(out.codes, q_train, atol=1e-6, rtol=0)

    # The oracle clamps probabilities at 1e-5 inside its log; we use exact logs. The gap only
    # shows in the raw entropies at sharp temperatures and stays below 1e-5 in the weighted loss.
    component_tol = 1e-4 if tau >= 100 else 2e-5
    torch.testing.assert_close(
        out.metrics["per_sample_entropy"], breakdown.per_sample_entropy, atol=component_tol, rtol=0
    )
    torch.testing.assert_close(
        out.metrics["codebook_entropy"], breakdown.batch_entropy, atol=component_tol, rtol=0
    )
    torch.testing.assert_close(out.losses["commitment"], 0.25 * breakdown.commitment, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sum(out.losses.values()), aux, atol=1e-5, rtol=0)


def test_spherical_groups_normalise_over_all_channels():
    # BSQ paper convention (the oracle instead normalises each group separately).
    z = torch.randn(2, 16, 12)
    out = LFQ(12, num_groups=3, spherical=True)(z)
    torch.testing.assert_close(out.codes.norm(dim=-1), torch.ones(2, 16))
    assert torch.equal(out.codes.abs(), torch.full_like(out.codes, 1 / math.sqrt(12)))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=10),
        dict(dim=12, num_groups=3),
        dict(dim=8, spherical=True),
        dict(dim=12, num_groups=4, spherical=True),
        dict(dim=10, index_format="bits"),
        dict(dim=12, num_groups=2, index_format="bits", spherical=True),
        dict(dim=62),
    ],
)
def test_indices_to_codes_round_trips_exactly(kwargs):
    q = LFQ(**kwargs)
    z = torch.randn(3, 20, q.dim)
    out = q(z)
    assert torch.equal(q.indices_to_codes(out.indices), out.codes)
    if q.index_format == "int":
        expected_shape = (3, 20) if q.num_groups == 1 else (3, 20, q.num_groups)
        assert out.indices.shape == expected_shape and out.indices.dtype == torch.long
        assert out.indices.min() >= 0 and out.indices.max() < q.codebook_size
    else:
        assert out.indices.shape == (3, 20, q.dim) and out.indices.dtype == torch.bool


def test_index_bit_order_and_zero_convention():
    q = LFQ(4)
    z = torch.tensor([[[1.0, -1.0, 0.0, 0.5], [-2.0, -0.1, -3.0, -1.0], [0.1, 0.2, 0.3, 0.4]]])
    out = q(z)
    # channel 0 is the most significant bit; 0 quantizes to the negative code
    assert out.indices.tolist() == [[0b1001, 0, 0b1111]]
    assert out.codes[0, 0].tolist() == [1.0, -1.0, -1.0, 1.0]
    assert q.codebook_size == 16 and q.total_bits == 4


def test_group_indices_match_per_group_lfq():
    z = torch.randn(2, 8, 12)
    grouped = LFQ(12, num_groups=3)(z)
    for g in range(3):
        single = LFQ(4)(z[..., 4 * g : 4 * (g + 1)])
        assert torch.equal(grouped.indices[..., g], single.indices)


def test_entropy_terms_on_hand_built_inputs():
    q = LFQ(4, entropy_weight=1.0, diversity_gamma=1.0, inv_temperature=100.0)
    all_codes = q.indices_to_codes(torch.arange(16)[None])  # [1, 16, 4], confident latents
    balanced = q(all_codes.repeat(2, 1, 1))
    collapsed = q(all_codes[:, :1].repeat(2, 16, 1))
    # confident latents: per-sample entropy ~ 0
    assert balanced.metrics["per_sample_entropy"] < 1e-6
    # every code equally used: maximal codebook entropy; one code: zero
    assert abs(float(balanced.metrics["codebook_entropy"]) - 4 * math.log(2)) < 1e-5
    assert collapsed.metrics["codebook_entropy"] < 1e-6
    assert balanced.losses["entropy"] < collapsed.losses["entropy"] - 2.0
    # uncertain latents (z = 0): every bit is a fair coin
    unsure = q(torch.zeros(1, 4, 4))
    assert abs(float(unsure.metrics["per_sample_entropy"]) - 4 * math.log(2)) < 1e-5
    assert balanced.metrics["usage"] == 1.0 and abs(float(balanced.metrics["perplexity"]) - 16) < 1e-3
    assert collapsed.metrics["usage"] == 1 / 16


def test_factorised_codebook_entropy_bounds_the_exact_one():
    torch.manual_seed(0)
    z = torch.randn(2, 64, 8) + torch.randn(1, 1, 8)  # correlated bits
    exact = LFQ(8, inv_temperature=1.0)(z).metrics
    factorised = LFQ(8, inv_temperature=1.0, exact_entropy_max_bits=0)(z).metrics
    torch.testing.assert_close(exact["per_sample_entropy"], factorised["per_sample_entropy"])
    assert factorised["codebook_entropy"] >= exact["codebook_entropy"] - 1e-6
    # independent, uniformly used bits: the two agree
    all_codes = LFQ(8).indices_to_codes(torch.arange(256)[None])
    e = LFQ(8)(all_codes).metrics["codebook_entropy"]
    f = LFQ(8, exact_entropy_max_bits=0)(all_codes).metrics["codebook_entropy"]
    torch.testing.assert_close(e, f)


def test_gradients_flow_to_z():
    q = LFQ(8, entropy_weight=0.1, commitment_weight=0.25, inv_temperature=1.0)
    z = torch.randn(2, 16, 8, requires_grad=True)
    out = q(z)
    out.codes.sum().backward(retain_graph=True)
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through
    z.grad = None
    out.losses["entropy"].backward(retain_graph=True)
    assert z.grad.abs().sum() > 0 and torch.isfinite(z.grad).all()
    z.grad = None
    out.losses["commitment"].backward()
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - out.codes).detach() / z.numel())


def test_bsq_gradients_flow_through_normalisation():
    z = torch.randn(2, 8, 16, requires_grad=True)
    out = LFQ(16, num_groups=4, spherical=True, inv_temperature=10.0)(z)
    (out.codes.square().sum() + sum(out.losses.values())).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_bf16_autocast_gives_the_fp32_indices():
    q = LFQ(16, num_groups=2)
    z = torch.randn(4, 64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = q(z.bfloat16())
    ref = q(z.bfloat16().float())
    assert torch.equal(low.indices, ref.indices)
    assert low.codes.dtype == torch.bfloat16
    assert torch.equal(low.codes.float(), ref.codes)
    torch.testing.assert_close(low.losses["entropy"], ref.losses["entropy"])


def test_dim_128_with_bits_never_materialises_the_codebook():
    q = LFQ(128, index_format="bits", spherical=True)
    assert q.codebook_size == 2**128
    z = torch.randn(2, 256, 128, requires_grad=True)
    out = q(z)
    assert out.indices.shape == (2, 256, 128) and out.indices.dtype == torch.bool
    assert torch.equal(q.indices_to_codes(out.indices), out.codes)
    assert "usage" not in out.metrics  # no histogram over 2^128 codes
    assert 0 < out.metrics["codebook_entropy"] <= 128 * math.log(2)
    sum(out.losses.values()).backward()
    assert torch.isfinite(z.grad).all()
    # grouped int indices still work at this size
    g = LFQ(128, num_groups=8)
    out = g(z.detach())
    assert out.indices.shape == (2, 256, 8) and torch.equal(g.indices_to_codes(out.indices), out.codes)


def test_int_indices_refuse_more_than_62_bits_per_group():
    with pytest.raises(ValueError, match="num_groups.*index_format='bits'"):
        LFQ(64)
    with pytest.raises(ValueError, match="int64"):
        LFQ(128, num_groups=2)
    LFQ(64, num_groups=2)  # 32 bits per group is fine
    LFQ(64, index_format="bits")
    with pytest.raises(ValueError):
        LFQ(10, num_groups=3)


def test_rejects_wrong_latent_shape():
    with pytest.raises(ValueError):
        LFQ(8)(torch.randn(2, 8))
    with pytest.raises(ValueError):
        LFQ(8)(torch.randn(2, 4, 9))


def test_commitment_loss_matches_definition():
    q = LFQ(6, commitment_weight=0.5)
    z = torch.randn(2, 10, 6)
    out = q(z)
    torch.testing.assert_close(out.losses["commitment"], 0.5 * F.mse_loss(z, q.indices_to_codes(out.indices)))


@pytest.mark.parametrize("dim", [6, 14], ids=["exact", "factorised"])
def test_saturated_soft_assignments_give_finite_gradients(dim):
    # Large latents at the default inv_temperature make every token's code probabilities exactly
    # 0 or 1, so most batch-mean probabilities are exactly 0: the entropy's log must not NaN.
    lfq = LFQ(dim=dim, entropy_weight=0.1)
    z = (torch.randn(2, 8, dim, generator=torch.Generator().manual_seed(0)) + 3.0).requires_grad_(True)
    out = lfq(z)
    sum(out.losses.values()).backward()
    assert torch.isfinite(out.losses["entropy"])
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
