"""Figures of the report (training curves, confusion matrix, predicted vs gold scores) and of
sweep comparisons, drawn with matplotlib into PNG files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.metrics import confusion_matrix


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on CI or GPU nodes
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: list[dict[str, Any]], metric: str, path: Path) -> None:
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


def plot_confusion(matrix: np.ndarray, names: list[str], split: str, path: Path) -> None:
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


def plot_scores(predictions: Path, split: str, path: Path) -> None:
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


def read_confusion(path: str, names: list[str]) -> np.ndarray:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    index = {name: i for i, name in enumerate(names)}
    return confusion_matrix(np.array([index[r["actual"]] for r in rows], dtype=int),
                            np.array([index[r["predicted"]] for r in rows], dtype=int), len(names))
