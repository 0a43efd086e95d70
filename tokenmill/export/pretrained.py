"""`save_pretrained` / `from_pretrained` for any model built from a Hydra `_target_` config.

A directory holds `config.json` (the model's config tree, enough to rebuild it exactly),
`model.safetensors` and a README model card. Loading instantiates the config, then loads the
weights strictly: any missing, unexpected or mis-shaped tensor is refused with a message naming it.

Only `_target_`s inside tokenmill (and torch.nn) are instantiated, so a downloaded config.json
cannot make us import and call arbitrary code.
"""

from __future__ import annotations

import json
import os
import tempfile
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
ALLOWED_TARGET_PREFIXES = ("tokenmill.", "torch.nn.")


def _check_targets(node: Any, where: str = "model") -> None:
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(ALLOWED_TARGET_PREFIXES):
            raise ValueError(
                f"refusing to instantiate {where}._target_={target!r}: only targets under "
                f"{ALLOWED_TARGET_PREFIXES} may be built from a saved config"
            )
        for key, value in node.items():
            _check_targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_targets(value, f"{where}[{i}]")


def build_model(config: Any) -> nn.Module:
    """Instantiate a model from its config and remember the config for `save_pretrained`."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    config = deepcopy(dict(config))
    _check_targets(config)
    model = instantiate(config, _convert_="all")
    model._tokenmill_config = config
    return model


def model_config(model: nn.Module) -> dict:
    config = getattr(model, "_tokenmill_config", None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} has no recorded config: build it with "
            "tokenmill.export.build_model(cfg) so save_pretrained can write config.json"
        )
    return config


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _model_card(config: dict, metrics: dict | None, extra: dict | None) -> str:
    lines = [
        "---",
        "library_name: tokenmill",
        "tags: [tokenmill, image-tokenizer]",
        "---",
        f"# {config.get('_target_', 'model').rsplit('.', 1)[-1]} (tokenmill)",
        "",
        "Load with:",
        "```python",
        "from tokenmill.export import from_pretrained",
        'model = from_pretrained("path/to/this/directory")',
        "```",
    ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    for key, value in (extra or {}).items():
        lines += ["", f"## {key}", "", "```", str(value), "```"]
    lines += ["", "## Config", "", "```json", json.dumps(config, indent=2), "```", ""]
    return "\n".join(lines)


def portable_config(model: nn.Module) -> dict:
    """The model's config with every part that points outside the export made self-contained.

    A submodule whose config reads files at build time (e.g. a FrozenVAE loaded from another
    export's path) defines `portable_config(node) -> node`; its weights are in this export's
    model.safetensors anyway, so the saved config must not need the original file.
    """
    from hydra._internal.utils import _locate

    hooks = [m for m in model.modules() if hasattr(m, "portable_config")]

    def visit(node: Any) -> Any:
        if isinstance(node, dict):
            target = node.get("_target_")
            if isinstance(target, str):
                for module in hooks:
                    try:
                        cls = _locate(target)
                    except (ImportError, ValueError):
                        break
                    if isinstance(cls, type) and isinstance(module, cls):
                        node = module.portable_config(node)
                        break
            return {k: visit(v) for k, v in node.items()}
        if isinstance(node, list):
            return [visit(v) for v in node]
        return node

    return visit(deepcopy(model_config(model))) if hooks else model_config(model)


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike, metrics: dict | None = None, extra: dict | None = None
) -> Path:
    """Write config.json + model.safetensors (+ README.md). Each file is replaced atomically and
    config.json is written last, so a directory with a config.json is always complete."""
    config = portable_config(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_weights = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_NAME}.")
    os.close(fd)
    save_model(model, tmp_weights, metadata={"format": "pt", "tokenmill_format": str(FORMAT_VERSION)})
    os.replace(tmp_weights, directory / WEIGHTS_NAME)
    _atomic_write_text(directory / CARD_NAME, _model_card(config, metrics, extra))
    from tokenmill import __version__

    payload = {
        "tokenmill_format": FORMAT_VERSION,
        "tokenmill_version": __version__,
        "model": config,
        "metrics": metrics or {},
    }
    _atomic_write_text(directory / CONFIG_NAME, json.dumps(payload, indent=2, default=str))
    return directory


def _check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    # safetensors stores one name per shared tensor; names that alias a stored tensor are fine.
    stored = [(v.data_ptr(), v.shape) for k, v in expected.items() if k in state]
    aliased = {k for k, v in expected.items() if k not in state and (v.data_ptr(), v.shape) in stored}
    missing = sorted(set(expected) - set(state) - aliased)
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[:5]})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:5]})")
    if problems:
        raise ValueError(f"weights in {source} do not match the model in its config.json: " + "; ".join(problems))


def load_pretrained_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Copy an export's weights into an already built model, strictly (names and shapes)."""
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found: not a tokenmill save_pretrained directory")
    state = load_file(weights_path)
    _check_state_dict(model, state, weights_path)
    model.load_state_dict(state, strict=False)  # strictness checked above, aliases allowed
    return model


def from_pretrained(
    directory: str | os.PathLike, expected_class: type | None = None, map_location: str = "cpu"
) -> nn.Module:
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a tokenmill save_pretrained directory")
    payload = json.loads(config_path.read_text())
    if "model" not in payload or payload.get("tokenmill_format") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} is not a tokenmill config (format {payload.get('tokenmill_format')!r}, "
            f"expected {FORMAT_VERSION} with a 'model' key)"
        )
    model = build_model(payload["model"])
    if expected_class is not None and not isinstance(model, expected_class):
        raise TypeError(f"{directory} holds a {type(model).__name__}, expected {expected_class.__name__}")
    load_pretrained_weights(model, directory)
    return model.to(map_location).eval()


class PretrainedMixin:
    """Gives a model `.save_pretrained(dir)` and `Class.from_pretrained(dir)`."""

    def save_pretrained(self, directory: str | os.PathLike, metrics: dict | None = None, extra: dict | None = None):
        return save_pretrained(self, directory, metrics=metrics, extra=extra)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu"):
        return from_pretrained(directory, expected_class=cls, map_location=map_location)
