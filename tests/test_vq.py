import pytest
import torch
import torch.nn.functional as F

from tokenmill.quantizers import VectorQuantizer


def test_cosine_vq_picks_the_most_similar_code_and_round_trips():
    vq = VectorQuantizer(dim=8, codebook_size=64, use_l2_norm=True)
    z = torch.randn(2, 10, 8)
    out = vq(z)
    sims = F.normalize(z, dim=-1) @ F.normalize(vq.embedding.weight, dim=-1).t()
    assert torch.equal(out.indices, sims.argmax(-1))
    assert torch.allclose(out.codes, vq.indices_to_codes(out.indices), atol=1e-6)
    assert torch.allclose(out.codes.norm(dim=-1), torch.ones(2, 10), atol=1e-5)


def test_euclidean_vq_picks_the_nearest_code():
    vq = VectorQuantizer(dim=4, codebook_size=16, use_l2_norm=False)
    z = torch.randn(3, 5, 4)
    out = vq(z)
    dist = torch.cdist(z.reshape(-1, 4), vq.embedding.weight)
    assert torch.equal(out.indices.reshape(-1), dist.argmin(-1))
    assert torch.equal(out.codes, vq.indices_to_codes(out.indices))


def test_straight_through_gradient_reaches_input_and_losses_reach_codebook():
    vq = VectorQuantizer(dim=4, codebook_size=16, use_l2_norm=False, commitment_weight=0.25)
    z = torch.randn(2, 6, 4, requires_grad=True)
    out = vq(z)
    out.codes.sum().backward(retain_graph=True)
    assert torch.allclose(z.grad, torch.ones_like(z))  # identity gradient through the quantizer
    z.grad = None
    sum(out.losses.values()).backward()
    assert vq.embedding.weight.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0
    expected_commit = 0.25 * F.mse_loss(z, vq.indices_to_codes(out.indices))
    assert torch.allclose(out.losses["commitment"], expected_commit)


def test_indices_do_not_depend_on_bf16_autocast():
    vq = VectorQuantizer(dim=12, codebook_size=4096, use_l2_norm=True)
    z = torch.randn(4, 64, 12)
    ref = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = vq(z.bfloat16())
    # bf16 input rounding aside, the search itself runs in fp32: same input -> same indices.
    assert torch.equal(vq(z.bfloat16().float()).indices, low.indices)
    assert low.codes.dtype == torch.bfloat16
    assert (ref.indices == low.indices).float().mean() > 0.95


def test_metrics_report_usage_and_perplexity():
    vq = VectorQuantizer(dim=2, codebook_size=4, use_l2_norm=False)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]]))
    z = torch.tensor([[[1.0, 0.1], [-1.0, 0.0], [0.9, 0.0], [-0.8, 0.1]]])
    out = vq(z)
    assert out.indices.tolist() == [[0, 1, 0, 1]]
    assert float(out.metrics["usage"]) == 0.5
    assert abs(float(out.metrics["perplexity"]) - 2.0) < 1e-5


def test_wrong_latent_shape_is_refused():
    vq = VectorQuantizer(dim=8, codebook_size=16)
    try:
        vq(torch.randn(2, 5, 7))
    except ValueError as e:
        assert "[B, N, 8]" in str(e) and "(2, 5, 7)" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_dead_codes_are_reseeded_from_the_batch_after_patience_steps():
    vq = VectorQuantizer(dim=4, codebook_size=8, use_l2_norm=False, dead_code_patience=3).train()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.eye(8, 4) * 10)  # codes 4..7 are all-zero: far from the data
    z = torch.randn(2, 16, 4) * 0.1 + 10 * torch.eye(4)[torch.arange(32) % 4].view(2, 16, 4)
    for _ in range(3):
        out = vq(z)
        assert set(out.indices.unique().tolist()) == {0, 1, 2, 3}
    assert vq.steps_unused.tolist() == [0, 0, 0, 0, 3, 3, 3, 3]
    out = vq(z)  # step 4: codes 4..7 are re-seeded with latents of this batch before the search
    assert float(out.metrics["reseeded_codes"]) == 4
    flat = z.reshape(-1, 4)
    for code in vq.embedding.weight[4:]:
        assert (flat - code).abs().sum(-1).min() == 0  # each new code is one of the batch latents
    vq.eval()
    before = vq.embedding.weight.clone()
    vq(torch.randn(1, 4, 4))
    assert torch.equal(before, vq.embedding.weight)  # evaluation never touches the codebook


# ---------------------------------------------------------------- parity with vector-quantize-pytorch

vqp = pytest.importorskip("vector_quantize_pytorch")


def _oracle_vq(dim: int, codebook_size: int, cosine: bool, **kwargs):
    torch.manual_seed(0)
    return vqp.VectorQuantize(dim=dim, codebook_size=codebook_size, use_cosine_sim=cosine, **kwargs)


