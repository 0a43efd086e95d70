"""The language model of the VLM stage: any `AutoModelForCausalLM`, by hub name or by config.

The module owns its tokenizer so that the vocabulary size, the special tokens the VLM adds
(VoCo) and the embedding table can never disagree; the data pipeline instantiates the same
tokenizer config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def build_causal_lm(name_or_path: str | None, config: dict | None, model_type: str, torch_dtype: str | None):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    if (name_or_path is None) == (config is None):
        raise ValueError("CausalLanguageModel needs exactly one of name_or_path (pretrained) or config (random init)")
    if config is not None:
        config = dict(config)
        lm_config = CONFIG_MAPPING[config.pop("model_type", model_type)](**config)
        return AutoModelForCausalLM.from_config(lm_config)
    dtype = getattr(torch, torch_dtype) if torch_dtype else None
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except OSError as error:
        raise OSError(f"could not load the language model {name_or_path!r}: {error}") from error


class CausalLanguageModel(nn.Module):
    """A Hugging Face causal LM fed through `inputs_embeds`.

    Args:
        name_or_path: hub id or directory of pretrained weights (e.g. "lmsys/vicuna-7b-v1.5"); or
        config: a config dict with `model_type` (e.g. a tiny "llama") for a random init.
        tokenizer: the tokenizer object (Hydra instantiates it); the embedding table is resized
            to `len(tokenizer)` when they differ.
        attn_implementation: "sdpa" (default) or "eager"; VoCo's 4D mask works on both.
    """

    def __init__(
        self,
        tokenizer: Any,
        name_or_path: str | None = None,
        config: dict | None = None,
        model_type: str = "llama",
        attn_implementation: str = "sdpa",
        torch_dtype: str | None = None,
    ):
        super().__init__()
        if config is not None:
            config = {**config, "attn_implementation": attn_implementation}
        self.name_or_path = name_or_path
        self.model = build_causal_lm(name_or_path, config, model_type, torch_dtype)
        if name_or_path is not None:
            self.model.config._attn_implementation = attn_implementation
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the language model's tokenizer has no pad token; set one (LLaVA uses unk for Vicuna)")
        self.resize_vocabulary()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def resize_vocabulary(self) -> None:
        """Grow (or shrink) the embedding table to the tokenizer, e.g. after adding VoCo tokens."""
        if self.model.get_input_embeddings().num_embeddings != len(self.tokenizer):
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)

    def portable_config(self, node: dict) -> dict:
        """Exports hold the weights, so record the architecture instead of a hub name."""
        node = dict(node)
        node["name_or_path"] = None
        config = self.model.config.to_diff_dict()
        config["vocab_size"] = self.model.get_input_embeddings().num_embeddings
        for key in ("architectures", "transformers_version", "_attn_implementation_autoset", "dtype", "torch_dtype"):
            config.pop(key, None)
        node["config"] = config | {"model_type": self.model.config.model_type}
        return node

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        **kwargs: Any,
    ):
        return self.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )

    def extra_repr(self) -> str:
        return f"source={self.name_or_path or 'config'}, hidden_size={self.hidden_size}, vocab={len(self.tokenizer)}"
