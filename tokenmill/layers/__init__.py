from tokenmill.layers.attention import MultiHeadAttention, attention, set_attention_backend
from tokenmill.layers.patches import check_image_size, unpatchify
from tokenmill.layers.transformer import MLP, Transformer, TransformerBlock

__all__ = [
    "MLP",
    "MultiHeadAttention",
    "Transformer",
    "TransformerBlock",
    "attention",
    "check_image_size",
    "set_attention_backend",
    "unpatchify",
]
