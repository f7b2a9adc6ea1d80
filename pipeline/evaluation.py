"""Metrics and the evaluate stage: predictions, probabilities, metrics and a confusion matrix.

Metrics come from scikit-learn: ``evaluate.load`` fetches metric scripts from the Hub at run
time, which a pipeline that must re-run offline cannot depend on.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pipeline.artifacts import atomic_dir, atomic_file, write_json
from pipeline.data import LABEL, TEXT, TEXT_PAIR, UNLABELED, load_snapshot
from pipeline.errors import DataValidationError
from pipeline.tokenization import LABELS

logger = logging.getLogger(__name__)


def compute_metrics(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and MCC always; F1 of the positive class for two labels, macro-F1 for more."""
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if num_labels == 2:
        metrics["f1"] = float(f1_score(labels, predictions, average="binary", zero_division=0))
    else:
        metrics["macro_f1"] = float(f1_score(labels, predictions, average="macro",
                                             labels=list(range(num_labels)), zero_division=0))
    metrics["mcc"] = float(matthews_corrcoef(labels, predictions))
    return metrics


def trainer_metrics(eval_prediction, num_labels: int) -> dict[str, float]:
    """``compute_metrics`` in the form ``Trainer`` calls it (logits and label ids)."""
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return compute_metrics(labels, np.argmax(logits, axis=-1), num_labels)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> np.ndarray:
    matrix = np.zeros((num_labels, num_labels), dtype=int)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


class Predictor:
    """A trained model and its tokenizer, predicting logits for tokenized splits.

    Batches are padded per batch; ``Trainer.predict`` supplies the device placement and the
    progress bar.
    """

    def __init__(self, model_dir: str, batch_size: int, work_dir: str):
        import torch
        from transformers import (
            AutoModelForSequenceClassification,
            AutoTokenizer,
            DataCollatorWithPadding,
            Trainer,
            TrainingArguments,
        )

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        self.label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        args = TrainingArguments(output_dir=work_dir, per_device_eval_batch_size=batch_size,
                                 report_to="none", use_cpu=not torch.cuda.is_available())
        self.trainer = Trainer(model=model, args=args, processing_class=tokenizer,
                               data_collator=DataCollatorWithPadding(tokenizer))

    def logits(self, dataset) -> np.ndarray:
        inputs = dataset.remove_columns([c for c in dataset.column_names if c == LABELS])
        output = self.trainer.predict(inputs)
        logits = output.predictions
        return np.asarray(logits[0] if isinstance(logits, tuple) else logits, dtype=np.float64)


def evaluate_model(model_dir: str, raw_dir: str, tokenized_dir: str, metrics_path: str,
                   predictions_dir: str, confusion_path: str, primary_split: str,
                   batch_size: int) -> dict[str, Any]:
    """Predict every labelled split except train; write metrics, predictions and a confusion matrix.

    Returns the metrics keyed by split; ``primary_split`` names the headline split, whose
    confusion matrix is written.
    """
    raw = load_snapshot(raw_dir)
    tokenized = datasets.load_from_disk(tokenized_dir)
    splits = [name for name in raw if name != "train" and UNLABELED not in raw[name][LABEL][:1]]
    if not splits:
        raise DataValidationError(f"{raw_dir}: no labelled split besides train to evaluate on")
    if primary_split in splits:
        primary = primary_split
    else:
        primary = "validation" if "validation" in splits else splits[0]
    metrics: dict[str, Any] = {"primary_split": primary}
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(predictions_dir) as out:
        predictor = Predictor(model_dir, batch_size, scratch)
        names = predictor.label_names
        snapshot_names = raw["train"].features[LABEL].names
        if names != snapshot_names:
            raise DataValidationError(f"{model_dir} was trained for labels {names}, but "
                                      f"{raw_dir} has {snapshot_names}: re-run the train stage")
        for name in splits:
            probabilities = softmax(predictor.logits(tokenized[name]))
            predicted = probabilities.argmax(axis=-1)
            labels = np.asarray(raw[name][LABEL])
            metrics[name] = {**compute_metrics(labels, predicted, len(names)),
                             "examples": int(len(labels))}
            logger.info("%s: %s", name, ", ".join(f"{k}={v:.4f}" for k, v in metrics[name].items()
                                                  if k != "examples"))
            _write_predictions(out / f"{name}.jsonl", raw[name], predicted, probabilities, names)
            if name == primary:
                confusion = (labels, predicted)
    # Metrics and plot only once every split is done: no half-evaluated outputs.
    _write_confusion(confusion_path, *confusion, names)
    write_json(metrics_path, metrics)
    return metrics


def _write_predictions(path: Path, split, predicted: np.ndarray, probabilities: np.ndarray,
                       names: list[str]) -> None:
    """One JSON object per row: the input, its true label, the predicted label, every probability."""
    with open(path, "w") as handle:
        pairs = split[TEXT_PAIR] if TEXT_PAIR in split.column_names else None
        for row, (text, label) in enumerate(zip(split[TEXT], split[LABEL])):
            record = {"text": text}
            if pairs is not None:
                record["text_pair"] = pairs[row]
            record.update({
                "label": names[label],
                "predicted": names[int(predicted[row])],
                "probabilities": {n: round(float(p), 6) for n, p in zip(names, probabilities[row])},
            })
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write_confusion(path: str, labels: np.ndarray, predicted: np.ndarray, names: list[str]) -> None:
    """Row-per-example CSV in the shape DVC's ``confusion`` plot template reads."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows((names[a], names[p]) for a, p in zip(labels, predicted))
