#!/usr/bin/env python
"""Turn a training checkpoint into a `save_pretrained` directory with a model card, check that it
reloads to the same model, and (with --push) upload it to the Hugging Face Hub.

    python scripts/export_to_hub.py outputs/demo/runs/RUN --out exports/demo          # newest checkpoint
    python scripts/export_to_hub.py RUN/checkpoints/step_0004000.ckpt --out exports/demo-4k
    python scripts/export_to_hub.py RUN/checkpoints/last.ckpt --out exports/x --repo-id me/titok-demo --push [--private]

CKPT_OR_RUN_DIR: a run directory, a Lightning .ckpt file, or a sharded (torch.distributed.checkpoint)
checkpoint directory. The model is rebuilt from the run's config_resolved.yaml (--config to use
another); tokenizers are exported with their EMA weights when the checkpoint has them (--no-ema:
the live weights). Nothing is sent anywhere without --push; the token comes from `hf auth login`
or HF_TOKEN (or --token).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenmill.export.hub import HubPushError, export_checkpoint, push_to_hub


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, metavar="CKPT_OR_RUN_DIR")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the export into")
    parser.add_argument("--config", type=Path, default=None, help="resolved run config (default: the run's)")
    parser.add_argument("--no-ema", action="store_true", help="export the live weights even if EMA ones exist")
    parser.add_argument("--repo-id", default=None, help="Hub repository, e.g. user/titok-s128")
    parser.add_argument("--push", action="store_true", help="upload the export to --repo-id")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the stored login or HF_TOKEN)")
    args = parser.parse_args(argv)
    if args.push and not args.repo_id:
        parser.error("--push needs --repo-id user/name")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = export_checkpoint(args.source, args.out, config=args.config, prefer_ema=not args.no_ema)
    print(f"checkpoint      {result.checkpoint} (global_step {result.global_step}, weights: {result.weights})")
    print(f"run directory   {result.run_dir}")
    print(f"export          {result.directory}")
    for key, value in result.metrics.items():
        print(f"  {key:28s} {value:.4f}" if isinstance(value, float) else f"  {key:28s} {value}")
    if result.max_abs_diff is None:
        print("reloaded with from_pretrained (weights not compared: LoRA merged on export)")
    else:
        print(f"reloaded with from_pretrained: max abs diff {result.max_abs_diff:.3g} (weights and a forward pass)")
    if args.push:
        try:
            url = push_to_hub(result.directory, args.repo_id, private=args.private, token=args.token)
        except HubPushError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
