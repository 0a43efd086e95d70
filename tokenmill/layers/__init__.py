from tokenmill.layers.adaln import AdaLNFinalLayer, AdaLNZeroBlock, TimestepEmbedding, sinusoidal_embedding
from tokenmill.layers.attention import MultiHeadAttention, attention, set_attention_backend
from tokenmill.layers.patches import check_image_size, patchify, unpatchify
from tokenmill.layers.transformer import MLP, Transformer, TransformerBlock

__all__ = [
    "AdaLNFinalLayer",
    "AdaLNZeroBlock",
    "TimestepEmbedding",
    "sinusoidal_embedding",
    "MLP",
    "MultiHeadAttention",
    "Transformer",
    "TransformerBlock",
    "attention",
    "check_image_size",
    "patchify",
    "set_attention_backend",
    "unpatchify",
]
