"""The evaluate stage: predictions, probabilities, metrics and a confusion matrix.

Labelled splits get the task's metrics (:mod:`pipeline.metrics`); unlabelled splits (GLUE's
hidden test sets) get predictions and a GLUE submission file.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.artifacts import atomic_dir, atomic_file, write_json
from pipeline.contracts import (
    IDX,
    LABEL,
    TEXT,
    TEXT_PAIR,
    is_labeled,
    is_regression,
    load_snapshot,
    validation_split_name,
)
from pipeline.errors import DataValidationError
from pipeline.inference import (
    inference_device,
    inference_precision,
    load_classifier,
    postprocess,
    quantize_linear,
    sorted_batch_logits,
)
from pipeline.metrics import compute_metrics, task_metrics

logger = logging.getLogger(__name__)


class Predictor:
    """A trained model and its tokenizer, predicting logits for tokenized splits by
    :func:`~pipeline.inference.sorted_batch_logits`, as the inference command does.

    ``quantize``: predict with int8 linear layers (CPU only), and keep the fp32 model to measure
    what they cost (``logits(split, fp32=True)``).
    """

    def __init__(self, model_dir: str, batch_size: int, quantize: bool = False,
                 precision: str = "auto"):
        device = inference_device(quantize=quantize)
        self.precision = inference_precision(precision, device, quantize)
        model, self.tokenizer = load_classifier(model_dir)
        self.regression = model.config.problem_type == "regression"
        self.label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.batch_size = batch_size
        self.fp32 = model.to(device)
        self.model = quantize_linear(model) if quantize else self.fp32

    def logits(self, dataset, fp32: bool = False) -> np.ndarray:
        inputs = [c for c in self.tokenizer.model_input_names if c in dataset.column_names]
        features = dataset.select_columns(inputs).to_dict()
        return sorted_batch_logits(self.fp32 if fp32 else self.model, self.tokenizer, features,
                                   self.batch_size, "fp32" if fp32 else self.precision)


def evaluate_model(model_dir: str, raw_dir: str, tokenized_dir: str, metrics_path: str,
                   predictions_dir: str, confusion_path: str, primary_split: str,
                   batch_size: int, metrics: Optional[Sequence[str]] = None,
                   main_metric: str = "accuracy", submission_name: Optional[str] = None,
                   submission_labels: str = "ids", quantize: bool = False,
                   precision: str = "auto") -> dict[str, Any]:
    """Predict every split except train; write predictions, metrics and a confusion matrix.

    Labelled splits get ``metrics`` (null: the task's usual set); unlabelled ones (GLUE's hidden
    test sets) get predictions only and, with ``submission_name``, a GLUE submission file in
    ``predictions_dir/submission``. Returns the metrics keyed by split; ``primary_split`` names
    the headline split, whose confusion matrix is written.

    ``quantize``: predict with int8 linear layers (CPU only); the primary split is also scored
    in fp32, and its metrics get a ``quantization`` record of what int8 costs on
    ``main_metric`` (see :func:`quantization_record`). ``precision``: auto, bf16 or fp32
    (:func:`~pipeline.inference.inference_precision`).
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
    with atomic_dir(predictions_dir) as out:
        predictor = Predictor(model_dir, batch_size, quantize, precision)
        logger.info("predicting in %s", predictor.precision)
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
            labels = raw[name].with_format("arrow")[LABEL].to_numpy()  # not row by row
            predicted = logits[:, 0] if regression else logits.argmax(axis=-1)
            results[name] = {**compute_metrics(labels, predicted, metric_names, len(names)),
                             "examples": int(len(labels))}
            logger.info("%s: %s", name, ", ".join(f"{k}={v}" for k, v in results[name].items()))
            if name == primary:
                confusion = (labels, predicted)
                if quantize:
                    reference = predictor.logits(tokenized[name], fp32=True)
                    results[name]["quantization"] = quantization_record(
                        labels, predicted, reference, main_metric, len(names), regression)
                    logger.info("%s: int8 quantization: %s", name, results[name]["quantization"])
    # Metrics and plot only once every split is done: no half-evaluated outputs.
    _write_confusion(confusion_path, *confusion, names, regression)
    write_json(metrics_path, results)
    return results


def quantization_record(labels: np.ndarray, predicted: np.ndarray, fp32_logits: np.ndarray,
                        main_metric: str, num_labels: int, regression: bool) -> dict[str, Any]:
    """What int8 costs on one split: ``main_metric`` of the fp32 model, the int8 model's score
    minus it (``<metric>_change``, in the metric's own units: -0.01 is one point of accuracy)
    and, for classification, how many rows changed label."""
    reference = fp32_logits[:, 0] if regression else fp32_logits.argmax(axis=-1)
    fp32 = compute_metrics(labels, reference, [main_metric], num_labels)[main_metric]
    int8 = compute_metrics(labels, predicted, [main_metric], num_labels)[main_metric]
    record: dict[str, Any] = {"dtype": "int8", f"{main_metric}_fp32": fp32,
                              f"{main_metric}_change": None if fp32 is None or int8 is None
                              else round(int8 - fp32, 6)}
    if not regression:
        record["changed_predictions"] = int((reference != predicted).sum())
    return record


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
