"""VoCo-LLaMA: the attention mask, the isolation property, compressed-cache decoding, tokens.

All on a tiny random Llama (hidden 64, 2 layers, 4 query / 2 key-value heads so the GQA paths
run too), on both the "sdpa" and the "eager" attention back-end of transformers 5.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from tokenmill.compressors.voco import (
    IMAGE,
    TEXT_AFTER,
    TEXT_BEFORE,
    VOCO,
    VoCo,
    VoCoCache,
    add_voco_tokens,
    check_attn_implementation,
    compress_cache,
    continue_from_cache,
    voco_attention_mask,
    voco_position_ids,
    voco_prefill,
)

IMPLS = ["sdpa", "eager"]
VOCAB = 100
HIDDEN = 64
N_VOCO = 3
VOCO_IDS = [97, 98, 99]  # stand in for the rows add_voco_tokens + resize_token_embeddings add
K_IMG = 4
PIX_DIM = 12


def tiny_llm(impl: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=impl,
    )
    model = LlamaForCausalLM(cfg).eval()
    assert model.config._attn_implementation == impl
    return model


@pytest.fixture(scope="module")
def projection() -> torch.nn.Linear:
    """A fixed "vision encoder + projector": pixels [K, PIX_DIM] -> image embeddings [K, HIDDEN]."""
    torch.manual_seed(1)
    return torch.nn.Linear(PIX_DIM, HIDDEN).eval()


def pixels(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K_IMG, PIX_DIM, generator=g)


def _pad_stack(parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """Right-pad [n_i, ...] tensors with zeros to [B, length, ...]."""
    out = parts[0].new_zeros((len(parts), length) + tuple(parts[0].shape[1:]))
    for i, p in enumerate(parts):
        out[i, : p.shape[0]] = p
    return out


def build_batch(model, proj, rows):
    """rows: list of (text_before_ids, pixels [K, PIX_DIM], text_after_ids).

    Returns the full right-padded sequences [before][image x K][VoCo x N][after] with their
    segments and attention mask, the same rows split into a prefix (before, image, VoCo) and a
    suffix (after), each right-padded, and the prefix lengths (= position of the first suffix
    token in the full sequence).
    """
    emb = model.get_input_embeddings()
    full, full_seg, pre, pre_seg, suf = [], [], [], [], []
    for before, pix, after in rows:
        e_before = emb(torch.tensor(before))
        e_img = proj(pix)
        e_voco = emb(torch.tensor(VOCO_IDS))
        e_after = emb(torch.tensor(after))
        s_prefix = torch.tensor([TEXT_BEFORE] * len(before) + [IMAGE] * K_IMG + [VOCO] * N_VOCO)
        pre.append(torch.cat([e_before, e_img, e_voco]))
        pre_seg.append(s_prefix)
        suf.append(e_after)
        full.append(torch.cat([pre[-1], e_after]))
        full_seg.append(torch.cat([s_prefix, torch.full((len(after),), TEXT_AFTER)]))

    def pack(embeds, segs=None):
        length = max(e.shape[0] for e in embeds)
        attn = _pad_stack([torch.ones(e.shape[0], dtype=torch.long) for e in embeds], length)
        out = {"embeds": _pad_stack(embeds, length), "attn": attn}
        if segs is not None:
            out["segments"] = _pad_stack(segs, length)
        return out

    return {
        "full": pack(full, full_seg),
        "prefix": pack(pre, pre_seg),
        "suffix": pack(suf),
        "prefix_len": [p.shape[0] for p in pre],
        "after_len": [len(r[2]) for r in rows],
    }


def full_forward(model, batch, voco_mask: bool = True) -> torch.Tensor:
    """Full-sequence logits, with the VoCo 4D mask or (control) with a plain causal 2D mask."""
    f = batch["full"]
    if voco_mask:
        mask = voco_attention_mask(f["segments"], f["attn"], dtype=f["embeds"].dtype)
    else:
        mask = f["attn"]
    return model(
        inputs_embeds=f["embeds"], attention_mask=mask, position_ids=voco_position_ids(f["attn"])
    ).logits


def after_logits(full_logits: torch.Tensor, batch, row: int) -> torch.Tensor:
    start = batch["prefix_len"][row]
    return full_logits[row, start : start + batch["after_len"][row]]


def clone_state(state: VoCoCache, image_from: VoCoCache | None = None, image_slots=None) -> VoCoCache:
    """Copy a VoCo cache; optionally take the keys/values at `image_slots` from another one."""
    data = []
    for layer, other in zip(state.cache.layers, (image_from or state).cache.layers, strict=True):
        k, v = layer.keys.clone(), layer.values.clone()
        if image_from is not None:
            k[:, :, image_slots] = other.keys[:, :, image_slots]
            v[:, :, image_slots] = other.values[:, :, image_slots]
        data.append((k, v))
    return VoCoCache(DynamicCache(ddp_cache_data=data), state.key_mask.clone(), state.next_position.clone())


# ---------------------------------------------------------------------------------------------
# 1. The mask itself
# ---------------------------------------------------------------------------------------------


def test_mask_allows_exactly_the_voco_pattern():
    T, Im, V, A = TEXT_BEFORE, IMAGE, VOCO, TEXT_AFTER
    segments = torch.tensor([[T, Im, Im, V, A, A], [T, T, Im, V, A, T]])  # last slot of row 1 is padding
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    mask = voco_attention_mask(segments, attn, dtype=torch.float32)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.float32
    neg = torch.finfo(torch.float32).min
    assert set(mask.unique().tolist()) == {0.0, neg}
    allowed = (mask[:, 0] == 0).int()

    expected0 = torch.tensor(
        [  # keys:  T  I  I  V  A  A
            [1, 0, 0, 0, 0, 0],  # T
            [1, 1, 0, 0, 0, 0],  # I
            [1, 1, 1, 0, 0, 0],  # I
            [1, 1, 1, 1, 0, 0],  # V sees the image
            [1, 0, 0, 1, 1, 0],  # A: text before + VoCo + itself, not the image
            [1, 0, 0, 1, 1, 1],  # A
        ]
    )
    expected1 = torch.tensor(
        [  # keys:  T  T  I  V  A  pad
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],  # padding query: only itself (no fully masked row); pad key hidden
        ]
    )
    assert torch.equal(allowed[0], expected0)
    assert torch.equal(allowed[1], expected1)
    assert bool((allowed.sum(-1) > 0).all())

    # The model's dtype is honoured (SDPA needs mask dtype == query dtype).
    half = voco_attention_mask(segments, attn, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half[:, 0] == 0, mask[:, 0] == 0)
    # Left padding: the padding key is hidden from every real query, positions skip it.
    left = voco_attention_mask(torch.tensor([[T, T, Im, V, A]]), torch.tensor([[0, 1, 1, 1, 1]]))
    assert bool((left[0, 0, 1:, 0] == neg).all()) and left[0, 0, 0, 0] == 0
    assert voco_position_ids(torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])).tolist() == [
        [0, 0, 1, 2, 3],
        [0, 1, 2, 2, 2],
    ]


def test_mask_validation():
    seg = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 5\), got \(2, 4\)"):
        voco_attention_mask(seg, torch.ones(2, 4))
    with pytest.raises(ValueError, match="must be 2D"):
        voco_attention_mask(seg[0])
    with pytest.raises(ValueError, match="values must be in"):
        voco_attention_mask(torch.full((1, 3), 7))
    with pytest.raises(ValueError, match="integer"):
        voco_attention_mask(seg.float())
    with pytest.raises(ValueError, match="floating point"):
        voco_attention_mask(seg, dtype=torch.long)
    with pytest.raises(ValueError, match="supported attn_implementation"):
        check_attn_implementation(SimpleNamespace(_attn_implementation="flash_attention_2"))
    assert check_attn_implementation(SimpleNamespace(_attn_implementation="sdpa")) == "sdpa"


# ---------------------------------------------------------------------------------------------
# 2. Isolation: with the VoCo states fixed, the pixels cannot reach the answer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@torch.no_grad()
def test_fixed_voco_states_isolate_answer_from_pixels(impl, projection):
    model = tiny_llm(impl)
    before, question_answer = [5, 6], [10, 11, 12, 13, 14]
    batch_a = build_batch(model, projection, [(before, pixels(1), question_answer)])
    batch_b = build_batch(model, projection, [(before, pixels(2), question_answer)])
    image_slots = torch.arange(len(before), len(before) + K_IMG)

    full_a = after_logits(full_forward(model, batch_a), batch_a, 0)
    full_b = after_logits(full_forward(model, batch_b), batch_b, 0)
    # Information flows through the VoCo tokens: new pixels, new VoCo states, new answer logits.
    assert (full_a - full_b).abs().max() > 1e-3

    p = batch_a["prefix"]
    state_a = voco_prefill(model, p["embeds"], p["segments"], p["attn"], compress=False)
    p = batch_b["prefix"]
    state_b = voco_prefill(model, p["embeds"], p["segments"], p["attn"], compress=False)
    voco_slots = torch.arange(len(before) + K_IMG, len(before) + K_IMG + N_VOCO)
    for depth, (la, lb) in enumerate(zip(state_a.cache.layers, state_b.cache.layers, strict=True)):
        assert (la.keys[:, :, image_slots] - lb.keys[:, :, image_slots]).abs().max() > 1e-3
        # The text before the image does not depend on the pixels (causality).
        assert torch.equal(la.keys[:, :, : len(before)], lb.keys[:, :, : len(before)])
        # Layer 0 key/values are projections of the VoCo embeddings alone; from layer 1 on they
        # carry what the VoCo tokens read from the image.
        voco_diff = (la.values[:, :, voco_slots] - lb.values[:, :, voco_slots]).abs().max()
        assert voco_diff == 0 if depth == 0 else voco_diff > 1e-4

    answer = batch_a["suffix"]["embeds"]
    logits_a = continue_from_cache(model, clone_state(state_a), inputs_embeds=answer)
    # Hybrid cache: text-before + VoCo key/values from image A, image key/values from image B.
    hybrid = clone_state(state_a, image_from=state_b, image_slots=image_slots)
    logits_hybrid = continue_from_cache(model, hybrid, inputs_embeds=answer)
    torch.testing.assert_close(logits_hybrid, logits_a, atol=1e-6, rtol=0)
    # ... and both equal the full-sequence forward of image A with the VoCo mask.
    torch.testing.assert_close(logits_a[0], full_a, atol=1e-5, rtol=1e-5)

    # The compressed cache has no image entries at all and gives the same answer logits.
    p = batch_a["prefix"]
    compressed = voco_prefill(model, p["embeds"], p["segments"], p["attn"], compress=True)
    assert compressed.cache.get_seq_length() == len(before) + N_VOCO
    assert compressed.next_position.tolist() == [len(before) + K_IMG + N_VOCO]
    torch.testing.assert_close(
        continue_from_cache(model, compressed, inputs_embeds=answer), logits_a, atol=1e-5, rtol=1e-5
    )

    # Negative control: if the answer may see the image slots (plain causal attention), the same
    # hybrid cache now changes the answer logits, i.e. the test above could fail.
    def all_visible(state):
        state.key_mask = torch.ones_like(state.key_mask)
        return state

    causal_a = continue_from_cache(model, all_visible(clone_state(state_a)), inputs_embeds=answer)
    causal_hybrid = continue_from_cache(
        model,
        all_visible(clone_state(state_a, image_from=state_b, image_slots=image_slots)),
        inputs_embeds=answer,
    )
    assert (causal_a - causal_hybrid).abs().max() > 1e-3
    # That control is the plain causal model: it matches a full forward without the VoCo mask,
    # where changing the pixels changes the answer logits as expected.
    plain_a = after_logits(full_forward(model, batch_a, voco_mask=False), batch_a, 0)
    plain_b = after_logits(full_forward(model, batch_b, voco_mask=False), batch_b, 0)
    torch.testing.assert_close(causal_a[0], plain_a, atol=1e-5, rtol=1e-5)
    assert (plain_a - plain_b).abs().max() > 1e-3
    # The VoCo mask really changes the computation (it is not silently dropped by transformers).
    assert (plain_a - full_a).abs().max() > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_pixel_gradient_flows_only_through_voco(impl, projection):
    """d(answer logits)/d(pixels) is nonzero, and zero once the VoCo hidden inputs are cut."""
    model = tiny_llm(impl)
    pix = pixels(3).requires_grad_(True)
    batch = build_batch(model, projection, [([5, 6], pix, [10, 11, 12])])
    full_forward(model, batch)[0, -3:].sum().backward()
    assert pix.grad is not None and pix.grad.abs().max() > 0

    # Same sequence, but the VoCo tokens may not see the image either: the pixels are cut off.
    pix.grad = None
    batch = build_batch(model, projection, [([5, 6], pix, [10, 11, 12])])
    f = batch["full"]
    mask = voco_attention_mask(f["segments"], f["attn"])
    img = (f["segments"] == IMAGE)[:, None, None, :]
    voco_rows = (f["segments"] == VOCO)[:, None, :, None]
    mask = mask.masked_fill(img & voco_rows, torch.finfo(mask.dtype).min)
    model(inputs_embeds=f["embeds"], attention_mask=mask).logits[0, -3:].sum().backward()
    assert pix.grad is None or pix.grad.abs().max() == 0


# ---------------------------------------------------------------------------------------------
# 3. Decoding from the compressed cache == full-sequence forward with the VoCo mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
@torch.no_grad()
def test_compressed_cache_matches_full_forward(impl, compress, projection):
    """Batch 2 with different prefix and answer lengths: right padding in the prefix, in the
    suffix and in the full sequence, and padding slots in the middle of the compressed cache."""
    model = tiny_llm(impl)
    rows = [([5, 6], pixels(1), [10, 11, 12, 13, 14]), ([7, 8, 9], pixels(2), [15, 16, 17])]
    batch = build_batch(model, projection, rows)
    full = full_forward(model, batch)

    p = batch["prefix"]
    state = voco_prefill(model, p["embeds"], p["segments"], p["attn"], compress=compress)
    if compress:  # rows keep 2 + 3 and 3 + 3 slots; the shorter one is padded (zeroed, hidden)
        assert state.key_mask.tolist() == [[True] * 5 + [False], [True] * 6]
        assert state.cache.layers[0].keys[0, :, 5].abs().max() == 0
    assert state.next_position.tolist() == [2 + K_IMG + N_VOCO, 3 + K_IMG + N_VOCO]

    # Feed the suffix in two chunks (the second one right-padded in row 1) to exercise the
    # growing key mask, then one more decoding step after the padding slots.
    s = batch["suffix"]
    out1 = continue_from_cache(
        model, state, inputs_embeds=s["embeds"][:, :2], attention_mask=s["attn"][:, :2]
    )
    out2 = continue_from_cache(
        model, state, inputs_embeds=s["embeds"][:, 2:], attention_mask=s["attn"][:, 2:]
    )
    cont = torch.cat([out1, out2], dim=1)
    for row in range(2):
        n = batch["after_len"][row]
        torch.testing.assert_close(cont[row, :n], after_logits(full, batch, row), atol=1e-5, rtol=1e-5)

    next_token = torch.tensor([[20], [21]])
    step = continue_from_cache(model, state, input_ids=next_token)
    rows_next = [
        (b, pix, after + [int(t)]) for (b, pix, after), t in zip(rows, next_token[:, 0], strict=True)
    ]
    batch_next = build_batch(model, projection, rows_next)
    full_next = full_forward(model, batch_next)
    for row in range(2):
        torch.testing.assert_close(
            step[row, 0], after_logits(full_next, batch_next, row)[-1], atol=1e-5, rtol=1e-5
        )
    assert state.next_position.tolist() == [2 + K_IMG + N_VOCO + 6, 3 + K_IMG + N_VOCO + 4]


def test_compress_cache_validation():
    cache = DynamicCache(ddp_cache_data=[(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))])
    with pytest.raises(ValueError, match=r"keep must have shape \(5,\) or \(1, 5\)"):
        compress_cache(cache, torch.ones(4, dtype=torch.bool))
    keys = cache.layers[0].keys.clone()
    cache, key_mask = compress_cache(cache, torch.tensor([True, False, True, False, True]))
    assert key_mask.tolist() == [[True, True, True]]
    assert torch.equal(cache.layers[0].keys, keys[:, :, [0, 2, 4]])
    assert cache.get_seq_length() == 3
    model = tiny_llm("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="supported attn_implementation"):
        voco_prefill(model, torch.zeros(1, 3, HIDDEN), torch.zeros(1, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# 4. Tokenizer
# ---------------------------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "c": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_add_voco_tokens_is_idempotent_and_appends():
    tok = _tiny_tokenizer()
    n0 = len(tok)
    ids = add_voco_tokens(tok, N_VOCO)
    assert ids == list(range(n0, n0 + N_VOCO))
    assert len(tok) == n0 + N_VOCO
    assert add_voco_tokens(tok, N_VOCO) == ids and len(tok) == n0 + N_VOCO
    # Special tokens are matched whole, even glued to other text.
    assert tok("a <voco_1> b<voco_2>c")["input_ids"] == [1, ids[1], 2, ids[2], 3]

    voco = VoCo(N_VOCO)
    assert list(voco.parameters()) == []
    with pytest.raises(RuntimeError, match="add_to_tokenizer"):
        voco.token_id_tensor()
    assert voco.add_to_tokenizer(tok) == ids and len(tok) == n0 + N_VOCO
    assert voco.is_voco(torch.tensor([[1, ids[0], ids[2], 2]])).tolist() == [[False, True, True, False]]
    seg = torch.tensor([[TEXT_BEFORE, IMAGE, VOCO, TEXT_AFTER]])
    assert torch.equal(voco.attention_mask(seg), voco_attention_mask(seg))

    model = tiny_llm("sdpa")
    model.resize_token_embeddings(len(tok))
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    with pytest.raises(ValueError, match="num_tokens"):
        VoCo(0)
