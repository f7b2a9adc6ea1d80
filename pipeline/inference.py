"""Inference with a trained model of this project: from its folder or an MLflow model URI.

Rows are tokenized with the model folder's tokenizer, which truncates where training did (the
train stage saves the tokenize stage's ``max_length`` as its ``model_max_length``), then run by
:func:`sorted_batch_logits`: longest first, in batches padded to their own longest row, so short
texts never pay for long ones. The evaluate stage runs its tokenized splits through the same
function. The logits then go through :func:`postprocess`, the same code the evaluate stage uses,
so a row gets the same label and probabilities here as in the evaluate stage's predictions.

On the CPU the linear layers can be quantized to int8 (:func:`quantize_linear`): the evaluate
stage (``eval.quantize``) reports what that costs in accuracy, the inference command takes
``--quantize``.

This module imports no data or tracking code: MLflow's served model loads it on its own. It is
the model loader of the evaluate stage, the inference command and the served model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.config import INFERENCE_PRECISIONS
from pipeline.contracts import TEXT, TEXT_PAIR, check_model_folder
from pipeline.errors import ConfigError
from pipeline.hardware import native_bf16

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


def inference_device(device: Optional[str] = None, quantize: bool = False) -> str:
    """``device``, or cuda where there is a GPU and cpu otherwise.

    Raises:
        ConfigError: int8 quantization asked for on a device other than the CPU, where its
            kernels do not run: refused rather than silently left out.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if quantize and torch.device(device).type != "cpu":
        raise ConfigError(f"int8 dynamic quantization (--quantize, eval.quantize) runs on the CPU "
                          f"only, and this run uses {device}: turn it off, or hide the GPU with "
                          "CUDA_VISIBLE_DEVICES=")
    return device


def inference_precision(requested: str, device: str, quantize: bool = False) -> str:
    """``fp32``, ``bf16`` (autocast) or ``int8`` (``quantize``). ``auto``: bf16 where the device
    computes it natively (:func:`pipeline.hardware.native_bf16`), fp32 elsewhere; with
    ``quantize``, int8 linear layers and fp32 for the rest.

    Raises:
        ConfigError: an unknown precision, or bf16 together with int8 quantization.
    """
    if requested not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision {requested!r} is not one of "
                          f"{', '.join(INFERENCE_PRECISIONS)}")
    if quantize:
        if requested == "bf16":
            raise ConfigError("int8 quantization runs the linear layers in int8 and the rest in "
                              "fp32: use precision auto or fp32 with it, not bf16")
        return "int8"
    if requested == "auto":
        import torch

        return "bf16" if native_bf16(torch.device(device).type) else "fp32"
    return requested


def quantize_linear(model):
    """A copy of ``model`` whose ``nn.Linear`` layers hold int8 weights (scaled per output
    channel) and quantize their inputs on the fly (dynamic quantization): CPU only; embeddings
    and layer norms stay fp32.

    ``torch.ao.quantization.quantize_dynamic`` is deprecated in favour of torchao's
    ``quantize_``, but still ships with torch (2.13) and runs fbgemm's int8 kernels. torchao
    would be a new dependency, and its int8 dynamic quantization without ``torch.compile`` was
    no faster than fp32 (MiniLM-L6 on a 2-core AMD EPYC), where this one ran about 3x the fp32
    texts/s: so this one, with its deprecation warnings silenced.
    """
    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_(tensor|channel)")
        # One int8 scale per output channel, not per matrix: on SST-2 (MiniLM-L6) per-tensor
        # scales cost 1.0 accuracy point against fp32, per-channel ones none.
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8)


def sorted_batch_logits(model, tokenizer, features: Mapping[str, Sequence[Sequence[int]]],
                        batch_size: int, precision: str = "fp32") -> np.ndarray:
    """Logits of tokenized rows (``features``: each model input's token lists, one per row), in
    the rows' order.

    The rows run longest first in batches of ``batch_size``, each padded to its own longest row
    (to a multiple of 8 on a GPU, for its tensor cores), so a batch pads little whatever the
    order of the input; a run in input order pads every batch to its longest row.
    Under ``precision`` bf16 the model runs in bf16 autocast (:func:`inference_precision`).
    """
    import torch

    ids = features.get("input_ids", [])  # none at all for no rows
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    count = len(ids)
    order = np.argsort(-lengths, kind="stable")
    device = next(model.parameters()).device
    multiple = 8 if device.type == "cuda" else None
    logits = np.zeros((count, model.config.num_labels))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), autocast:
        for start in range(0, count, batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer.pad({name: [values[i] for i in rows]
                                   for name, values in features.items()},
                                  padding=True, pad_to_multiple_of=multiple, return_tensors="pt")
            output = model(**{name: tensor.to(device) for name, tensor in batch.items()})
            logits[rows] = output.logits.float().cpu().numpy()
    return logits


class Classifier:
    """Classify texts or text pairs with a trained model; ``quantize``: int8 linear layers
    (:func:`quantize_linear`, CPU only)."""

    def __init__(self, model: str, batch_size: int = 64, device: Optional[str] = None,
                 quantize: bool = False, precision: str = "auto"):
        device = inference_device(device, quantize)
        self.precision = inference_precision(precision, device, quantize)
        self.model_dir = resolve_model_dir(model)
        network, self.tokenizer = load_classifier(str(self.model_dir))
        config = network.config
        self.regression = config.problem_type == "regression"
        self.label_names = [config.id2label[i] for i in range(config.num_labels)]
        self.batch_size = batch_size
        self.model = (quantize_linear(network) if quantize else network).to(device)

    def logits(self, rows: list[dict[str, str]]) -> np.ndarray:
        """Raw logits for ``{"text": ..., ["text_pair": ...]}`` rows, in the model's label order."""
        return sorted_batch_logits(self.model, self.tokenizer, self._encode(rows),
                                   self.batch_size, self.precision)

    def _encode(self, rows: list[dict[str, str]]) -> dict[str, list[list[int]]]:
        """Token ids of every row; rows with and without a pair may mix (a served model's
        input), each kind tokenized in one call."""
        paired = [row.get(TEXT_PAIR) is not None for row in rows]
        features: dict[str, list[Any]] = {}
        for pair in (False, True):
            group = [i for i, has_pair in enumerate(paired) if has_pair == pair]
            if not group:
                continue
            texts = [rows[i][TEXT] for i in group]
            pairs = {"text_pair": [rows[i][TEXT_PAIR] for i in group]} if pair else {}
            encoding = self.tokenizer(texts, truncation=True, **pairs)
            for name, values in encoding.items():
                column = features.setdefault(name, [None] * len(rows))
                for i, value in zip(group, values):
                    column[i] = value
        return features

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
