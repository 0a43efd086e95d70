"""VoCo-LLaMA: compress the image tokens inside the language model with an attention mask.

VoCo-LLaMA (Ye et al., 2024) adds N "VoCo" tokens to the LLM vocabulary and puts them right
after the image tokens:

    [text before] [image x K] [VoCo x N] [question + answer text]

A 4D attention mask stops every token *after* the VoCo tokens from attending to the image
tokens. Those tokens still see the text before the image, the VoCo tokens and earlier text
after them (causally), so every bit of image information that reaches the answer has to pass
through the key/value states of the VoCo tokens. The LLM itself is the compressor; there is
no separate network, and the VoCo embeddings are rows of the LLM's embedding table.

At inference the prefix [text before, image, VoCo] is run once, its KV cache is kept, the
image positions are dropped from it, and decoding goes on from the compressed cache with the
original position ids (RoPE positions are not renumbered: the VoCo states were computed at
their original positions and later tokens must see the same relative distances as in
training).

Public API
    TEXT_BEFORE, IMAGE, VOCO, TEXT_AFTER    segment codes for `segments` tensors
    add_voco_tokens(tokenizer, n)           add <voco_i> special tokens, return their ids
    voco_attention_mask(segments, mask)     the [B, 1, L, L] additive float mask
    voco_position_ids(mask)                 position ids that skip padding
    check_attn_implementation(config)       refuse attention back-ends that ignore 4D masks
    VoCo(num_tokens)                        tiny module holding the token ids + mask builder
    compress_cache(cache, keep)             drop cache slots (the image) from a DynamicCache
    voco_prefill(model, ...) -> VoCoCache   run the prefix once, keep the compressed cache
    continue_from_cache(model, state, ...)  go on decoding from it, returns logits

How the mask reaches transformers (5.x): `create_causal_mask` returns any 4D tensor as-is
(`_preprocess_mask_arguments` early-exits on `attention_mask.ndim == 4`), for both the
"eager" and the "sdpa" back-end. The eager path *adds* the mask to the attention scores, and
SDPA adds a float `attn_mask` too (a bool one would mean "True = attend"), so the only format
that is right on both paths is an additive float mask in the model's dtype: 0 where allowed,
`finfo(dtype).min` where not. A bool mask would be silently wrong on the eager path (added as
0/1). Flash-attention back-ends ignore custom 4D masks and flex-attention wants a BlockMask,
so those are refused (`check_attn_implementation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Segment codes: which part of the VLM input each position belongs to. Padding is not a
# segment: it is given by the usual 2D attention mask (1 real, 0 pad), whatever the segment
# value at a padded position is.
TEXT_BEFORE = 0  # prompt text before the image: visible to everything after it
IMAGE = 1  # image tokens: visible only to later image tokens and to the VoCo tokens
VOCO = 2  # the N compression tokens: see the image, are seen by everything after them
TEXT_AFTER = 3  # question/answer text after the VoCo tokens: cannot see IMAGE keys

SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def voco_token_strings(num_tokens: int) -> list[str]:
    """The special-token strings `<voco_0>` .. `<voco_{N-1}>`."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return [f"<voco_{i}>" for i in range(num_tokens)]


def add_voco_tokens(tokenizer, num_tokens: int) -> list[int]:
    """Add `<voco_0>`..`<voco_{N-1}>` as special tokens to a HF tokenizer; return their ids.

    Idempotent: tokens already in the vocabulary are not added again (`add_tokens` skips them),
    so a second call returns the same ids. Special tokens are never split by the
    pre-tokenizer. The caller must then resize the LLM embeddings, e.g.
    `llm.resize_token_embeddings(len(tokenizer))`; the VoCo embeddings are those new rows.
    """
    tokens = voco_token_strings(num_tokens)
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or (unk is not None and i == unk) for i in ids):
        raise RuntimeError(
            f"tokenizer did not register the VoCo tokens: {dict(zip(tokens, ids, strict=True))}"
        )
    return list(ids)


