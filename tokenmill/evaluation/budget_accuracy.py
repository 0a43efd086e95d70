"""Accuracy against token budget for a trained VLM, learned compressor and baselines side by side.

One checkpoint is evaluated at every budget its compressor supports (MQT: any m; M3: its
scales). Training-free baselines (average pooling, [CLS]-attention top-k, DivPrune) replace the
compressor of a *reference* model, normally one trained with every patch (IdentityCompressor),
which is how such methods are applied to LLaVA-1.5 in their papers. Accuracy is answer exact
match under greedy decoding (computed in one teacher-forced pass, see `answer_exact_match`).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

from tokenmill.compressors import AveragePooling, ClsAttentionTopK, Compressor, DivPrune
from tokenmill.compressors.vlm import VisionLanguageModel, answer_exact_match

BASELINES = {"avgpool": AveragePooling, "cls_topk": ClsAttentionTopK, "divprune": DivPrune}
FIELDS = ["method", "num_tokens", "accuracy", "num_samples", "per_type"]


def build_baseline(name: str, model: VisionLanguageModel) -> Compressor:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    vision = model.vision
    if name == "avgpool":
        return AveragePooling(vision.out_dim, grid=vision.grid)
    return BASELINES[name](vision.out_dim, num_patches=vision.num_patches)


@contextmanager
def compressor_swapped(model: VisionLanguageModel, compressor: Compressor):
    """Temporarily run `model` with another compressor (and [CLS] attention when it needs it)."""
    original, original_cls = model.connector.compressor, model.vision.with_cls_attention
    model.connector.compressor = compressor
    model.vision.with_cls_attention = original_cls or isinstance(compressor, ClsAttentionTopK)
    try:
        yield model
    finally:
        model.connector.compressor = original
        model.vision.with_cls_attention = original_cls


@torch.no_grad()
def accuracy_at(model: VisionLanguageModel, batches: Iterable[dict], num_tokens: int) -> dict:
    correct, total = defaultdict(int), defaultdict(int)
    for batch in batches:
        out = model(batch, num_tokens=num_tokens)
        hits = answer_exact_match(out.logits, out.labels).tolist()
        for kind, hit in zip(batch["question_type"], hits, strict=True):
            correct[kind] += int(hit)
            total[kind] += 1
    n = sum(total.values())
    return {
        "accuracy": sum(correct.values()) / max(n, 1),
        "num_samples": n,
        "per_type": {k: correct[k] / total[k] for k in sorted(total)},
    }


def evaluate_budgets(
    model: VisionLanguageModel,
    batches: list[dict],
    budgets: list[int],
    reference: VisionLanguageModel | None = None,
    baselines: Iterable[str] = (),
    method: str | None = None,
) -> list[dict]:
    """Rows {method, num_tokens, accuracy, num_samples, per_type} for the model's compressor at
    each supported budget, then each baseline on `reference` (default: the model itself)."""
    model.eval()
    rows = []
    name = method or type(model.compressor).__name__
    for k in budgets:
        if k in model.compressor.supported_num_tokens:
            rows.append({"method": name, "num_tokens": k, **accuracy_at(model, batches, k)})
    reference = reference if reference is not None else model
    reference.eval()
    for baseline in baselines:
        compressor = build_baseline(baseline, reference)
        with compressor_swapped(reference, compressor):
            for k in budgets:
                if k in compressor.supported_num_tokens:
                    rows.append({"method": baseline, "num_tokens": k, **accuracy_at(reference, batches, k)})
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            per_type = " ".join(f"{k}={v:.3f}" for k, v in row["per_type"].items())
            writer.writerow({**row, "accuracy": f"{row['accuracy']:.4f}", "per_type": per_type})
    return path


def plot(rows: list[dict], path: Path, chance: float | None = None, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["num_tokens"], r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot([k for k, _ in points], [a for _, a in points], marker="o", label=method)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", label="majority answer")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("image tokens given to the LLM")
    ax.set_ylabel("answer accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
