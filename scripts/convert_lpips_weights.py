"""Build a tokenmill LPIPS weights file (.safetensors) from two public checkpoints.

Inputs (both read with ``torch.load(weights_only=True)``, so no code is unpickled):
  --vgg  a torchvision VGG-16 state dict (``features.<idx>.weight/bias`` keys; the
         ``classifier.*`` keys of a full-model state dict are ignored)
  --lin  the official LPIPS ``vgg.pth`` linear heads (``lin<k>.model.1.weight``, k = 0..4)

Output: one .safetensors in the layout documented in tokenmill/losses/perceptual.py
(``net.features.<idx>.*`` and ``lin<k>.weight``). The result is verified by loading it
into ``tokenmill.losses.LPIPS`` before the command reports success.

Example:
  python scripts/convert_lpips_weights.py --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.safetensors
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenmill.losses.perceptual import LPIPS, RandomWeightsWarning, check_state_dict

_FEATURES_KEY = re.compile(r"^features\.\d+\.(weight|bias)$")
_LPIPS_HEAD_KEY = re.compile(r"^lin(\d+)\.model\.1\.weight$")


def _load_tensors(path: Path, what: str) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors come in many types; name the file
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {error}") from error
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def convert(vgg_path: Path, lin_path: Path) -> dict[str, torch.Tensor]:
    """Return the LPIPS state dict in tokenmill's layout, checked against the model's shapes."""
    vgg_state = _load_tensors(vgg_path, "VGG-16")
    lin_state = _load_tensors(lin_path, "LPIPS heads")

    converted: dict[str, torch.Tensor] = {}
    for key, tensor in vgg_state.items():
        if _FEATURES_KEY.match(key):
            converted[f"net.{key}"] = tensor
    if not converted:
        raise ValueError(
            f"{vgg_path}: no 'features.<idx>.weight/bias' keys; is this a torchvision vgg16 state dict?"
        )

    for key, tensor in lin_state.items():
        match = _LPIPS_HEAD_KEY.match(key)
        if match is None:
            raise ValueError(f"{lin_path}: unexpected key {key!r}; expected only 'lin<k>.model.1.weight'")
        converted[f"lin{match.group(1)}.weight"] = tensor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        reference = LPIPS().state_dict()
    check_state_dict(converted, reference, source=f"{vgg_path} + {lin_path}")
    # Store in the model's dtype; safetensors needs contiguous tensors.
    return {key: tensor.to(reference[key].dtype).contiguous() for key, tensor in converted.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vgg", type=Path, required=True, help="torchvision vgg16 state dict (.pth)")
    parser.add_argument("--lin", type=Path, required=True, help="official LPIPS vgg.pth linear heads")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors path")
    args = parser.parse_args(argv)

    if args.out.suffix != ".safetensors":
        parser.error(f"--out must end in .safetensors, got {args.out}")
    state = convert(args.vgg, args.lin)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out))
    LPIPS(weights_path=str(args.out))  # strict load: fails loudly if the file is unusable
    print(f"wrote {len(state)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
