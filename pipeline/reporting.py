"""Report stage: a Markdown report with figures, and the released model with its model card."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_dir, read_json
from pipeline.config import PipelineConfig
from pipeline.contracts import load_pretrained_manifest, load_raw_manifest, load_tokenize_stats
from pipeline.metrics import per_class_scores
from pipeline.plots import plot_confusion, plot_scores, plot_training_curves, read_confusion

logger = logging.getLogger(__name__)

REPORT = "report.md"
MODEL_CARD = "README.md"
# Above this share of a split's texts cut at tokenize.max_length, the report and the log warn.
TRUNCATION_WARNING = 0.05
# Our metric names as the Hub's model-index has them: type, config (macro-F1 is F1 averaged over
# the classes; plain f1 is the positive class's), and the name shown.
CARD_METRICS = {
    "accuracy": ("accuracy", None, "Accuracy"),
    "f1": ("f1", None, "F1"),
    "macro_f1": ("f1", "macro", "Macro F1"),
    "mcc": ("matthews_correlation", None, "MCC"),
    "pearson": ("pearsonr", None, "Pearson"),
    "spearman": ("spearmanr", None, "Spearman"),
}


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _scores(split: dict[str, Any]) -> dict[str, Any]:
    """A split's metrics without its example count and records (the int8 ``quantization``)."""
    return {k: v for k, v in split.items() if k != "examples" and not isinstance(v, dict)}


def _metrics_table(metrics: dict[str, Any]) -> str:
    splits = [s for s, v in metrics.items() if isinstance(v, dict)]
    names = list(_scores(metrics[splits[0]]))
    table = _table(["split", "examples", *names],
                   [[s, metrics[s]["examples"], *(_fmt(metrics[s][n]) for n in names)]
                    for s in splits])
    return table + _quantization_note(metrics)


def _quantization_note(metrics: dict[str, Any]) -> str:
    """One sentence under the metrics when the evaluate stage ran in int8 (eval.quantize): the
    scores above are the int8 model's, the released weights are fp32."""
    primary = metrics["primary_split"]
    record = metrics[primary].get("quantization")
    if not record:
        return ""
    metric = next(k.removesuffix("_fp32") for k in record if k.endswith("_fp32"))
    change = record[f"{metric}_change"]
    changed = (f", {record['changed_predictions']} of {metrics[primary]['examples']} labels "
               "changed" if "changed_predictions" in record else "")
    return (f"\n\nScored with {record['dtype']} dynamically quantized linear layers "
            f"(`eval.quantize`, as `hf-text-pipeline predict --quantize` runs them); the released "
            f"weights are fp32, which score {metric} {_fmt(record[f'{metric}_fp32'])} on "
            f"**{primary}** (int8 change {'n/a' if change is None else f'{change:+.4f}'}"
            f"{changed}).")


def _per_class_table(matrix, names: list[str]) -> str:
    """Precision, recall and F1 of each class, with its gold and predicted counts: what a
    headline accuracy or macro average hides on skewed data (a class that is never predicted)."""
    rows = [[name, score["examples"], score["predicted"], _fmt(score["precision"]),
             _fmt(score["recall"]), _fmt(score["f1"])]
            for name, score in zip(names, per_class_scores(matrix))]
    return _table(["class", "examples", "predicted", "precision", "recall", "F1"], rows)


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


def truncation_warning(token_stats: dict[str, Any]) -> str:
    """A warning, logged and returned for the report, naming each split where more than
    :data:`TRUNCATION_WARNING` of the texts were longer than ``tokenize.max_length``; "" when
    none was."""
    cut = {name: split["truncation_rate"] for name, split in token_stats["splits"].items()
           if split.get("truncation_rate", 0) > TRUNCATION_WARNING}
    if not cut:
        return ""
    message = (f"{', '.join(f'{rate:.1%} of {name}' for name, rate in cut.items())} texts are "
               f"longer than tokenize.max_length={token_stats['max_length']} tokens and were "
               f"truncated (more than {TRUNCATION_WARNING:.0%}): the model never sees their "
               "ends; if the ends matter, raise tokenize.max_length (training time grows with it)")
    logger.warning(message)
    return f"**Warning:** {message}."


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


def _config_table(cfg: PipelineConfig, pretrained: dict[str, Any]) -> str:
    rows = [
        ["dataset", f"{cfg.dataset.name} ({cfg.dataset.source}: `{cfg.dataset.path}`"
                    f"{' ' + cfg.dataset.subset if cfg.dataset.subset else ''}, revision "
                    f"{cfg.dataset.revision})"],
        ["model", f"{cfg.model.name} ({cfg.model.source}: `{cfg.model.path}`, revision "
                  f"{pretrained.get('revision')}, {pretrained.get('model_type')})"],
        ["max_length", cfg.tokenize.max_length],
        ["head", _describe_head(cfg)],
        ["strategy", _describe_strategy(cfg)],
        ["learning_rate", cfg.train.learning_rate if cfg.train.layer_lr_decay == 1 else
         f"{cfg.train.learning_rate} for the head, x {cfg.train.layer_lr_decay} per encoder "
         "layer below it"],
        ["epochs", cfg.train.num_train_epochs],
        ["batch size", cfg.train.per_device_train_batch_size],
        ["warmup ratio / weight decay", f"{cfg.train.warmup_ratio} / {cfg.train.weight_decay}"],
        ["class weights", cfg.train.class_weights],
        ["seed", cfg.seed],
    ]
    return _table(["setting", "value"], rows)