def _copy_codebook(ours: VectorQuantizer, oracle) -> None:
    """Give both the same codebook, drawn at the latents' scale (the constructors' tiny
    uniform(-1/K, 1/K) init makes every code nearly equidistant, i.e. rounding-level ties)."""
    with torch.no_grad():
        codebook = torch.randn(oracle._codebook.embed.shape, generator=torch.Generator().manual_seed(11))
        if ours.use_l2_norm:  # the oracle's cosine codebook stores unit vectors
            codebook = F.normalize(codebook, dim=-1)
        oracle._codebook.embed.copy_(codebook)
        ours.code_vectors.copy_(oracle._codebook.embed[0])
        if ours.uses_ema:
            ours.ema_code_sum.copy_(oracle._codebook.embed_avg[0])
            ours.ema_cluster_size.copy_(oracle._codebook.cluster_size[0])


@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
@pytest.mark.parametrize("codebook_size", [512, 4096])
def test_nearest_code_indices_match_vector_quantize_pytorch(cosine, codebook_size):
    oracle = _oracle_vq(16, codebook_size, cosine).eval()
    ours = VectorQuantizer(dim=16, codebook_size=codebook_size, use_l2_norm=cosine).eval()
    _copy_codebook(ours, oracle)
    z = torch.randn(4, 256, 16, generator=torch.Generator().manual_seed(1))
    ref_codes, ref_indices, _ = oracle(z)
    out = ours(z)
    assert torch.equal(out.indices, ref_indices.long())
    assert torch.allclose(out.codes, ref_codes, atol=1e-5)
    assert torch.equal(ours.indices_to_codes(out.indices), out.codes)


def test_one_ema_step_matches_vector_quantize_pytorch():
    oracle = _oracle_vq(8, 64, cosine=False, decay=0.9, rotation_trick=False).train()
    ours = VectorQuantizer(dim=8, codebook_size=64, use_l2_norm=False, ema_decay=0.9).train()
    _copy_codebook(ours, oracle)
    before = ours.code_vectors.clone()
    z = torch.randn(2, 128, 8, generator=torch.Generator().manual_seed(2))
    _, ref_indices, _ = oracle(z)
    out = ours(z)
    assert (ours.code_vectors - before).abs().max() > 0.1  # the step moved the codes
    assert torch.equal(out.indices, ref_indices.long())
    assert torch.allclose(ours.ema_cluster_size, oracle._codebook.cluster_size[0], atol=1e-6)
    assert torch.allclose(ours.ema_code_sum, oracle._codebook.embed_avg[0], atol=1e-6)
    assert torch.allclose(ours.code_vectors, oracle._codebook.embed[0], atol=1e-5)


def test_rotation_trick_gradient_matches_vector_quantize_pytorch():
    # train mode (the oracle returns no gradient in eval) with its codebook frozen
    oracle = _oracle_vq(8, 32, cosine=False, rotation_trick=True, freeze_codebook=True).train()
    ours = VectorQuantizer(dim=8, codebook_size=32, use_l2_norm=False, rotation_trick=True).eval()
    _copy_codebook(ours, oracle)
    upstream = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(3))
    z_ref = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    z_ours = z_ref.detach().clone().requires_grad_(True)
    (oracle(z_ref)[0] * upstream).sum().backward()
    out = ours(z_ours)
    (out.codes * upstream).sum().backward()
    assert torch.equal(out.codes, ours.indices_to_codes(out.indices))  # forward is the exact code
    assert torch.allclose(z_ours.grad, z_ref.grad, atol=1e-5)
    assert not torch.allclose(z_ours.grad, upstream, atol=1e-3)  # not the straight-through gradient


# ---------------------------------------------------------------- options

def test_rotation_trick_gradient_is_the_rotated_and_rescaled_upstream_gradient():
    torch.manual_seed(5)
    vq = VectorQuantizer(dim=6, codebook_size=16, use_l2_norm=False, rotation_trick=True).eval()
    z = torch.randn(1, 1, 6, requires_grad=True)
    g = torch.randn(1, 1, 6)
    out = vq(z)
    (out.codes * g).sum().backward()
    q = out.codes.detach().reshape(6)
    e, qh = F.normalize(z.detach().reshape(6), dim=0), F.normalize(q, dim=0)
    r = F.normalize(e + qh, dim=0)
    rotation = torch.eye(6) - 2 * torch.outer(r, r) + 2 * torch.outer(qh, e)
    assert torch.allclose(rotation @ e, qh, atol=1e-6)  # maps z's direction onto the code's
    assert torch.allclose(rotation.t() @ rotation, torch.eye(6), atol=1e-5)  # and is orthogonal
    scale = q.norm() / z.detach().norm()
    assert torch.allclose(z.grad.reshape(6), scale * rotation.t() @ g.reshape(6), atol=1e-5)


