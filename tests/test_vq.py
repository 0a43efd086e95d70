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
