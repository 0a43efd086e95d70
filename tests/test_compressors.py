"""Compressors: shapes at the papers' settings, exact values, nesting, locality, seeded budgets, errors."""

from __future__ import annotations

import pytest
import torch

from tokenmill.compressors.base import VisionFeatures
from tokenmill.compressors.baselines import AveragePooling, ClsAttentionTopK, DivPrune, max_min_diverse
from tokenmill.compressors.m3 import MatryoshkaPooling, pool_to_tokens
from tokenmill.compressors.mqt import MatryoshkaQueryTransformer
from tokenmill.compressors.posemb import resize_pos_embed, sincos_1d, sincos_2d
from tokenmill.compressors.projector import LinearProjector, MLPProjector, build_projector
from tokenmill.compressors.tokenpacker import TokenPacker

# CLIP ViT-L/14 at 336 px, LLaVA-1.5's tower: 24x24 = 576 patches of width 1024.
CLIP_L_DIM, CLIP_L_GRID = 1024, (24, 24)
# TokenPacker's multi-level input: hidden states 12, 16, 22 plus the selected layer (23, LLaVA's -2).
TOKENPACKER_LAYERS = [12, 16, 22]


def features(b=1, d=CLIP_L_DIM, grid=CLIP_L_GRID, layers=(), cls_attention=False) -> VisionFeatures:
    n = grid[0] * grid[1]
    return VisionFeatures(
        patches=torch.randn(b, n, d),
        grid=grid,
        layers={i: torch.randn(b, n, d) for i in layers},
        cls_attention=torch.rand(b, n).softmax(-1) if cls_attention else None,
    )


def block_means(patches: torch.Tensor, grid, side: int) -> torch.Tensor:
    """Reference: mean over each (h/side x w/side) block, row-major, by explicit slicing."""
    b, _, d = patches.shape
    h, w = grid
    x = patches.reshape(b, h, w, d)
    bh, bw = h // side, w // side
    return torch.stack(
        [x[:, i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].mean(dim=(1, 2)) for i in range(side) for j in range(side)],
        dim=1,
    )


# --- positional embeddings -------------------------------------------------------------------