@pytest.mark.parametrize("use_l2_norm", [False, True])
def test_low_dimensional_codebook_projects_in_and_out_and_round_trips(use_l2_norm):
    vq = VectorQuantizer(dim=32, codebook_size=128, codebook_dim=4, use_l2_norm=use_l2_norm)
    assert vq.code_vectors.shape == (128, 4)
    z = torch.randn(2, 10, 32, requires_grad=True)
    out = vq(z)
    assert out.codes.shape == (2, 10, 32)
    vq.eval()
    out = vq(z)
    assert torch.equal(vq.indices_to_codes(out.indices), out.codes)
    (out.codes.sum() + sum(out.losses.values())).backward()
    assert z.grad.abs().sum() > 0
    assert vq.project_in.weight.grad.abs().sum() > 0 and vq.project_out.weight.grad.abs().sum() > 0


def test_ema_codebook_is_a_buffer_and_converges_to_cluster_means():
    torch.manual_seed(6)
    centres = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0], [-4.0, 0, 0]])
    vq = VectorQuantizer(dim=3, codebook_size=4, use_l2_norm=False, ema_decay=0.8).train()
    assert not any(p.numel() for p in vq.parameters())  # nothing for an optimizer to update
    with torch.no_grad():
        vq._set_codes(slice(None), centres + 0.5)  # start near, not at, the centres
    for _ in range(60):
        z = centres[torch.randint(0, 4, (256,))] + 0.1 * torch.randn(256, 3)
        out = vq(z[None])
    assert set(out.losses) == {"commitment"}  # EMA replaces the codebook loss
    assert torch.allclose(vq.code_vectors, centres, atol=0.05)
    vq.eval()
    before = vq.code_vectors.clone()
    vq(torch.randn(1, 8, 3))
    assert torch.equal(before, vq.code_vectors)  # evaluation never updates the EMA


def _distortion(vq: VectorQuantizer, z: torch.Tensor) -> float:
    with torch.no_grad():
        return float((vq.eval()(z).codes - vq.project_in(z)).pow(2).sum(-1).mean())


@pytest.mark.parametrize("use_l2_norm", [False, True])
def test_kmeans_init_reaches_a_lloyd_fixed_point_once(use_l2_norm):
    torch.manual_seed(7)
    centres = torch.randn(16, 8) * 3
    z = (centres[torch.randint(0, 16, (1024,))] + 0.3 * torch.randn(1024, 8))[None]
    if use_l2_norm:
        z = F.normalize(z, dim=-1)
    picks_only = VectorQuantizer(dim=8, codebook_size=16, use_l2_norm=use_l2_norm, kmeans_init=True, kmeans_iters=0)
    vq = VectorQuantizer(dim=8, codebook_size=16, use_l2_norm=use_l2_norm, kmeans_init=True, kmeans_iters=30)
    random_init = VectorQuantizer(dim=8, codebook_size=16, use_l2_norm=use_l2_norm)
    vq.eval()(z)
    assert not bool(vq.kmeans_done)  # evaluation does not initialise
    torch.manual_seed(8)
    picks_only.train()(z)
    torch.manual_seed(8)
    vq.train()(z)
    assert bool(vq.kmeans_done)
    # Lloyd fixed point: every code is the (normalised) mean of the latents assigned to it.
    codebook, flat = vq.codebook(), z.reshape(-1, 8)
    indices = vq.nearest_indices(flat, codebook)
    for k in indices.unique():
        mean = flat[indices == k].mean(0)
        assert torch.allclose(codebook[k], F.normalize(mean, dim=0) if use_l2_norm else mean, atol=1e-4)
    # and it beats both the seeding picks it started from and the random init.
    assert _distortion(vq, z) < 0.8 * _distortion(picks_only, z)
    assert _distortion(vq, z) < 0.25 * _distortion(random_init, z)
    after_init = vq.code_vectors.clone()
    vq.train()(z + 1.0)  # a second training step does not re-run k-means
    assert torch.equal(after_init, vq.code_vectors)
    assert bool(vq.state_dict()["kmeans_done"])  # nor does a run resumed from a checkpoint


def test_histogram_metrics_can_be_switched_off_without_changing_the_step():
    from tokenmill.quantizers import ResidualQuantizer, quantizer_metrics

    torch.manual_seed(9)
    rq = ResidualQuantizer(VectorQuantizer(dim=4, codebook_size=16, use_l2_norm=False, ema_decay=0.9), 2)
    twin = ResidualQuantizer(VectorQuantizer(dim=4, codebook_size=16, use_l2_norm=False, ema_decay=0.9), 2)
    twin.load_state_dict(rq.state_dict())
    z = torch.randn(2, 8, 4)
    with quantizer_metrics(rq, enabled=False):
        quiet = rq.train()(z)
    loud = twin.train()(z)
    assert "stage0/usage" in loud.metrics and not any("usage" in k for k in quiet.metrics)
    assert torch.equal(quiet.codes, loud.codes) and torch.equal(quiet.indices, loud.indices)
    assert all(torch.equal(rq.state_dict()[k], v) for k, v in twin.state_dict().items())  # same EMA step
    assert all(stage.compute_metrics for stage in rq.stages)  # restored after the block
