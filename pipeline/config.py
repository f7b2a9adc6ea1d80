"""Typed views of the resolved configuration (params.yaml).

Each section of the config gets a frozen dataclass. ``load_section`` merges the section into its
schema, so a typo'd key, a wrong type or an invalid value fails at start-up with a
:class:`ConfigError` naming the key, instead of deep inside a library mid-run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError

SOURCES = ("hub", "local", "package")
LOCAL_FORMATS = ("csv", "tsv", "jsonl", "parquet", "folders")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TASKS = ("classification", "regression")
CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")
STRATEGIES = ("finetune", "head_only", "two_phase")
HEADS = ("auto", "pooled")
POOLINGS = ("cls", "mean")


def _check_choice(section: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(choices)}")


def _check_fraction(section: str, key: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{section}.{key}={value} must be a fraction between 0 and 1")


@dataclass(frozen=True)
class PathsConfig:
    raw_dir: str = "data/raw"
    checkpoint_dir: str = "data/checkpoint"
    tokenized_dir: str = "data/tokenized"
    model_dir: str = "models/model"
    history_path: str = "models/train_history.json"
    metrics_path: str = "metrics/metrics.json"
    predictions_dir: str = "metrics/predictions"
    confusion_path: str = "metrics/confusion.csv"
    report_dir: str = "reports"
    release_dir: str = "models/release"
    checkpoints_root: str = "checkpoints"


@dataclass(frozen=True)
class DatasetConfig:
    """Where the data comes from and which columns hold texts and labels.

    ``path`` is a Hub dataset id (source=hub), a file or folder (source=local), or
    ``<import name>/<folder inside the package>`` (source=package). ``revision`` pins a Hub
    commit, or the installed version of a package. ``task`` is classification (labels are names
    or ids) or regression (labels are numbers, like GLUE STS-B's similarity scores). ``metrics``
    lists what evaluation reports (null: the task's usual set); ``id_column`` and
    ``submission_name`` let unlabelled test splits be written as GLUE submission files.
    """

    name: str = "???"
    source: str = "hub"
    path: str = "???"
    subset: Optional[str] = None
    revision: Optional[str] = None
    format: Optional[str] = None
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    label_names: Optional[list[str]] = None
    task: str = "classification"
    main_metric: str = "accuracy"
    metrics: Optional[list[str]] = None
    id_column: Optional[str] = None
    submission_name: Optional[str] = None
    submission_labels: str = "ids"
    validation_size: float = 0.1
    test_size: float = 0.1
    deduplicate: bool = True
    on_leakage: str = "drop"

    def __post_init__(self) -> None:
        _check_choice("dataset", "source", self.source, SOURCES)
        if self.format is not None:
            _check_choice("dataset", "format", self.format, LOCAL_FORMATS)
        if self.source == "local" and self.format is None:
            raise ConfigError("dataset.format must be set for a local source "
                              f"(one of {', '.join(LOCAL_FORMATS)})")
        _check_choice("dataset", "on_leakage", self.on_leakage, ("drop", "warn", "error"))
        _check_choice("dataset", "task", self.task, TASKS)
        known = REGRESSION_METRICS if self.task == "regression" else CLASSIFICATION_METRICS
        _check_choice("dataset", "main_metric", self.main_metric, known)
        for metric in self.metrics or []:
            _check_choice("dataset", "metrics", metric, known)
        if self.metrics and self.main_metric not in self.metrics:
            raise ConfigError(f"dataset.main_metric={self.main_metric} is not in dataset.metrics "
                              f"{list(self.metrics)}")
        _check_choice("dataset", "submission_labels", self.submission_labels, ("ids", "names"))
        if self.task == "regression" and self.label_names:
            raise ConfigError("dataset.label_names must be null for a regression task")
        _check_fraction("dataset", "validation_size", self.validation_size)
        _check_fraction("dataset", "test_size", self.test_size)
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            raise ConfigError(f"dataset.label_names has repeated names: {self.label_names}")


@dataclass(frozen=True)
class ModelConfig:
    """A pretrained checkpoint: Hub id, local folder, or ``<import name>/<folder>`` of a package."""

    name: str = "???"
    source: str = "hub"
    path: str = "???"
    revision: Optional[str] = None

    def __post_init__(self) -> None:
        _check_choice("model", "source", self.source, SOURCES)


@dataclass(frozen=True)
class HeadConfig:
    """The task head on the pretrained body.

    ``auto``: the checkpoint's own ``...ForSequenceClassification`` head. ``pooled``: a head on
    the headless ``AutoModel``: pool the last hidden states (``cls`` token or ``mean`` over the
    attention mask), then ``hidden_sizes`` dense layers (GELU) with ``dropout``, then the output.
    """

    type: str = "auto"
    pooling: str = "cls"
    hidden_sizes: list[int] = field(default_factory=list)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _check_choice("head", "type", self.type, HEADS)
        _check_choice("head", "pooling", self.pooling, POOLINGS)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head.dropout={self.dropout} must be in [0, 1)")
        if any(size < 1 for size in self.hidden_sizes):
            raise ConfigError(f"head.hidden_sizes={list(self.hidden_sizes)} must be positive")


@dataclass(frozen=True)
class TokenizeConfig:
    max_length: int = 128

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"tokenize.max_length={self.max_length} is too short (minimum 8)")


@dataclass(frozen=True)
class TrainConfig:
    """Trainer settings. ``strategy``: ``finetune`` trains every weight; ``head_only`` freezes
    the pretrained body and trains only the new head (transfer learning); ``two_phase`` trains
    the head alone for ``head_epochs`` at ``head_learning_rate``, then everything for
    ``num_train_epochs`` at ``learning_rate``."""

    strategy: str = "finetune"
    learning_rate: float = 5e-5
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"
    logging_steps: int = 10
    precision: str = "auto"
    metric_for_best_model: Optional[str] = None
    save_total_limit: int = 2
    keep_checkpoints: bool = False
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    head_learning_rate: float = 1e-3
    head_epochs: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("train", "strategy", self.strategy, STRATEGIES)
        _check_choice("train", "precision", self.precision, PRECISIONS)
        for key in ("learning_rate", "head_learning_rate", "head_epochs"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be positive")
        if not 0.0 <= self.warmup_ratio < 1.0:
            # transformers reads warmup_steps >= 1 as a step count, so a typo would go unnoticed
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.num_train_epochs <= 0:
            raise ConfigError(f"train.num_train_epochs={self.num_train_epochs} must be positive")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "logging_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be at least 1")


@dataclass(frozen=True)
class EvalConfig:
    primary_split: str = "test"


@dataclass(frozen=True)
class TrackingConfig:
    experiment_name: str = "default"
    log_model: bool = True


@dataclass(frozen=True)
class RuntimeConfig:
    num_proc: int = 1


@dataclass(frozen=True)
class PipelineConfig:
    """The whole resolved config, as every stage sees it."""

    seed: int = 42
    paths: PathsConfig = field(default_factory=PathsConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


T = TypeVar("T")


def _schema_keys(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def load_section(cfg: DictConfig, key: str, schema: type[T]) -> T:
    """Validate ``cfg[key]`` against ``schema`` and return it as a frozen dataclass.

    Raises:
        ConfigError: the section is missing, has an unknown key, a value of the wrong type, a
            missing required value, or a value its schema rejects.
    """
    if key not in cfg:
        raise ConfigError(f"config has no '{key}' section")
    section = cfg[key]
    if not isinstance(section, DictConfig):
        raise ConfigError(f"config '{key}' must be a mapping, got {section!r}")
    unknown = [k for k in section.keys() if k not in _schema_keys(schema)]
    if unknown:
        raise ConfigError(f"unknown key '{key}.{unknown[0]}'; valid keys of '{key}': "
                          f"{', '.join(_schema_keys(schema))}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), section)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        full_key = getattr(exc, "full_key", None) or "?"
        message = str(exc).splitlines()[0]
        raise ConfigError(f"invalid value for '{key}.{full_key}': {message}") from None


_SECTIONS: dict[str, type] = {
    "paths": PathsConfig,
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "head": HeadConfig,
    "tokenize": TokenizeConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "tracking": TrackingConfig,
    "runtime": RuntimeConfig,
}


def load_config(cfg: DictConfig) -> PipelineConfig:
    """Validate every section of a resolved config (params.yaml plus command-line overrides)."""
    unknown = [k for k in cfg.keys() if k != "seed" and k not in _SECTIONS]
    if unknown:
        raise ConfigError(f"unknown top-level key '{unknown[0]}'; valid keys: seed, "
                          f"{', '.join(_SECTIONS)}")
    seed = cfg.get("seed", 42)
    if not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer")
    sections = {name: load_section(cfg, name, schema) for name, schema in _SECTIONS.items()}
    return PipelineConfig(seed=seed, **sections)


def to_flat_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """``{"train.learning_rate": 1e-4, ...}``: the resolved config as MLflow params."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                visit(f"{prefix}{f.name}.", getattr(value, f.name))
        else:
            flat[prefix[:-1]] = value

    visit("", cfg)
    return flat
