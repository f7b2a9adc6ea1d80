"""Inference with a trained model of this project: from its folder or an MLflow model URI.

Tokenization and batching come from ``transformers.pipeline`` (text-classification, raw logits
out); the logits then go through :func:`postprocess`, the same code the evaluate stage uses, so a
row gets the same label and probabilities here as in the evaluate stage's predictions. The model
folder's tokenizer truncates where training did (the train stage saves the tokenize stage's
``max_length`` as its ``model_max_length``).

This module imports no data or tracking code: MLflow's served model loads it on its own. It is
the model loader of the evaluate stage, the inference command and the served model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.contracts import TEXT, TEXT_PAIR, check_model_folder

MLFLOW_ARTIFACT = "model"  # the model folder's name inside the logged MLflow model


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def postprocess(logits: np.ndarray, names: list[str], regression: bool) -> list[dict[str, Any]]:
    """Logits to what a user reads: the label and every class's probability (softmax), or the
    score for regression (no softmax). The one post-processing of evaluate and inference."""
    logits = np.asarray(logits, dtype=np.float64)
    if regression:
        return [{"score": round(float(row[0]), 6)} for row in logits]
    probabilities = softmax(logits)
    return [{"label": names[int(row.argmax())],
             "probabilities": {n: round(float(p), 6) for n, p in zip(names, row)}}
            for row in probabilities]


def load_classifier(model_dir: str):
    """A trained model of this project (either head type) and its tokenizer, from a folder that
    :func:`check_model_folder` accepts."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import pipeline.heads  # noqa: F401  (registers the pooled head with the Auto classes)

    check_model_folder(Path(model_dir), str(model_dir))
    return (AutoModelForSequenceClassification.from_pretrained(model_dir),
            AutoTokenizer.from_pretrained(model_dir))


def resolve_model_dir(spec: str) -> Path:
    """A model folder, or an MLflow model URI (``runs:/<run id>/model``, ``models:/<name>/<v>``,
    ``models:/<model id>``) downloaded from the tracking server."""
    path = Path(spec)
    if "://" not in spec and not spec.startswith(("runs:/", "models:/")):
        if not (path / "config.json").is_file() and not (path / "MLmodel").is_file():
            raise FileNotFoundError(f"{spec}: not a model folder (no config.json) and not an "
                                    "MLflow model URI (runs:/<run id>/model, models:/...)")
    else:
        import mlflow

        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec))
        except Exception as exc:  # MlflowException, OSError, ...: the message says which
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FileNotFoundError(f"{spec}: could not load the MLflow model: {message}") from None
    if (path / "MLmodel").is_file():  # a logged MLflow model: the model folder is an artifact
        path = path / "artifacts" / MLFLOW_ARTIFACT
    return path


class Classifier:
    """Classify texts or text pairs with a trained model."""

    def __init__(self, model: str, batch_size: int = 64, device: Optional[str] = None):
        import torch
        from transformers import pipeline

        self.model_dir = resolve_model_dir(model)
        network, tokenizer = load_classifier(str(self.model_dir))
        config = network.config
        self.regression = config.problem_type == "regression"
        self.label_names = [config.id2label[i] for i in range(config.num_labels)]
        self.batch_size = batch_size
        self.pipeline = pipeline("text-classification", model=network, tokenizer=tokenizer,
                                 device=device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def logits(self, rows: list[dict[str, str]]) -> np.ndarray:
        """Raw logits for ``{"text": ..., ["text_pair": ...]}`` rows, in the model's label order."""
        inputs = [{k: row[k] for k in (TEXT, TEXT_PAIR) if row.get(k) is not None} for row in rows]
        outputs = self.pipeline(inputs, batch_size=self.batch_size, top_k=None,
                                function_to_apply="none", truncation=True)
        order = {name: i for i, name in enumerate(self.label_names)}
        logits = np.zeros((len(rows), len(self.label_names)))
        for row, scores in enumerate(outputs):
            for item in scores:
                logits[row, order[item["label"]]] = item["score"]
        return logits

    def predict(self, rows: Iterable[dict[str, str]], total: Optional[int] = None,
                progress: bool = False, chunk: int = 1024) -> Iterator[dict[str, Any]]:
        """Each row with its prediction added (label and probabilities, or score), streamed in
        chunks so a large file never sits in memory whole; ``progress`` draws a bar on stderr."""
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="rows", disable=not progress)
        buffer: list[dict[str, str]] = []
        for row in rows:
            buffer.append(row)
            if len(buffer) == chunk:
                yield from self._flush(buffer, bar)
                buffer = []
        if buffer:
            yield from self._flush(buffer, bar)
        bar.close()

    def _flush(self, rows: list[dict[str, str]], bar) -> Iterator[dict[str, Any]]:
        for row, result in zip(rows, postprocess(self.logits(rows), self.label_names,
                                                 self.regression)):
            bar.update(1)
            yield {**row, **result}