def check_attn_implementation(config) -> str:
    """Return the model's attention back-end, or raise if it would not apply the VoCo mask.

    Only eager and SDPA use a user-provided 4D float mask as-is; flash-attention kernels only
    take padding information (the VoCo restriction would be silently lost) and flex-attention
    expects a BlockMask.
    """
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"VoCo needs a custom 4D attention mask; supported attn_implementation: "
            f"{list(SUPPORTED_ATTN_IMPLEMENTATIONS)}, got {impl!r}"
        )
    return impl


def _check_2d(name: str, t: Tensor, shape: tuple[int, int] | None = None) -> None:
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2D [B, L], got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _to_additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool [B, q, k] (True = may attend) -> additive float [B, 1, q, k] in `dtype`."""
    if not dtype.is_floating_point:
        raise ValueError(f"mask dtype must be floating point (the model's dtype), got {dtype}")
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)[:, None]


def voco_attention_mask(
    segments: Tensor, attention_mask: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Additive 4D mask [B, 1, L, L] for a full VoCo sequence (training / full forward).

    segments:       [B, L] long, codes TEXT_BEFORE / IMAGE / VOCO / TEXT_AFTER.
    attention_mask: [B, L], 1 real, 0 padding (None: no padding).
    dtype:          the model's dtype (SDPA needs the mask in the query dtype).

    Query i may attend key j iff j <= i (causal), key j is real, and not (i is TEXT_AFTER and
    j is IMAGE). Padding query rows see only themselves, so no row is fully masked (their
    outputs are ignored, but an all-masked row can turn into NaN in some kernels).
    """
    _check_2d("segments", segments)
    if segments.dtype.is_floating_point or segments.dtype == torch.bool:
        raise ValueError(f"segments must be an integer tensor, got {segments.dtype}")
    if segments.numel() and (segments.min() < TEXT_BEFORE or segments.max() > TEXT_AFTER):
        raise ValueError(
            f"segments values must be in [{TEXT_BEFORE}, {TEXT_AFTER}], got range "
            f"[{int(segments.min())}, {int(segments.max())}]"
        )
    b, length = segments.shape
    device = segments.device
    if attention_mask is None:
        real = torch.ones(b, length, dtype=torch.bool, device=device)
    else:
        _check_2d("attention_mask", attention_mask, (b, length))
        real = attention_mask.to(device=device).bool()

    idx = torch.arange(length, device=device)
    causal = idx[None, :] <= idx[:, None]  # [q, k]
    allowed = causal[None] & real[:, None, :]  # padding keys are never visible
    blocked = (segments == TEXT_AFTER)[:, :, None] & (segments == IMAGE)[:, None, :]
    allowed = allowed & ~blocked
    # Padding queries: only themselves.
    eye = torch.eye(length, dtype=torch.bool, device=device)[None]
    allowed = torch.where((~real)[:, :, None], eye, allowed)
    return _to_additive(allowed, dtype)


