"""Report stage: a Markdown report with figures, and the released model with its model card."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import atomic_dir, read_json
from pipeline.config import PipelineConfig
from pipeline.data import load_manifest
from pipeline.evaluation import confusion_matrix
from pipeline.tokenization import STATS

logger = logging.getLogger(__name__)

REPORT = "report.md"
MODEL_CARD = "README.md"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on CI or GPU nodes
    import matplotlib.pyplot as plt

    return plt


def _plot_training(history: list[dict[str, Any]], metric: str, path: Path) -> None:
    plt = pyplot()
    steps = [(h["step"], h["loss"], h.get("learning_rate")) for h in history if "loss" in h]
    evals = [(h["epoch"], h.get(f"eval_{metric}"), h.get("eval_loss")) for h in history
             if "eval_loss" in h]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if steps:
        axes[0].plot([s[0] for s in steps], [s[1] for s in steps], label="train loss")
        lr_axis = axes[0].twinx()
        lr_axis.plot([s[0] for s in steps], [s[2] for s in steps], color="tab:gray",
                     linestyle="--", label="learning rate")
        lr_axis.set_ylabel("learning rate")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].set_title("training loss and learning rate")
    if evals:
        axes[1].plot([e[0] for e in evals], [e[1] for e in evals], marker="o", label=metric)
        axes[1].plot([e[0] for e in evals], [e[2] for e in evals], marker="s", label="loss")
        axes[1].legend()
    axes[1].set_xlabel("epoch")
    axes[1].set_title("validation each epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_confusion(matrix: np.ndarray, names: list[str], split: str, path: Path) -> None:
    plt = pyplot()
    size = 1.0 + 0.7 * len(names)
    fig, axis = plt.subplots(figsize=(size + 1.5, size))
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("actual")
    axis.set_title(f"confusion matrix ({split})")
    for (row, col), count in np.ndenumerate(matrix):
        axis.text(col, row, str(count), ha="center", va="center",
                  color="white" if count > matrix.max() / 2 else "black")
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scores(predictions: Path, split: str, path: Path) -> None:
    """Regression: predicted score against gold score, one dot per example."""
    plt = pyplot()
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    gold, predicted = [r["gold"] for r in rows], [r["score"] for r in rows]
    fig, axis = plt.subplots(figsize=(4.8, 4.4))
    axis.scatter(gold, predicted, s=8, alpha=0.5)
    low, high = min(gold + predicted), max(gold + predicted)
    axis.plot([low, high], [low, high], color="grey", linewidth=1)
    axis.set_xlabel("gold score")
    axis.set_ylabel("predicted score")
    axis.set_title(f"predicted vs gold ({split})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_confusion(path: str, names: list[str]) -> np.ndarray:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    index = {name: i for i, name in enumerate(names)}
    return confusion_matrix(np.array([index[r["actual"]] for r in rows], dtype=int),
                            np.array([index[r["predicted"]] for r in rows], dtype=int), len(names))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metrics_table(metrics: dict[str, Any]) -> str:
    splits = [s for s, v in metrics.items() if isinstance(v, dict)]
    names = [k for k in metrics[splits[0]] if k != "examples"]
    return _table(["split", "examples", *names],
                  [[s, metrics[s]["examples"], *(_fmt(metrics[s][n]) for n in names)] for s in splits])


def _data_table(manifest: dict[str, Any], token_stats: dict[str, Any]) -> str:
    rows = []
    for name, split in manifest["splits"].items():
        tokens = token_stats["splits"].get(name, {})
        counts = ", ".join(f"{k} {v}" for k, v in split.get("label_counts", {}).items())
        if "label_mean" in split:
            low, high = split["label_range"]
            counts = f"scores {low}..{high}, mean {split['label_mean']}"
        counts = counts or "no labels"
        rows.append([name, split["rows"], counts, split.get("duplicates_removed", 0),
                     tokens.get("length_p50", ""), tokens.get("length_p95", ""),
                     f"{tokens.get('truncation_rate', 0):.1%}"])
    return _table(["split", "rows", "labels", "duplicates removed", "tokens p50", "tokens p95",
                   "truncated"], rows)


def _describe_head(cfg: PipelineConfig) -> str:
    head = cfg.head
    if head.type == "auto":
        return "the checkpoint's own sequence-classification head"
    layers = " -> ".join(str(size) for size in head.hidden_sizes) or "no hidden layer"
    return f"pooled: {head.pooling} pooling, {layers}, dropout {head.dropout}"


def _describe_strategy(cfg: PipelineConfig) -> str:
    train = cfg.train
    if train.strategy == "two_phase":
        return (f"two_phase: head only for {train.head_epochs:g} epochs at lr "
                f"{train.head_learning_rate:g}, then everything")
    return {"head_only": "head_only: pretrained body frozen",
            "finetune": "finetune: every weight trains"}[train.strategy]


def _config_table(cfg: PipelineConfig, checkpoint: dict[str, Any]) -> str:
    rows = [
        ["dataset", f"{cfg.dataset.name} ({cfg.dataset.source}: `{cfg.dataset.path}`"
                    f"{' ' + cfg.dataset.subset if cfg.dataset.subset else ''}, revision "
                    f"{cfg.dataset.revision})"],
        ["model", f"{cfg.model.name} ({cfg.model.source}: `{cfg.model.path}`, revision "
                  f"{checkpoint.get('revision')}, {checkpoint.get('model_type')})"],
        ["max_length", cfg.tokenize.max_length],
        ["head", _describe_head(cfg)],
        ["strategy", _describe_strategy(cfg)],
        ["learning_rate", cfg.train.learning_rate],
        ["epochs", cfg.train.num_train_epochs],
        ["batch size", cfg.train.per_device_train_batch_size],
        ["warmup ratio / weight decay", f"{cfg.train.warmup_ratio} / {cfg.train.weight_decay}"],
        ["seed", cfg.seed],
    ]
    return _table(["setting", "value"], rows)


def write_report(cfg: PipelineConfig) -> list[Path]:
    """Write ``paths.report_dir`` (report + figures) and ``paths.release_dir`` (model + card).

    Returns the report files, for logging to the model's MLflow run.
    """
    paths = cfg.paths
    manifest = load_manifest(paths.raw_dir)
    checkpoint = read_json(Path(paths.checkpoint_dir) / "checkpoint_manifest.json")
    token_stats = read_json(Path(paths.tokenized_dir) / STATS)
    history = read_json(paths.history_path)
    metrics = read_json(paths.metrics_path)
    names = manifest["label_names"]
    regression = manifest.get("task") == "regression"
    primary = metrics["primary_split"]
    metric = cfg.train.metric_for_best_model or cfg.dataset.main_metric
    leakage = manifest["leakage"]

    sections = {
        "config": _config_table(cfg, checkpoint),
        "data": _data_table(manifest, token_stats),
        "metrics": _metrics_table(metrics),
    }
    figure = "scores.png" if regression else "confusion_matrix.png"
    headline = metrics[primary]
    summary = ", ".join(f"{k} {_fmt(v)}" for k, v in headline.items() if k != "examples")
    report = f"""# {cfg.dataset.name} / {cfg.model.name}

