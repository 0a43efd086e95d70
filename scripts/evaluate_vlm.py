"""Accuracy against token budget for one trained VLM, with training-free baselines beside it.

    python scripts/evaluate_vlm.py RUN_OR_EXPORT [--reference FULL_TOKEN_RUN] \
        [--budgets 1 4 16 64] [--baselines avgpool cls_topk divprune] [--out DIR]

Scores the run's validation set (its own data config) at every budget the compressor supports,
then applies each baseline to the reference model (default: the model itself), e.g. a run that
kept all patch tokens (experiment=vqa_tiny). Writes budget_accuracy.csv and budget_accuracy.png
(with the majority-answer rate as the chance line when the data says it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tokenmill.data.vqa import majority_baseline
from tokenmill.evaluation.budget_accuracy import BASELINES, evaluate_budgets, plot, write_csv
from tokenmill.evaluation.runs import locate, run_datamodule
from tokenmill.export import from_pretrained


def majority_rate(batches: list[dict]) -> float:
    """Accuracy of always answering each question type's most frequent answer (over all types)."""
    items = [
        {"question_type": kind, "answer": answer}
        for batch in batches
        for kind, answer in zip(batch["question_type"], batch["answer"], strict=True)
    ]
    per_type = majority_baseline(items).values()
    return sum(t["majority_rate"] * t["num_samples"] for t in per_type) / max(len(items), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a training run directory or its export/")
    parser.add_argument("--reference", type=Path, default=None, help="run whose model the baselines compress")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--baselines", nargs="*", default=sorted(BASELINES), choices=sorted(BASELINES))
    parser.add_argument("--max-batches", type=int, default=None, help="limit the validation batches")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the run directory)")
    args = parser.parse_args(argv)

    export_dir, run_dir = locate(args.model)
    if run_dir is None:
        parser.error(f"{args.model} has no training run next to it: its validation data is unknown")
    model = from_pretrained(export_dir)
    reference = from_pretrained(locate(args.reference)[0]) if args.reference else None
    datamodule = run_datamodule(run_dir)
    datamodule.setup("validate")
    batches = []
    for i, batch in enumerate(datamodule.val_dataloader()):
        if args.max_batches is not None and i >= args.max_batches:
            break
        batches.append(batch)
    with torch.inference_mode():
        rows = evaluate_budgets(model, batches, args.budgets, reference=reference, baselines=args.baselines)
    out = args.out or run_dir
    out.mkdir(parents=True, exist_ok=True)
    chance = majority_rate(batches)
    write_csv(rows, out / "budget_accuracy.csv")
    plot(rows, out / "budget_accuracy.png", chance=chance, title=run_dir.name)
    summary = {"chance_majority": chance, "rows": rows}
    (out / "budget_accuracy.json").write_text(json.dumps(summary, indent=2))
    print(f"{'method':>24s} {'tokens':>6s} {'accuracy':>8s}")
    for row in rows:
        print(f"{row['method']:>24s} {row['num_tokens']:6d} {row['accuracy']:8.4f}")
    print(f"{'majority answer':>24s} {'':6s} {chance:8.4f}")
    print(f"wrote {out / 'budget_accuracy.csv'} and {out / 'budget_accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
