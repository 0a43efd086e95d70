"""TokenBudget: exact tail drop, draws that are rank- and resume-exact, and prefix decoding."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from tokenmill.budget import TokenBudget, powers_of_two_up_to
from tokenmill.export import build_model
from tokenmill.tokenizers import Autoencoder

from .conftest import tiny_autoencoder_config
from .distributed import run_ranks

K, DIM = 12, 4
# distribution -> (constructor kwargs, the support its draws must lie in)
DISTRIBUTIONS = {
    "uniform": (dict(distribution="uniform", min_tokens=3), list(range(3, K + 1))),
    "pow2": (dict(distribution="pow2"), [1, 2, 4, 8, 12]),  # 12 is not a power of two: appended
    "list": (dict(distribution="list", values=[2, 5, 5, 11]), [2, 5, 11]),
}


def _budget(**kwargs) -> TokenBudget:
    budget = TokenBudget(**{"max_tokens": K, "dim": DIM, **kwargs})
    with torch.no_grad():  # a mask token no input value can be confused with
        budget.mask_token.fill_(100.0)
    return budget


def _kept_counts(out: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """How many leading positions of each sample are not the mask token."""
    is_mask = (out == mask_token).all(-1)  # [B, K]
    return (~is_mask).sum(1)


def _assert_exact_prefix(tokens, out, keep, mask_token) -> None:
    for b, k in enumerate(keep.tolist()):
        assert torch.equal(out[b, :k], tokens[b, :k]), f"sample {b}: a kept position changed (k={k})"
        assert torch.equal(out[b, k:], mask_token.expand(K - k, DIM)), f"sample {b}: a dropped one survived"


# ------------------------------------------------------------------------------ tail drop


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_training_keeps_exactly_k_tokens_per_sample(name):
    kwargs, support = DISTRIBUTIONS[name]
    budget = _budget(**kwargs).train()
    assert budget.support.tolist() == support
    drawn = set()
    for _ in range(40):
        tokens = torch.randn(6, K, DIM)
        keep = copy.deepcopy(budget).sample(6)  # the draw the next call will make
        out = budget(tokens)
        _assert_exact_prefix(tokens, out, keep, budget.mask_token.detach())
        assert torch.equal(_kept_counts(out, budget.mask_token), keep)
        drawn |= set(keep.tolist())
    assert drawn <= set(support) and len(drawn) > 1, drawn
    assert int(budget.num_draws) == 40


def test_powers_of_two_support():
    assert powers_of_two_up_to(1) == [1]
    assert powers_of_two_up_to(16) == [1, 2, 4, 8, 16]
    assert powers_of_two_up_to(12) == [1, 2, 4, 8, 12]
    assert TokenBudget(12, DIM, distribution="pow2", min_tokens=3).support.tolist() == [4, 8, 12]


def test_per_batch_draw_gives_one_k_to_the_whole_batch():
    budget = _budget(per_sample=False).train()
    ks = []
    for _ in range(30):
        out = budget(torch.randn(5, K, DIM))
        kept = _kept_counts(out, budget.mask_token)
        assert (kept == kept[0]).all(), kept
        ks.append(int(kept[0]))
    assert len(set(ks)) > 1  # but it changes from call to call


def test_keep_all_prob_one_keeps_everything():
    budget = _budget(keep_all_prob=1.0).train()
    for _ in range(10):
        tokens = torch.randn(4, K, DIM)
        assert torch.equal(budget(tokens), tokens)
    assert budget.sample(8).tolist() == [K] * 8


def test_eval_without_num_tokens_is_the_identity_and_draws_nothing():
    budget = _budget().eval()
    tokens = torch.randn(3, K, DIM)
    assert torch.equal(budget(tokens), tokens)
    assert int(budget.num_draws) == 0
    # an explicit num_tokens applies in both modes, without drawing
    for mode in (False, True):
        budget.train(mode)
        out = budget(tokens, num_tokens=5)
        _assert_exact_prefix(tokens, out, torch.full((3,), 5), budget.mask_token.detach())
    assert int(budget.num_draws) == 0
    assert torch.equal(budget(tokens, num_tokens=K), tokens)


def test_out_of_range_budgets_and_wrong_shapes_are_refused():
    budget = _budget()
    tokens = torch.randn(2, K, DIM)
    for bad in (0, K + 1, -1):
        with pytest.raises(ValueError, match=rf"num_tokens must be in 1\.\.{K}, got {bad}"):
            budget(tokens, num_tokens=bad)
    with pytest.raises(ValueError, match=rf"expects tokens \[B, {K}, {DIM}\], got \(2, {K - 1}, {DIM}\)"):
        budget(torch.randn(2, K - 1, DIM), num_tokens=3)
    with pytest.raises(ValueError, match=rf"expects tokens \[B, {K}, {DIM}\], got \(2, {K}, {DIM + 1}\)"):
        budget.train()(torch.randn(2, K, DIM + 1))
    with pytest.raises(ValueError, match="distribution must be one of"):
        TokenBudget(K, DIM, distribution="exponential")
    with pytest.raises(ValueError, match=rf"need 1 <= min_tokens <= max_tokens, got {K + 1}, {K}"):
        TokenBudget(K, DIM, min_tokens=K + 1)
    with pytest.raises(ValueError, match=rf"'list' needs values in 1\.\.{K}, got \[0, 3\]"):
        TokenBudget(K, DIM, distribution="list", values=[0, 3])
    with pytest.raises(ValueError, match="'list' needs values"):
        TokenBudget(K, DIM, distribution="list")


# ------------------------------------------------------------------------------ draws


def test_draws_resume_exactly_from_the_state_dict():
    budget = _budget(seed=7).train()
    for _ in range(5):
        budget(torch.randn(4, K, DIM))
    state = copy.deepcopy(budget.state_dict())
    assert int(state["num_draws"]) == 5
    assert "support" not in state  # derived from the config, not saved
    expected = [budget.sample(4) for _ in range(6)]

    resumed = TokenBudget(K, DIM, seed=7)
    resumed.load_state_dict(state)
    torch.manual_seed(12345)  # the global RNG plays no part
    assert all(torch.equal(resumed.sample(4), e) for e in expected)
    # ... while a fresh module would repeat the first draws instead: the saved counter matters
    fresh = TokenBudget(K, DIM, seed=7)
    assert not all(torch.equal(fresh.sample(4), e) for e in expected)
    # and another seed gives another sequence
    other = TokenBudget(K, DIM, seed=8)
    other.load_state_dict(state)
    assert not all(torch.equal(other.sample(4), e) for e in expected)


def _rank_draws(rank: int, per_sample: bool) -> torch.Tensor:
    budget = TokenBudget(16, 4, seed=3, per_sample=per_sample).train()
    with torch.no_grad():
        budget.mask_token.fill_(100.0)
    kept = []
    for step in range(8):
        data = torch.Generator().manual_seed(1000 * rank + step)  # different data on every rank
        out = budget(torch.randn(4, 16, 4, generator=data))
        kept.append(_kept_counts(out, budget.mask_token.detach()))
    return torch.stack(kept)


def _rank_draws_worker(rank: int, world_size: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.manual_seed(100 + rank)  # different global streams, as on real ranks
    result = {}
    for per_sample in (True, False):
        kept = _rank_draws(rank, per_sample)
        gathered = [torch.empty_like(kept) for _ in range(world_size)]
        dist.all_gather(gathered, kept)  # (only to compare here: the draws themselves need none)
        result[per_sample] = {"kept": kept, "gathered": gathered}
    torch.save(result, f"{out_dir}/rank{rank}.pt")


@pytest.mark.distributed
def test_ranks_draw_the_same_budgets_without_collectives(tmp_path):
    run_ranks(_rank_draws_worker, tmp_path, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for per_sample in (True, False):
        kept = r0[per_sample]["kept"]
        assert kept.shape == (8, 4)
        assert torch.equal(kept, r1[per_sample]["kept"]), per_sample
        assert torch.equal(r0[per_sample]["gathered"][1], kept)  # rank 0 saw rank 1's sequence too
        assert len(set(kept.flatten().tolist())) > 1  # the sequence really varies
        # and it is what a single process with the same seed draws
        alone = TokenBudget(16, 4, seed=3, per_sample=per_sample)
        assert torch.equal(torch.stack([alone.sample(4) for _ in range(8)]), kept)
    assert (r0[False]["kept"] == r0[False]["kept"][:, :1]).all()  # one k per batch


# ------------------------------------------------------------------------------ gradients, statistics


def test_mask_token_gets_gradient_only_from_dropped_positions():
    budget = _budget()
    tokens = torch.randn(3, K, DIM, requires_grad=True)
    keep = torch.tensor([2, 7, K])
    weights = torch.randn(3, K, DIM)
    (budget.apply(tokens, keep) * weights).sum().backward()
    dropped = torch.arange(K)[None, :] >= keep[:, None]  # [B, K]
    assert torch.allclose(budget.mask_token.grad, (weights * dropped[..., None]).sum((0, 1)))
    assert torch.equal(tokens.grad, weights * ~dropped[..., None])

    budget.mask_token.grad = None
    (budget.apply(tokens, K) * weights).sum().backward()  # nothing dropped
    assert budget.mask_token.grad is None or not budget.mask_token.grad.any()


def _chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_draws_are_uniform_over_the_support(name):
    kwargs, support = DISTRIBUTIONS[name]
    budget = TokenBudget(K, DIM, seed=11, **kwargs)
    draws = torch.cat([budget.sample(16) for _ in range(500)])  # 8000 draws
    counts = torch.stack([(draws == v).sum() for v in support]).double()
    assert int(counts.sum()) == len(draws)  # nothing outside the support
    # chi-square with len(support) - 1 <= 9 degrees of freedom: 40 is far in the tail (p < 1e-5)
    assert _chi_square(counts) < 40, dict(zip(support, counts.tolist(), strict=True))


def test_per_batch_draws_and_keep_all_prob_have_the_stated_frequencies():
    per_batch = TokenBudget(K, DIM, seed=5, per_sample=False)
    draws = torch.stack([per_batch.sample(3)[0] for _ in range(3000)])
    counts = torch.stack([(draws == v).sum() for v in range(1, K + 1)]).double()
    assert _chi_square(counts) < 40, counts.tolist()

    keep_all = TokenBudget(K, DIM, seed=5, keep_all_prob=0.25)
    draws = torch.cat([keep_all.sample(16) for _ in range(500)])
    expected = 0.25 + 0.75 / K  # kept whole, or drew K anyway
    assert abs(float((draws == K).double().mean()) - expected) < 0.02


# ------------------------------------------------------------------------------ autoencoder


def _tiny_titok_with_budget(max_tokens: int = 8, **budget_kwargs) -> Autoencoder:
    cfg = tiny_autoencoder_config(tokens=8, token_dim=8)
    cfg.budget = OmegaConf.create(
        {"_target_": "tokenmill.budget.TokenBudget", "max_tokens": max_tokens, "dim": 8, **budget_kwargs}
    )
    return build_model(cfg)


def test_autoencoder_decodes_every_prefix():
    net = _tiny_titok_with_budget().eval()
    with torch.no_grad():
        net.budget.mask_token.normal_()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        q = net.encode(images)
        full = net.decode(q.codes)
        recs = {}
        for k in range(1, net.max_tokens + 1):
            recs[k] = net.decode(q.codes, num_tokens=k)
            assert recs[k].shape == images.shape and torch.isfinite(recs[k]).all()
            assert torch.equal(recs[k], net.decode(net.budget.apply(q.codes, k)))
            assert torch.equal(net.decode_indices(q.indices, num_tokens=k), recs[k])
            assert torch.equal(net.reconstruct(images, num_tokens=k), recs[k])
            # the tail beyond k plays no part
            scrambled = torch.cat([q.codes[:, :k], torch.randn_like(q.codes[:, k:])], dim=1)
            assert torch.equal(net.decode(scrambled, num_tokens=k), recs[k])
    assert torch.equal(recs[net.max_tokens], full)
    assert not torch.allclose(recs[1], recs[net.max_tokens], atol=1e-4)
    assert net.budget.eval_budgets() == [1, 2, 4, 8]
    assert int(net.budget.num_draws) == 0  # evaluation never draws


def test_autoencoder_training_forward_drops_tails_and_backpropagates_to_the_mask_token():
    net = _tiny_titok_with_budget(per_sample=False, seed=1).train()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    keeps = [copy.deepcopy(net.budget).sample(4)[0].item()]
    out = net(images)
    assert int(net.budget.num_draws) == 1
    out.reconstruction.square().mean().backward()
    grad = net.budget.mask_token.grad
    assert (grad is not None and grad.abs().sum() > 0) == (keeps[0] < net.max_tokens)
    # the training forward decodes exactly what decode(codes, num_tokens=k) gives for that k
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net.decode(out.codes, num_tokens=keeps[0]), out.reconstruction, atol=1e-5)


def test_autoencoder_refuses_a_budget_of_the_wrong_length_and_budgets_without_one():
    net = build_model(tiny_autoencoder_config(tokens=8, token_dim=8)).eval()
    with pytest.raises(ValueError, match="budget.max_tokens=6 but the encoder emits 8 tokens"):
        Autoencoder(net.encoder, net.decoder, quantizer=net.quantizer, budget=TokenBudget(6, 8))
    with pytest.raises(Exception, match="budget.max_tokens=16 but the encoder emits 8 tokens"):
        _tiny_titok_with_budget(max_tokens=16)  # the same from config (Hydra wraps the ValueError)
    codes = net.encode(torch.rand(1, 3, 32, 32) * 2 - 1).codes
    with pytest.raises(ValueError, match="no token budget"):
        net.decode(codes, num_tokens=4)
    assert torch.equal(net.decode(codes, num_tokens=8), net.decode(codes))
    with pytest.raises(ValueError, match=r"num_tokens must be in 1\.\.8, got 9"):
        _tiny_titok_with_budget().eval().decode(codes, num_tokens=9)