Held-out **{primary}** split ({headline['examples']} examples): {summary}.

## Configuration

{sections['config']}

## Data

{sections['data']}

Duplicates are exact repeats of the text (and pair); the first is kept. Texts shared between
train and an evaluation split: {leakage['shared_with_train'] or 'none'}
(action: {leakage['action']}, {leakage['dropped_from_train']} dropped from train).
Truncation is at {token_stats['max_length']} tokens.

## Training

![training curves](training_curves.png)

## Metrics

{sections['metrics']}

![{'predicted vs gold' if regression else 'confusion matrix'}]({figure})
"""
    with atomic_dir(paths.report_dir) as tmp:
        _plot_training(history, metric, tmp / "training_curves.png")
        if regression:
            _plot_scores(Path(paths.predictions_dir) / f"{primary}.jsonl", primary, tmp / figure)
        else:
            _plot_confusion(_read_confusion(paths.confusion_path, names), names, primary,
                            tmp / figure)
        (tmp / REPORT).write_text(report)
    with atomic_dir(paths.release_dir) as tmp:
        for file in Path(paths.model_dir).iterdir():
            shutil.copy2(file, tmp / file.name)
        (tmp / MODEL_CARD).write_text(model_card(cfg, manifest, checkpoint, metrics, sections))
    report_dir = Path(paths.report_dir)
    return [report_dir / REPORT, report_dir / "training_curves.png", report_dir / figure,
            Path(paths.release_dir) / MODEL_CARD]


def model_card(cfg: PipelineConfig, manifest: dict[str, Any], checkpoint: dict[str, Any],
               metrics: dict[str, Any], sections: dict[str, str]) -> str:
    names = manifest["label_names"]
    primary = metrics["primary_split"]
    base = cfg.model.path if cfg.model.source == "hub" else f"{cfg.model.source}:{cfg.model.path}"
    # base_model in the card metadata must be a Hub id; other sources are named in the text.
    hub_base = f"base_model: {cfg.model.path}\n" if cfg.model.source == "hub" else ""
    pair = manifest.get("text_pair")
    if manifest.get("task") == "regression":
        head = "a new regression head (one score, trained with MSE loss)"
        purpose = "Scoring"
    else:
        head = f"a new classification head for {len(names)} labels ({', '.join(names)})"
        purpose = "Classifying"
    pooled_note = ("\nThe pooled head is this project's own class: `import pipeline.heads` before "
                   "loading it with transformers, or use `python -m stages.predict --model "
                   "<this folder>`.\n" if cfg.head.type == "pooled" else "")
    return f"""---
library_name: transformers
pipeline_tag: text-classification
{hub_base}tags: [text-classification, {cfg.dataset.name}]
---

# {cfg.model.name} fine-tuned on {cfg.dataset.name}

A `{checkpoint.get('model_type')}` sequence classifier: the pretrained body of `{base}`
(revision {checkpoint.get('revision')}) with {head}, trained on {cfg.dataset.name}
({_describe_strategy(cfg)}; head: {_describe_head(cfg)}).

## Intended use

{purpose} {'pairs of texts' if pair else 'single texts'} as above, for text like
the training data: {cfg.dataset.name} ({cfg.dataset.source} `{cfg.dataset.path}`). The model
reads at most {cfg.tokenize.max_length} tokens{' of each pair' if pair else ''}; anything longer
is truncated. It is not meant for decisions about people, nor for text in other languages or
domains without first measuring it there.

```python
from transformers import pipeline
classifier = pipeline("text-classification", model="{cfg.paths.release_dir}")
classifier({'{"text": "...", "text_pair": "..."}' if pair else '"..."'}, top_k=None)
```
{pooled_note}

## Training data

{sections['data']}

## Training procedure

{sections['config']}

## Evaluation

Headline split: **{primary}**.

{sections['metrics']}

## Limitations and bias

- Scores hold for data like the evaluation split, and only for it: other sources, eras or
  writing styles can score much lower.
- The model inherits the biases of its pretraining corpus and of the labelled data; labels
  reflect the annotators' and publishers' categories, not ground truth.
- Text past {cfg.tokenize.max_length} tokens is never seen by the model.
- Probabilities come from a softmax over logits and are not calibrated.
"""
