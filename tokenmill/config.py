"""OmegaConf resolvers used by conf/ (registered on import; train.py and tests import this)."""

from __future__ import annotations

from omegaconf import OmegaConf


def _precision_if_cuda(gpu_precision: str, cpu_precision: str = "32-true") -> str:
    """bf16/fp16 mixed precision on GPU; fp32 elsewhere (bf16 matmuls are ~4x slower on CPU)."""
    import torch

    return gpu_precision if torch.cuda.is_available() else cpu_precision


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("precision_if_cuda"):
        OmegaConf.register_new_resolver("precision_if_cuda", _precision_if_cuda)


register_resolvers()
