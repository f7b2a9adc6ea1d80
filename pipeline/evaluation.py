"""The evaluate stage: predictions, probabilities, metrics and a confusion matrix.

Labelled splits get the task's metrics (:mod:`pipeline.metrics`); unlabelled splits (GLUE's
hidden test sets) get predictions and a GLUE submission file.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.artifacts import atomic_dir, atomic_file, write_json
from pipeline.contracts import (
    IDX,
    LABEL,
    LABELS,
    TEXT,
    TEXT_PAIR,
    is_labeled,
    is_regression,
    load_snapshot,
    validation_split_name,
)
from pipeline.errors import DataValidationError
from pipeline.inference import load_classifier, postprocess
from pipeline.metrics import compute_metrics, task_metrics

logger = logging.getLogger(__name__)


class Predictor:
    """A trained model and its tokenizer, predicting logits for tokenized splits.

    Batches are padded per batch; ``Trainer.predict`` supplies the device placement and the
    progress bar.
    """

    def __init__(self, model_dir: str, batch_size: int, work_dir: str):
        import torch
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

        model, tokenizer = load_classifier(model_dir)
        self.regression = model.config.problem_type == "regression"
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
                   batch_size: int, metrics: Optional[Sequence[str]] = None,
                   main_metric: str = "accuracy", submission_name: Optional[str] = None,
                   submission_labels: str = "ids") -> dict[str, Any]:
    """Predict every split except train; write predictions, metrics and a confusion matrix.

    Labelled splits get ``metrics`` (null: the task's usual set); unlabelled ones (GLUE's hidden
    test sets) get predictions only and, with ``submission_name``, a GLUE submission file in
    ``predictions_dir/submission``. Returns the metrics keyed by split; ``primary_split`` names
    the headline split, whose confusion matrix is written.
    """
    import datasets

    raw = load_snapshot(raw_dir)
    tokenized = datasets.load_from_disk(tokenized_dir)
    splits = [name for name in raw if name != "train"]
    labeled = [name for name in splits if is_labeled(raw[name])]
    if not labeled:
        raise DataValidationError(f"{raw_dir}: no labelled split besides train to evaluate on")
    if primary_split in labeled:
        primary = primary_split
    else:
        primary = validation_split_name(labeled) or labeled[0]
    results: dict[str, Any] = {"primary_split": primary}
    regression = is_regression(raw["train"])
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(predictions_dir) as out:
        predictor = Predictor(model_dir, batch_size, scratch)
        names = predictor.label_names
        expected = ["score"] if regression else raw["train"].features[LABEL].names
        if names != expected or predictor.regression != regression:
            raise DataValidationError(f"{model_dir} was trained for labels {names}, but "
                                      f"{raw_dir} has {expected}: re-run the train stage")
        metric_names = task_metrics(metrics, main_metric, len(names), regression)
        for name in splits:
            logits = predictor.logits(tokenized[name])
            records = postprocess(logits, names, regression)
            gold = _gold(raw[name], names, regression) if name in labeled else None
            _write_predictions(out / f"{name}.jsonl", raw[name], records, gold)
            if name not in labeled:
                if submission_name:
                    _write_submission(out / SUBMISSION_DIR, submission_name, name, raw[name],
                                      records, names, submission_labels)
                logger.info("%s: %d predictions (no labels)", name, len(records))
                continue
            labels = np.asarray(raw[name][LABEL])
            predicted = logits[:, 0] if regression else logits.argmax(axis=-1)
            results[name] = {**compute_metrics(labels, predicted, metric_names, len(names)),
                             "examples": int(len(labels))}
            logger.info("%s: %s", name, ", ".join(f"{k}={v}" for k, v in results[name].items()))
            if name == primary:
                confusion = (labels, predicted)
    # Metrics and plot only once every split is done: no half-evaluated outputs.
    _write_confusion(confusion_path, *confusion, names, regression)
    write_json(metrics_path, results)
    return results


SUBMISSION_DIR = "submission"


def submission_file(task: str, split: str) -> str:
    """GLUE's file name for a test split: ``MRPC.tsv``; MNLI's ``MNLI-m.tsv``/``MNLI-mm.tsv``."""
    suffix = {"test": "", "test_matched": "-m", "test_mismatched": "-mm"}.get(split)
    return f"{task}{suffix if suffix is not None else '-' + split.removeprefix('test_')}.tsv"


def _write_submission(folder: Path, task: str, split: str, rows, records: list[dict[str, Any]],
                      names: list[str], labels: str) -> None:
    """``index<TAB>prediction`` per row, as the GLUE server reads it: label ids or names as the
    task wants, scores with three decimals."""
    folder.mkdir(exist_ok=True)
    ids = rows[IDX] if IDX in rows.column_names else range(len(rows))
    with open(folder / submission_file(task, split), "w") as handle:
        handle.write("index\tprediction\n")
        for index, record in zip(ids, records):
            if "score" in record:
                value = f"{record['score']:.3f}"
            else:
                value = record["label"] if labels == "names" else str(names.index(record["label"]))
            handle.write(f"{index}\t{value}\n")


def _gold(split, names: list[str], regression: bool) -> list[Any]:
    if regression:
        return [round(float(score), 6) for score in split[LABEL]]
    return [names[label] for label in split[LABEL]]


def _write_predictions(path: Path, split, records: list[dict[str, Any]],
                       gold: Optional[list[Any]]) -> None:
    """One JSON object per row: the input, its gold label (if any), the predicted label and
    every probability (or the score)."""
    columns = [c for c in (TEXT, TEXT_PAIR, IDX) if c in split.column_names]
    inputs = {c: list(split[c]) for c in columns}
    with open(path, "w") as handle:
        for row, record in enumerate(records):
            line = {c: inputs[c][row] for c in columns}
            if gold is not None:
                line["gold"] = gold[row]
            line.update(record)
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")


def _write_confusion(path: str, labels: np.ndarray, predicted: np.ndarray, names: list[str],
                     regression: bool) -> None:
    """Row-per-example CSV in the shape DVC's ``confusion`` plot template reads. Regression
    scores are rounded to whole numbers, which makes them classes for the plot."""
    if regression:
        actual = [str(int(round(float(v)))) for v in labels]
        guessed = [str(int(round(float(v)))) for v in predicted]
    else:
        actual, guessed = [names[a] for a in labels], [names[p] for p in predicted]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows(zip(actual, guessed))