def voco_position_ids(attention_mask: Tensor) -> Tensor:
    """[B, L] position ids counting only real tokens (0, 1, ... from the first real one).

    Equals `arange(L)` on the real tokens of a right-padded row; works for left padding too.
    Padding positions get a clamped, irrelevant value (they are masked as keys).
    """
    _check_2d("attention_mask", attention_mask)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class VoCo(nn.Module):
    """VoCo compression tokens for a VLM whose LLM does the compressing.

    Holds the number of tokens and their ids once `add_to_tokenizer` has run; the VLM assembly
    writes `token_ids` after the image tokens, marks segments and asks `attention_mask` for the
    4D mask. No parameters of its own: the VoCo embeddings live in the LLM's embedding table.
    """

    def __init__(self, num_tokens: int):
        super().__init__()
        voco_token_strings(num_tokens)  # validates num_tokens
        self.num_tokens = num_tokens
        self.token_ids: list[int] = []

    def add_to_tokenizer(self, tokenizer) -> list[int]:
        """Add the `<voco_i>` tokens (idempotent) and remember their ids."""
        self.token_ids = add_voco_tokens(tokenizer, self.num_tokens)
        return self.token_ids

    def token_id_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """[N] long tensor of the VoCo ids, to write after the image tokens."""
        if len(self.token_ids) != self.num_tokens:
            raise RuntimeError("VoCo.token_ids is not set: call add_to_tokenizer(tokenizer) first")
        return torch.tensor(self.token_ids, dtype=torch.long, device=device)

    def is_voco(self, input_ids: Tensor) -> Tensor:
        """Bool mask of the VoCo positions in `input_ids`."""
        return torch.isin(input_ids, self.token_id_tensor(input_ids.device))

    def attention_mask(
        self, segments: Tensor, attention_mask: Tensor | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """The [B, 1, L, L] additive VoCo mask; see `voco_attention_mask`."""
        return voco_attention_mask(segments, attention_mask, dtype)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, token_ids={self.token_ids}"


# ----------------------------------------------------------------------------------------
# Inference with a compressed KV cache
# ----------------------------------------------------------------------------------------


def _cache_layers(cache) -> list:
    """The DynamicLayer objects of a transformers-5 DynamicCache, refusing other layer kinds."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"expected a transformers Cache with .layers, got {type(cache).__name__}")
    for i, layer in enumerate(layers):
        # Subclasses (sliding window, quantized, linear-attention) keep extra bookkeeping
        # (cumulative lengths, quantized residuals) that slot removal would corrupt.
        if type(layer) is not DynamicLayer:
            raise TypeError(
                f"compress_cache supports plain DynamicLayer only; layer {i} is {type(layer).__name__}"
            )
    return list(layers)


def compress_cache(cache, keep: Tensor) -> tuple[object, Tensor]:
    """Keep only the cache slots where `keep` is True (e.g. drop the image); in place.

    cache: a transformers `DynamicCache` whose layers store keys/values as
           [B, heads, S, head_dim] (`cache.layers[i].keys` / `.values`).
    keep:  [S] or [B, S] bool. Rows may keep different numbers of slots: the kept slots are
           moved to the front in their original order and the rows are padded to the longest;
           padded slots are zeroed.

    Returns (cache, key_mask): the same cache object, now of length K = max kept per row, and
    key_mask [B, K] bool telling which slots are real. Later queries must mask the others
    (`continue_from_cache` does). Position information is already inside the cached keys
    (RoPE is applied before caching), so removing slots does not change anyone's position.
    """
    layers = [layer for layer in _cache_layers(cache) if layer.is_initialized and layer.keys.numel()]
    if not layers:
        raise ValueError("cache is empty")
    b, _, s, _ = layers[0].keys.shape
    keep = keep.to(device=layers[0].keys.device).bool()
    if keep.ndim == 1:
        keep = keep[None].expand(b, -1)
    if tuple(keep.shape) != (b, s):
        raise ValueError(
            f"keep must have shape ({s},) or ({b}, {s}) to match the cache, got {tuple(keep.shape)}"
        )

    counts = keep.sum(1)
    k = int(counts.max())
    # Stable sort puts kept slots first, in order; the first k indices of each row are what we keep.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
    key_mask = torch.arange(k, device=keep.device)[None] < counts[:, None]

    for layer in layers:
        if layer.keys.shape[0] != b or layer.keys.shape[2] != s:
            raise ValueError(
                f"cache layers disagree on [B, S]: {tuple(layer.keys.shape)} vs ({b}, ., {s}, .)"
            )
        for name in ("keys", "values"):
            t = getattr(layer, name)
            index = order[:, None, :, None].expand(b, t.shape[1], k, t.shape[3])
            picked = t.gather(2, index)
            # Zero the padding slots so nothing from a dropped (image) slot stays in the cache.
            picked = picked * key_mask[:, None, :, None].to(picked.dtype)
            setattr(layer, name, picked)
    return cache, key_mask


@dataclass
class VoCoCache:
    """A KV cache to decode from, with the bookkeeping a custom 4D mask needs.

    cache:         transformers `DynamicCache` (mutated by every `continue_from_cache`).
    key_mask:      [B, S] bool, cache slots that later TEXT_AFTER tokens may attend to (real,
                   non-image). Grows with every `continue_from_cache` call.
    next_position: [B] long, position id of each row's next real token (original numbering).
    """

    cache: object
    key_mask: Tensor
    next_position: Tensor


def voco_prefill(
    model,
    inputs_embeds: Tensor,
    segments: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    compress: bool = True,
) -> VoCoCache:
    """Run the prefix [text before, image, VoCo] once and return the cache to decode from.

    model:          a causal LM (Llama family) with attn_implementation "eager" or "sdpa".
    inputs_embeds:  [B, L, D] with image embeddings at IMAGE positions and VoCo embeddings.
    segments:       [B, L] segment codes; attention_mask [B, L] (1 real, 0 pad), any padding side.
    position_ids:   [B, L]; default `voco_position_ids(attention_mask)`.
    compress:       drop the image slots from the cache (the point of VoCo). With False the
                    cache keeps them and `key_mask` simply hides them; same logits, more memory.

    The prefix may also contain TEXT_AFTER tokens; they are cached like the rest.
    """
    from transformers import DynamicCache

    check_attn_implementation(model.config)
    if inputs_embeds.ndim != 3:
        raise ValueError(f"inputs_embeds must be [B, L, D], got shape {tuple(inputs_embeds.shape)}")
    b, length, _ = inputs_embeds.shape
    _check_2d("segments", segments, (b, length))
    if attention_mask is None:
        attention_mask = torch.ones(b, length, dtype=torch.long, device=inputs_embeds.device)
    _check_2d("attention_mask", attention_mask, (b, length))
    if position_ids is None:
        position_ids = voco_position_ids(attention_mask)
    _check_2d("position_ids", position_ids, (b, length))
    real = attention_mask.bool()

    mask = voco_attention_mask(segments, attention_mask, dtype=inputs_embeds.dtype)
    cache = DynamicCache(config=model.config)
    model(
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,  # only the cache is needed
    )

    # Slots later text may see: every real non-image slot (text before, VoCo, cached text after).
    visible = real & (segments != IMAGE)
    next_position = position_ids.masked_fill(~real, -1).max(dim=1).values + 1
    if compress:
        cache, key_mask = compress_cache(cache, visible)
    else:
        key_mask = visible
    return VoCoCache(cache=cache, key_mask=key_mask, next_position=next_position)


def continue_from_cache(
    model,
    state: VoCoCache,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> Tensor:
    """Feed TEXT_AFTER tokens on top of a VoCo cache; return logits [B, T, V].

    attention_mask: [B, T] for the new tokens (1 real, 0 pad; default all real).
    position_ids:   [B, T]; default continues each row from `state.next_position`, counting
                    only real tokens, i.e. the original positions of the full sequence.

    The new tokens see the visible cache slots (`state.key_mask`) and each other causally.
    `state` is updated in place (cache grows, key_mask extended, next_position advanced), so
    the function can be called again for the next decoding step.
    """
    check_attn_implementation(model.config)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    b, t, _ = inputs_embeds.shape
    device = inputs_embeds.device

    cached = state.cache.get_seq_length()
    _check_2d("state.key_mask", state.key_mask, (b, cached))
    if attention_mask is None:
        attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
    _check_2d("attention_mask", attention_mask, (b, t))
    real = attention_mask.to(device).bool()
    if position_ids is None:
        position_ids = state.next_position.to(device)[:, None] + voco_position_ids(attention_mask)
    _check_2d("position_ids", position_ids, (b, t))

    # [B, T, S + T]: visible cache slots, then causal over the real new tokens.
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    new = causal[None] & real[:, None, :]
    new = torch.where((~real)[:, :, None], torch.eye(t, dtype=torch.bool, device=device)[None], new)
    old = state.key_mask.to(device)[:, None, :].expand(b, t, cached) & real[:, :, None]
    mask = _to_additive(torch.cat([old, new], dim=2), inputs_embeds.dtype)

    out = model(
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=state.cache,
        use_cache=True,
    )
    state.key_mask = torch.cat([state.key_mask.to(device), real], dim=1)
    state.next_position = state.next_position.to(device) + real.sum(1)
    return out.logits
