"""OmegaConf resolvers used by conf/ (registered on import; train.py and tests import this)."""

from __future__ import annotations

from omegaconf import OmegaConf


def _precision_if_cuda(gpu_precision: str, cpu_precision: str = "32-true") -> str:
    """bf16/fp16 mixed precision on GPU; fp32 elsewhere (bf16 matmuls are ~4x slower on CPU)."""
    import torch

    return gpu_precision if torch.cuda.is_available() else cpu_precision


def _div(a: int, b: int) -> int:
    """Exact integer division for sizes (e.g. a VAE's latent side = image_size / 8)."""
    if int(a) % int(b) != 0:
        raise ValueError(f"${{div:{a},{b}}}: {a} is not divisible by {b}")
    return int(a) // int(b)


def _mul(a: int, b: int) -> int:
    return int(a) * int(b)


def _percent(total: int, percent: float) -> int:
    """A step count as a percentage of another (e.g. LLaVA's 3 % warmup), rounded down, >= 1."""
    return max(1, int(int(total) * float(percent) / 100))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("precision_if_cuda"):
        OmegaConf.register_new_resolver("precision_if_cuda", _precision_if_cuda)
    if not OmegaConf.has_resolver("div"):
        OmegaConf.register_new_resolver("div", _div)
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", _mul)
    if not OmegaConf.has_resolver("percent"):
        OmegaConf.register_new_resolver("percent", _percent)


register_resolvers()