def test_sincos_2d_is_row_major_and_resizes():
    h, w, d = 3, 5, 16
    pos = sincos_2d((h, w), d)
    assert pos.shape == (h * w, d)
    rows, cols = sincos_1d(torch.arange(h), d // 2), sincos_1d(torch.arange(w), d // 2)
    for r in range(h):
        for c in range(w):
            torch.testing.assert_close(pos[r * w + c], torch.cat([rows[r], cols[c]]))
    assert resize_pos_embed(pos, (h, w), (h, w)) is pos
    assert resize_pos_embed(pos, (h, w), (6, 10)).shape == (60, d)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d((2, 2), 6)


# --- MQT ----------------------------------------------------------------------------------------


def test_mqt_shapes_and_prefix_nesting_at_mqt_llava_setting():
    # MQT-LLaVA: 256 queries over CLIP-L's 576 features; query width 1024 (the projector maps to the
    # LM), 8 heads of 128 (Qwen-VL's head width), one layer.
    torch.manual_seed(0)
    mqt = MatryoshkaQueryTransformer(CLIP_L_DIM, 1024, num_queries=256, num_heads=8, grid=CLIP_L_GRID).eval()
    feats = features()
    assert mqt.supported_num_tokens == list(range(1, 257)) and mqt.max_tokens == 256
    with torch.no_grad():
        full = mqt(feats).tokens
        assert full.shape == (1, 256, 1024)
        for m in (1, 16, 64, 256):
            out = mqt(feats, num_tokens=m).tokens
            assert out.shape == (1, m, 1024)
            torch.testing.assert_close(out, full[:, :m], atol=1e-5, rtol=1e-5)


def test_mqt_causal_query_self_attention_keeps_prefixes_exact():
    torch.manual_seed(0)
    mqt = MatryoshkaQueryTransformer(32, 64, num_queries=12, num_heads=4, depth=2, grid=(4, 4),
                                     query_self_attention=True, mlp_ratio=2.0).eval()
    feats = features(b=2, d=32, grid=(4, 4))
    with torch.no_grad():
        full = mqt(feats).tokens
        for m in (1, 5, 12):
            torch.testing.assert_close(mqt(feats, m).tokens, full[:, :m], atol=1e-5, rtol=1e-5)
        # Causal, not absent: changing query 0 moves later outputs; changing query 5 leaves 0..4.
        # (Random, not constant, shifts: LayerNorm would cancel a constant.)
        original = mqt.query.clone()
        mqt.query[0] += torch.randn(64)
        moved = mqt(feats).tokens
        assert (moved[:, 5] - full[:, 5]).abs().max() > 1e-3
        mqt.query.copy_(original)
        mqt.query[5] += torch.randn(64)
        moved = mqt(feats).tokens
        torch.testing.assert_close(moved[:, :5], full[:, :5], atol=1e-5, rtol=1e-5)
        assert (moved[:, 5] - full[:, 5]).abs().max() > 1e-3


def test_mqt_gradient_reaches_used_queries_only():
    mqt = MatryoshkaQueryTransformer(16, 32, num_queries=8, num_heads=2, grid=(4, 4), budget={"seed": 3})
    m = mqt.training_budgets()[0]
    mqt(features(b=2, d=16, grid=(4, 4)), m).tokens.square().mean().backward()
    grad = mqt.query.grad
    assert grad[:m].abs().sum(-1).gt(0).all()
    assert grad[m:].abs().sum() == 0
    assert mqt.kv_proj.weight.grad.abs().sum() > 0


def test_mqt_draws_are_seeded_and_resume_exact():
    def make(seed=7):
        return MatryoshkaQueryTransformer(16, 16, num_queries=64, num_heads=2, grid=(4, 4),
                                          budget={"distribution": "uniform", "seed": seed})

    a, b = make(), make()
    draws_a = [a.training_budgets() for _ in range(20)]
    assert draws_a == [b.training_budgets() for _ in range(20)]  # rank-identical
    assert all(len(d) == 1 and 1 <= d[0] <= 64 for d in draws_a)
    assert len({d[0] for d in draws_a}) > 5
    assert draws_a != [make(seed=8).training_budgets() for _ in range(20)]
    # Resume: a fresh instance loading the state dict continues a's sequence.
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert int(state["budget.num_draws"]) == 20
    resumed = make()
    resumed.load_state_dict(state)
    assert [resumed.training_budgets() for _ in range(10)] == [a.training_budgets() for _ in range(10)]


@pytest.mark.parametrize(
    ("budget", "support"),
    [
        ({"distribution": "pow2"}, {1, 2, 4, 8, 16}),
        ({"distribution": "list", "values": [4, 8]}, {4, 8}),
        ({"distribution": "uniform", "min_tokens": 12}, set(range(12, 17))),
    ],
)
def test_mqt_draws_follow_the_configured_support(budget, support):
    mqt = MatryoshkaQueryTransformer(8, 16, num_queries=16, num_heads=2, grid=(2, 2), budget=budget)
    draws = {mqt.training_budgets()[0] for _ in range(200)}
    assert draws == support


def test_mqt_other_grid_interpolates_key_positions():
    mqt = MatryoshkaQueryTransformer(16, 32, num_queries=4, num_heads=2, grid=(4, 4)).eval()
    assert mqt(features(d=16, grid=(6, 6)), 4).tokens.shape == (1, 4, 32)
    bad = VisionFeatures(patches=torch.randn(1, 15, 16), grid=(4, 4))
    with pytest.raises(ValueError, match="15 patches but grid"):
        mqt(bad)


def test_mqt_errors():
    mqt = MatryoshkaQueryTransformer(16, 32, num_queries=8, num_heads=2, grid=(4, 4))
    with pytest.raises(ValueError, match="expects vision features of width 16, got 24"):
        mqt(features(d=24, grid=(4, 4)))
    with pytest.raises(ValueError, match="cannot produce num_tokens=9"):
        mqt(features(d=16, grid=(4, 4)), 9)
    with pytest.raises(ValueError, match="unknown keys"):
        MatryoshkaQueryTransformer(16, 32, num_queries=8, budget={"per_sample": True})


# --- M3 and average pooling ---------------------------------------------------------------------


def test_m3_scales_values_and_nesting_at_paper_setting():
    m3 = MatryoshkaPooling(CLIP_L_DIM, CLIP_L_GRID, scales=[576, 144, 36, 9, 1])
    assert m3.out_dim == CLIP_L_DIM and m3.max_tokens == 576
    assert m3.training_budgets() == [576, 144, 36, 9, 1]
    assert m3.supported_num_tokens == [1, 9, 36, 144, 576]
    assert sum(p.numel() for p in m3.parameters()) == 0
    feats = features(b=2)
    out = {k: m3(feats, k).tokens for k in m3.scales}
    for k, side in ((144, 12), (36, 6), (9, 3), (1, 1)):  # 9 tokens: means of 8x8 blocks
        assert out[k].shape == (2, k, CLIP_L_DIM)
        torch.testing.assert_close(out[k], block_means(feats.patches, CLIP_L_GRID, side))
    torch.testing.assert_close(out[576], feats.patches)
    torch.testing.assert_close(out[1][:, 0], feats.patches.mean(1))
    # Nested: pooling the 144 scale further gives the coarser scales.
    torch.testing.assert_close(pool_to_tokens(out[144], (12, 12), 36), out[36])
    torch.testing.assert_close(pool_to_tokens(out[36], (6, 6), 9), out[9])


def test_m3_sample_mode_is_seeded_and_resume_exact():
    def make(seed=1):
        return MatryoshkaPooling(8, (24, 24), scales=[576, 144, 36, 9, 1], mode="sample", seed=seed)

    a, b = make(), make()
    draws = [a.training_budgets() for _ in range(40)]
    assert draws == [b.training_budgets() for _ in range(40)]
    assert {d[0] for d in draws} == {576, 144, 36, 9, 1} and all(len(d) == 1 for d in draws)
    resumed = make()
    resumed.load_state_dict(a.state_dict())
    assert [resumed.training_budgets() for _ in range(10)] == [a.training_budgets() for _ in range(10)]


def test_m3_refuses_bad_scales_and_budgets():
    with pytest.raises(ValueError, match="scale 10 is not a perfect square"):
        MatryoshkaPooling(8, (24, 24), scales=[576, 10])
    with pytest.raises(ValueError, match=r"scale 25 \(5x5\) does not divide the 24x24"):
        MatryoshkaPooling(8, (24, 24), scales=[576, 25])
    with pytest.raises(ValueError, match="mode must be"):
        MatryoshkaPooling(8, (24, 24), mode="every")
    m3 = MatryoshkaPooling(8, (24, 24), scales=[576, 144])
    with pytest.raises(ValueError, match="cannot produce num_tokens=36"):
        m3(features(d=8), 36)
    with pytest.raises(ValueError, match="built for grid"):
        m3(features(d=8, grid=(12, 12)), 144)


def test_average_pooling_baseline():
    pool = AveragePooling(CLIP_L_DIM, CLIP_L_GRID)
    assert pool.supported_num_tokens == [1, 4, 9, 16, 36, 64, 144, 576]
    feats = features(b=2)
    torch.testing.assert_close(pool(feats, 4).tokens, block_means(feats.patches, CLIP_L_GRID, 2))
    torch.testing.assert_close(pool(feats, 64).tokens, block_means(feats.patches, CLIP_L_GRID, 8))
    assert pool(feats).tokens.shape == (2, 576, CLIP_L_DIM)
    with pytest.raises(ValueError, match="cannot produce num_tokens=25"):
        pool(feats, 25)


# --- selection baselines --------------------------------------------------------------------------


def test_cls_attention_topk_keeps_top_indices_in_order():
    sel = ClsAttentionTopK(CLIP_L_DIM, 576)
    feats = features(b=2, cls_attention=True)
    for k in (1, 64, 576):
        out = sel(feats, k).tokens
        assert out.shape == (2, k, CLIP_L_DIM)
        for b in range(2):
            idx = sorted(feats.cls_attention[b].argsort(descending=True)[:k].tolist())
            torch.testing.assert_close(out[b], feats.patches[b, idx], rtol=0, atol=0)
    with pytest.raises(ValueError, match="with_cls_attention=True"):
        sel(features())
    with pytest.raises(ValueError, match="cannot produce num_tokens=577"):
        sel(feats, 577)


def reference_divprune(x: torch.Tensor, k: int) -> list[int]:
    """One sample, plain Python: the definition in `max_min_diverse`'s docstring."""
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    dist = 1 - unit @ unit.T
    n = x.shape[0]
    first = max(range(n), key=lambda i: (min(dist[i, j] for j in range(n) if j != i), -i))
    picks = [first]
    while len(picks) < k:
        rest = [i for i in range(n) if i not in picks]
        picks.append(max(rest, key=lambda i: (min(dist[i, j] for j in picks), -i)))
    return picks


def test_divprune_matches_the_greedy_definition_and_keeps_order():
    torch.manual_seed(0)
    x = torch.randn(3, 40, 8)
    picks = max_min_diverse(x, 10)
    for b in range(3):
        assert picks[b].tolist() == reference_divprune(x[b], 10)
    out = DivPrune(8, 40)(VisionFeatures(patches=x, grid=(5, 8)), 10).tokens
    for b in range(3):
        torch.testing.assert_close(out[b], x[b, sorted(picks[b].tolist())], rtol=0, atol=0)


def test_divprune_never_picks_duplicates_while_distinct_tokens_remain():
    torch.manual_seed(0)
    distinct = torch.randn(2, 20, CLIP_L_DIM)
    # 576 patches, each a copy (up to a positive scale: same direction) of one of 20 vectors.
    assign = torch.stack([torch.randperm(576) % 20 for _ in range(2)])
    patches = torch.stack([distinct[b, assign[b]] for b in range(2)]) * (1 + torch.rand(2, 576, 1))
    sel = DivPrune(CLIP_L_DIM, 576)
    feats = VisionFeatures(patches=patches, grid=CLIP_L_GRID)
    for k in (5, 20):
        picks = max_min_diverse(patches, k)
        for b in range(2):
            assert len(set(assign[b, picks[b]].tolist())) == k
        assert sel(feats, k).tokens.shape == (2, k, CLIP_L_DIM)


# --- TokenPacker ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "tokens"), [(2, 144), (4, 36)])
def test_tokenpacker_shapes_at_paper_setting(scale, tokens):
    packer = TokenPacker(CLIP_L_DIM, CLIP_L_DIM, CLIP_L_GRID, scale_factor=scale, layers=TOKENPACKER_LAYERS,
                         num_heads=8).eval()
    assert packer.num_levels == 4 and packer.supported_num_tokens == [tokens]
    with torch.no_grad():
        out = packer(features(layers=TOKENPACKER_LAYERS)).tokens
    assert out.shape == (1, tokens, CLIP_L_DIM)


@pytest.mark.parametrize("downsample", ["bilinear", "avg"])
@pytest.mark.parametrize("scale", [2, 4])
def test_tokenpacker_region_to_point_is_local(downsample, scale):
    torch.manual_seed(0)
    grid, d = (8, 8), 32
    packer = TokenPacker(d, 48, grid, scale_factor=scale, layers=[3, 5], num_heads=4,
                         query_downsample=downsample).eval()
    feats = features(b=2, d=d, grid=grid, layers=[3, 5])
    with torch.no_grad():
        base = packer(feats).tokens
    side = grid[1] // scale
    assert base.shape == (2, side * side, 48)
    r, c = 1, side - 1  # the region whose patches we perturb (row-major index r * side + c)
    region = [(r * scale + i) * grid[1] + c * scale + j for i in range(scale) for j in range(scale)]
    for level in ("all", 3):  # every level; or only an extra encoder layer (the levels are read)
        moved = VisionFeatures(feats.patches.clone(), grid, layers={k: v.clone() for k, v in feats.layers.items()})
        targets = [moved.patches, *moved.layers.values()] if level == "all" else [moved.layers[level]]
        for t in targets:
            t[0, region] += torch.randn(len(region), d)
        with torch.no_grad():
            out = packer(moved).tokens
        changed = (out - base).abs().amax(-1) > 1e-4
        expected = torch.zeros_like(changed)
        expected[0, r * side + c] = True
        assert torch.equal(changed, expected)
        torch.testing.assert_close(out[~expected], base[~expected], atol=1e-6, rtol=0)


def test_tokenpacker_errors():
    packer = TokenPacker(16, 16, (8, 8), scale_factor=2, layers=[12, 16], num_heads=2)
    with pytest.raises(ValueError, match=r"needs encoder layers \[16\].*extra_layers=\[12, 16\]"):
        packer(features(d=16, grid=(8, 8), layers=[12]))
    with pytest.raises(ValueError, match="expects vision features of width 16, got 8"):
        packer(features(d=8, grid=(8, 8), layers=[12, 16]))
    with pytest.raises(ValueError, match="cannot produce num_tokens=4"):
        packer(features(d=16, grid=(8, 8), layers=[12, 16]), 4)
    with pytest.raises(ValueError, match="scale_factor=3 must divide the 8x8 grid"):
        TokenPacker(16, 16, (8, 8), scale_factor=3)


# --- projector ---------------------------------------------------------------------------------------


def test_projector_layout_matches_llava():
    mlp = MLPProjector(CLIP_L_DIM, 4096)
    assert list(mlp.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert isinstance(mlp[1], torch.nn.GELU) and (mlp.in_dim, mlp.out_dim) == (1024, 4096)
    assert mlp(torch.randn(1, 3, CLIP_L_DIM)).shape == (1, 3, 4096)
    assert list(build_projector("mlp2x_gelu", 8, 16).state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(build_projector("mlp3x_gelu", 8, 16)) == 5
    linear = build_projector("linear", 8, 16)
    assert isinstance(linear, LinearProjector) and list(linear.state_dict()) == ["weight", "bias"]
    assert list(MLPProjector(8, 16, depth=1).state_dict()) == ["0.weight", "0.bias"]
    with pytest.raises(ValueError, match="unknown projector type"):
        build_projector("qformer", 8, 16)
    with pytest.raises(ValueError, match="activation must be one of"):
        MLPProjector(8, 16, activation="tanh")