def write_report(cfg: PipelineConfig) -> list[Path]:
    """Write ``paths.report_dir`` (report + figures) and ``paths.release_dir`` (model + card).

    Returns the report files, for logging to the model's MLflow run.
    """
    paths = cfg.paths
    manifest = load_raw_manifest(paths.raw_dir)
    pretrained = load_pretrained_manifest(paths.pretrained_dir)
    token_stats = load_tokenize_stats(paths.tokenized_dir)
    history = read_json(paths.history_path)
    metrics = read_json(paths.metrics_path)
    names = manifest["label_names"]
    regression = manifest.get("task") == "regression"
    primary = metrics["primary_split"]
    metric = cfg.train.metric_for_best_model or cfg.dataset.main_metric
    leakage = manifest["leakage"]

    confusion = None if regression else read_confusion(paths.confusion_path, names)
    truncation = truncation_warning(token_stats)
    sections = {
        "config": _config_table(cfg, pretrained),
        "data": _data_table(manifest, token_stats) + (f"\n\n{truncation}" if truncation else ""),
        "metrics": _metrics_table(metrics),
        "per_class": "" if regression else (
            f"Per class on **{primary}**:\n\n{_per_class_table(confusion, names)}\n"),
    }
    figure = "scores.png" if regression else "confusion_matrix.png"
    headline = metrics[primary]
    summary = ", ".join(f"{k} {_fmt(v)}" for k, v in _scores(headline).items())
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

{sections['per_class']}
![{'predicted vs gold' if regression else 'confusion matrix'}]({figure})
"""
    with atomic_dir(paths.report_dir) as tmp:
        plot_training_curves(history, metric, tmp / "training_curves.png")
        if regression:
            plot_scores(Path(paths.predictions_dir) / f"{primary}.jsonl", primary, tmp / figure)
        else:
            plot_confusion(confusion, names, primary, tmp / figure)
        (tmp / REPORT).write_text(report)
    with atomic_dir(paths.release_dir) as tmp:
        for file in Path(paths.model_dir).iterdir():
            shutil.copy2(file, tmp / file.name)
        model_card(cfg, manifest, pretrained, metrics, sections).save(tmp / MODEL_CARD)
    report_dir = Path(paths.report_dir)
    return [report_dir / REPORT, report_dir / "training_curves.png", report_dir / figure,
            Path(paths.release_dir) / MODEL_CARD]


def card_metadata(cfg: PipelineConfig, metrics: dict[str, Any]):
    """The model card's metadata as the Hub and other tools read it (``huggingface_hub``'s
    ``ModelCardData``): base model, dataset, license, and every labelled split's metrics as
    ``model-index`` eval results."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset, model = cfg.dataset, cfg.model
    # Hub ids where there are ones; a local or packaged dataset is named as the config names it.
    dataset_id = dataset.path if dataset.source == "hub" else dataset.name
    base_model = model.base_model or (model.path if model.source == "hub" else None)
    results = [
        EvalResult(task_type="text-classification", task_name="Text Classification",
                   dataset_type=dataset_id, dataset_name=dataset.name,
                   dataset_config=dataset.subset, dataset_split=split,
                   dataset_revision=dataset.revision, metric_type=CARD_METRICS[name][0],
                   metric_config=CARD_METRICS[name][1], metric_name=CARD_METRICS[name][2],
                   metric_value=float(value))
        for split, scores in metrics.items() if isinstance(scores, dict)
        for name, value in _scores(scores).items()
        if name in CARD_METRICS and value is not None and math.isfinite(value)]
    return ModelCardData(
        model_name=f"{model.name}-{dataset.name}", base_model=base_model, datasets=[dataset_id],
        license=model.license, library_name="transformers", pipeline_tag="text-classification",
        tags=["text-classification", dataset.name],
        metrics=sorted({result.metric_type for result in results}) or None,
        eval_results=results or None)


def model_card(cfg: PipelineConfig, manifest: dict[str, Any], pretrained: dict[str, Any],
               metrics: dict[str, Any], sections: dict[str, str]):
    """The released model's ``README.md`` as a ``huggingface_hub.ModelCard``: the metadata of
    :func:`card_metadata` in its YAML header, then use, data, training, evaluation, limits."""
    from huggingface_hub import ModelCard

    names = manifest["label_names"]
    primary = metrics["primary_split"]
    model, revision = cfg.model, f"revision {pretrained.get('revision')}"
    if model.source == "hub":
        base = f"`{model.path}` ({revision})"
    elif model.base_model:
        base = f"`{model.base_model}` ({model.source} `{model.path}`, {revision})"
    else:
        base = f"`{model.source}:{model.path}` ({revision})"
    pair = manifest.get("text_pair")
    if manifest.get("task") == "regression":
        head = "a new regression head (one score, trained with MSE loss)"
        purpose = "Scoring"
    else:
        head = f"a new classification head for {len(names)} labels ({', '.join(names)})"
        purpose = "Classifying"
    pooled_note = ("\nThe pooled head is this project's own class: `import pipeline.heads` before "
                   "loading it with transformers, or use `hf-text-pipeline predict --model "
                   "<this folder>`.\n" if cfg.head.type == "pooled" else "")
    return ModelCard(f"""---
{card_metadata(cfg, metrics).to_yaml()}
---

# {cfg.model.name} fine-tuned on {cfg.dataset.name}

A `{pretrained.get('model_type')}` sequence classifier: the pretrained body of {base}
with {head}, trained on {cfg.dataset.name}
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

{sections['per_class']}
## Limitations and bias

- Scores hold for data like the evaluation split, and only for it: other sources, eras or
  writing styles can score much lower.
- The model inherits the biases of its pretraining corpus and of the labelled data; labels
  reflect the annotators' and publishers' categories, not ground truth.
- Text past {cfg.tokenize.max_length} tokens is never seen by the model.
- Probabilities come from a softmax over logits and are not calibrated.
""")
