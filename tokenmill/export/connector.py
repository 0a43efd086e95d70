"""Hand-off of a trained connector (compressor + projector) to the next training stage.

Two formats:
- a save_pretrained directory of the `VisualConnector` (config.json + model.safetensors): the
  whole compressor and projector, rebuilt exactly;
- LLaVA's `mm_projector.bin`: a torch state dict with keys `model.mm_projector.<i>.weight/bias`
  (LLaVA's mlp2x_gelu is Sequential(Linear, GELU, Linear), so i is 0 and 2). LLaVA training
  scripts read it with `--pretrain_mm_mlp_adapter`.

`load_connector` checks every width against the model the next stage built (compressor input
vs vision width, projector output vs LLM hidden size) before copying anything, so a checkpoint
of the wrong size fails before the first step with both widths in the message.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .pretrained import CONFIG_NAME, WEIGHTS_NAME, model_config, save_pretrained

MM_PROJECTOR_NAME = "mm_projector.bin"
MM_PROJECTOR_PREFIX = "model.mm_projector."


def save_connector(vlm: nn.Module, directory: str | os.PathLike, metrics: dict | None = None) -> Path:
    """Write the VLM's connector as a save_pretrained directory plus mm_projector.bin."""
    directory = Path(directory)
    connector = vlm.connector
    connector._tokenmill_config = model_config(vlm)["connector"]
    save_pretrained(connector, directory, metrics=metrics)
    save_mm_projector(connector.projector, directory / MM_PROJECTOR_NAME)
    return directory


def save_mm_projector(projector: nn.Module, path: str | os.PathLike) -> Path:
    path = Path(path)
    state = {MM_PROJECTOR_PREFIX + k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_mm_projector(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """LLaVA mm_projector.bin -> projector state dict (prefix stripped); never unpickles objects."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    keys = [k for k in state if k.startswith(MM_PROJECTOR_PREFIX) or k.startswith("mm_projector.")]
    if not keys:
        raise ValueError(f"{path} has no mm_projector weights (keys start with {sorted(state)[:3]})")
    return {k.split("mm_projector.", 1)[1]: state[k] for k in keys}


def _linear_widths(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(input width, output width) of an MLP state dict: first and last 2-D weight."""
    weights = [v for k, v in sorted(state.items(), key=lambda kv: _layer_order(kv[0])) if k.endswith("weight") and v.ndim == 2]
    if not weights:
        raise ValueError("projector weights contain no linear layer")
    return weights[0].shape[1], weights[-1].shape[0]


def _layer_order(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def check_widths(source: str, widths: dict[str, tuple[int, int]]) -> None:
    """widths: name -> (checkpoint width, model width); refuse all mismatches at once."""
    problems = [f"{name}: checkpoint {ckpt} vs model {model}" for name, (ckpt, model) in widths.items() if ckpt != model]
    if problems:
        raise ValueError(f"{source} does not fit this model: " + "; ".join(problems))


def load_connector(vlm: nn.Module, path: str | os.PathLike) -> str:
    """Load a connector directory (or a bare mm_projector.bin) into `vlm` strictly.

    Returns a one-line description for the log.
    """
    path = Path(path)
    connector = vlm.connector
    llm_width, vision_width = vlm.language_model.hidden_size, vlm.vision.out_dim
    if path.is_file() and path.suffix == ".bin":
        state = load_mm_projector(path)
        ckpt_in, ckpt_out = _linear_widths(state)
        check_widths(str(path), {
            "projector input width": (ckpt_in, connector.projector.in_dim),
            "projector output width / language model hidden size": (ckpt_out, llm_width),
        })
        connector.projector.load_state_dict(state, strict=True)
        return f"projector from {path}"
    weights = path / WEIGHTS_NAME
    if not (path / CONFIG_NAME).is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path} is neither a connector directory (config.json + {WEIGHTS_NAME}) nor an mm_projector.bin")
    state = load_file(weights)
    config = json.loads((path / CONFIG_NAME).read_text())["model"]
    projector_state = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    ckpt_in, ckpt_out = _linear_widths(projector_state)
    check_widths(str(path), {
        "compressor input width / vision width": (config["compressor"].get("in_dim", vision_width), vision_width),
        "projector input width": (ckpt_in, connector.projector.in_dim),
        "projector output width / language model hidden size": (ckpt_out, llm_width),
    })
    expected = connector.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{weights} does not match this connector: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shapes {shapes[:5]}"
        )
    connector.load_state_dict(state, strict=True)
    return f"connector from {path}"
