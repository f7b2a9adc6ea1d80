"""Typed views of the resolved configuration (params.yaml).

Each section of the config gets a frozen dataclass that validates it. The values themselves live
in ``conf/`` alone: the dataclasses declare no defaults, so the schema and the configs cannot
disagree, and a key that ``conf/`` does not set is a one-line error naming it. ``load_section``
merges a section into its schema, so a typo'd key, a wrong type or an invalid value fails at
start-up with a :class:`ConfigError` naming the key, instead of deep inside a library mid-run.

Some keys belong to one option only (the pooled head's settings, the two-phase strategy's head
phase): they are declared with ``only_for`` and appear in ``conf/`` only in that option's file,
so under another option they are absent from params.yaml and cannot invalidate a DVC stage.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError

SOURCES = ("hub", "local", "package")
LOCAL_FORMATS = ("csv", "tsv", "jsonl", "parquet", "folders")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Inference has no fp16 (no GradScaler to guard it): auto, bf16 autocast, or full fp32.
INFERENCE_PRECISIONS = ("auto", "bf16", "fp32")
# How training batches are drawn: rows of similar length together (little padding), or at random.
SAMPLINGS = ("group_by_length", "random")
TASKS = ("classification", "regression")
CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")
STRATEGIES = ("finetune", "head_only", "two_phase")
HEADS = ("auto", "pooled")
POOLINGS = ("cls", "mean")
# Which of the Trainer's checkpoints a train run logs to MLflow (pipeline/checkpoints.py).
LOG_CHECKPOINTS = ("none", "best", "all")


def only_for(key: str, value: str) -> Any:
    """A key that exists only when ``key`` (of the same section) is ``value``; absent otherwise.

    ``conf/`` sets it in that option's file; :func:`load_section` refuses it under any other.
    """
    return field(default=None, metadata={"only_for": (key, value)})


def _check_choice(section: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(choices)}")


def _check_fraction(section: str, key: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{section}.{key}={value} must be a fraction between 0 and 1")


@dataclass(frozen=True)
class PathsConfig:
    """Every path a stage reads or writes, relative to the project root (dvc.yaml uses them)."""

    raw_dir: str
    pretrained_dir: str
    tokenized_dir: str
    model_dir: str
    history_path: str
    curves_dir: str
    metrics_path: str
    predictions_dir: str
    confusion_path: str
    report_dir: str
    release_dir: str
    trainer_checkpoints_dir: str


@dataclass(frozen=True)
class DatasetConfig:
    """Where the data comes from and which columns hold texts and labels.

    ``path`` is a Hub dataset id (source=hub), a file or folder (source=local), or
    ``<import name>/<folder inside the package>`` (source=package). ``revision`` pins a Hub
    commit, or the installed version of a package. ``task`` is classification (labels are names
    or ids) or regression (labels are numbers, like GLUE STS-B's similarity scores). ``metrics``
    lists what evaluation reports (null: the task's usual set); ``id_column`` and
    ``submission_name`` let unlabelled test splits be written as GLUE submission files.
    ``encoding`` is that of local text files (the reader checks it: it must be ASCII-compatible).
    ``min_class_rows``: a label inferred from the data (not in ``label_names``, not declared by
    the source) with fewer rows over the labelled splits is refused as a probable stray value.
    """

    name: str
    source: str
    path: str
    subset: Optional[str]
    revision: Optional[str]
    format: Optional[str]
    text_column: str
    text_pair_column: Optional[str]
    label_column: str
    label_names: Optional[list[str]]
    task: str
    main_metric: str
    metrics: Optional[list[str]]
    id_column: Optional[str]
    submission_name: Optional[str]
    submission_labels: str
    validation_size: float
    test_size: float
    deduplicate: bool
    on_leakage: str
    encoding: str
    min_class_rows: int

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
        if self.min_class_rows < 0:
            raise ConfigError(f"dataset.min_class_rows={self.min_class_rows} must be 0 or more "
                              "(0 turns the check off)")


@dataclass(frozen=True)
class ModelConfig:
    """A pretrained checkpoint: Hub id, local folder, or ``<import name>/<folder>`` of a package.

    ``base_model`` and ``license`` are what the model card's metadata says the fine-tuned model
    comes from and inherits: the checkpoint's Hub id (null: ``path`` for a Hub source, unknown
    otherwise) and its license id on the Hub (``apache-2.0``, ``mit``; null: unknown).
    """

    name: str
    source: str
    path: str
    revision: Optional[str]
    base_model: Optional[str]
    license: Optional[str]

    def __post_init__(self) -> None:
        _check_choice("model", "source", self.source, SOURCES)


@dataclass(frozen=True)
class HeadConfig:
    """The task head on the pretrained body.

    ``auto``: the checkpoint's own ``...ForSequenceClassification`` head. ``pooled``: a head on
    the headless ``AutoModel``: pool the last hidden states (``cls`` token or ``mean`` over the
    attention mask), then ``hidden_sizes`` dense layers (GELU) with ``dropout``, then the output.
    """

    type: str
    pooling: Optional[str] = only_for("type", "pooled")
    hidden_sizes: Optional[list[int]] = only_for("type", "pooled")
    dropout: Optional[float] = only_for("type", "pooled")

    def __post_init__(self) -> None:
        _check_choice("head", "type", self.type, HEADS)
        if self.type != "pooled":
            return
        _check_choice("head", "pooling", self.pooling, POOLINGS)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head.dropout={self.dropout} must be in [0, 1)")
        if any(size < 1 for size in self.hidden_sizes):
            raise ConfigError(f"head.hidden_sizes={list(self.hidden_sizes)} must be positive")


@dataclass(frozen=True)
class TokenizeConfig:
    max_length: int

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"tokenize.max_length={self.max_length} is too short (minimum 8)")


# transformers' schedulers that need no ``lr_scheduler_kwargs`` (TrainConfig passes none). Kept
# here so loading a config needs no transformers import; a unit test checks each against
# ``transformers.get_scheduler`` so the list cannot drift from the installed version.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau")
CLASS_WEIGHTS = ("none", "balanced")
_INF = float("inf")


def _check_positive(section: str, key: str, value: float) -> None:
    """Finite and above zero. NaN compares false with everything, so ``value <= 0`` alone lets
    it through, to fail (or train on NaN) deep inside the Trainer."""
    if not 0 < value < _INF:
        raise ConfigError(f"{section}.{key}={value} must be a finite number above 0")


@dataclass(frozen=True)
class TrainConfig:
    """Trainer settings that decide what model comes out. ``strategy``: ``finetune`` trains every
    weight; ``head_only`` freezes the pretrained body and trains only the new head (transfer
    learning); ``two_phase`` trains the head alone for ``head_epochs`` at
    ``head_learning_rate``, then everything for ``num_train_epochs`` at ``learning_rate``.
    ``class_weights``: ``none``, or ``balanced`` to weight each class's cross-entropy by
    n_samples / (n_classes * count) over the training split (classification only).
    ``layer_lr_decay``: layer-wise rate decay; the head trains at ``learning_rate``, the top
    encoder layer at ``learning_rate * layer_lr_decay``, each layer below at one more factor, the
    embeddings at the lowest (1: one rate for every weight).
    ``resume_from``: a checkpoint a train run logged to MLflow (``runs:/<run id>/checkpoints/
    <name>``) to continue that same training from, on any machine that reaches the run.

    Every value the Trainer would reject, or accept and then train nonsense with (NaN or
    infinite rates and epochs, a cap of zero rows), is refused here, at load time, naming the key.
    """

    strategy: str
    learning_rate: float
    num_train_epochs: float
    per_device_train_batch_size: int
    weight_decay: float
    warmup_ratio: float
    lr_scheduler_type: str
    logging_steps: int
    precision: str
    sampling: str
    metric_for_best_model: Optional[str]
    max_train_samples: Optional[int]
    max_eval_samples: Optional[int]
    class_weights: str
    layer_lr_decay: float
    resume_from: Optional[str]
    head_learning_rate: Optional[float] = only_for("strategy", "two_phase")
    head_epochs: Optional[float] = only_for("strategy", "two_phase")

    def __post_init__(self) -> None:
        _check_choice("train", "strategy", self.strategy, STRATEGIES)
        _check_choice("train", "precision", self.precision, PRECISIONS)
        _check_choice("train", "sampling", self.sampling, SAMPLINGS)
        _check_choice("train", "lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        _check_choice("train", "class_weights", self.class_weights, CLASS_WEIGHTS)
        positive = ["learning_rate", "num_train_epochs"] + (
            ["head_learning_rate", "head_epochs"] if self.strategy == "two_phase" else [])
        for key in positive:
            _check_positive("train", key, getattr(self, key))
        if not 0 <= self.weight_decay < _INF:
            raise ConfigError(f"train.weight_decay={self.weight_decay} must be a finite number, "
                              "0 or more")
        if not 0 < self.layer_lr_decay <= 1:
            raise ConfigError(f"train.layer_lr_decay={self.layer_lr_decay} must be in (0, 1]; "
                              "1 trains every layer at train.learning_rate")
        if not 0.0 <= self.warmup_ratio < 1.0:
            # transformers reads warmup_steps >= 1 as a step count, so a typo would go unnoticed
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        for key in ("per_device_train_batch_size", "logging_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be at least 1")
        for key in ("max_train_samples", "max_eval_samples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be at least 1, or null "
                                  "for every row")
        if self.resume_from is not None and not re.fullmatch(
                r"runs:/[^/]+/checkpoints/\S+", self.resume_from):
            raise ConfigError(f"train.resume_from={self.resume_from} must be a checkpoint a run "
                              "logged, runs:/<run id>/checkpoints/<name>, or null")


@dataclass(frozen=True)
class EvalConfig:
    """``primary_split``: the split whose confusion matrix and headline metrics the report shows.
    ``quantize``: evaluate with int8 linear layers (dynamic quantization, CPU only) and report
    what that costs on the primary split against fp32. ``precision``: ``auto`` (bf16 autocast
    where the device computes bf16 natively, else fp32), ``bf16`` or ``fp32``."""

    primary_split: str
    quantize: bool
    precision: str

    def __post_init__(self) -> None:
        _check_choice("eval", "precision", self.precision, INFERENCE_PRECISIONS)
        if self.quantize and self.precision == "bf16":
            raise ConfigError("eval.quantize=true runs the linear layers in int8 and the rest in "
                              "fp32: set eval.precision to auto or fp32")


@dataclass(frozen=True)
class TrackingConfig:
    """``log_sweep_models``: every sweep job logs its model, not only the sweep's best job;
    ``system_metrics``: MLflow samples CPU, memory, disk, network (and GPU) use into each run;
    ``log_checkpoints``: which Trainer checkpoints the train run logs (``none``, ``best``,
    ``all``); ``registered_model``: the model registry name train registers its model under
    (null: none); ``http_*``: the bounds of one request to a tracking server (seconds for
    ``http_timeout``); ``pending_dir``: where runs are recorded while the server is unreachable."""

    experiment_name: str
    log_model: bool
    log_sweep_models: bool
    system_metrics: bool
    log_checkpoints: str
    registered_model: Optional[str]
    http_max_retries: int
    http_backoff_factor: int
    http_timeout: int
    pending_dir: str

    def __post_init__(self) -> None:
        if self.http_max_retries < 0 or self.http_backoff_factor < 0 or self.http_timeout < 1:
            raise ConfigError(f"tracking.http_max_retries={self.http_max_retries} and "
                              f"http_backoff_factor={self.http_backoff_factor} must be >= 0, "
                              f"http_timeout={self.http_timeout} >= 1")
        _check_choice("tracking", "log_checkpoints", self.log_checkpoints, LOG_CHECKPOINTS)
        name = self.registered_model
        if name is not None and (not name.strip() or any(c in name for c in "/:@")):
            # MLflow refuses '/' and ':'; '@' would end the name in models:/<name>@champion.
            raise ConfigError(f"tracking.registered_model={name!r} must be a name without '/', "
                              "':' or '@', or null to register nothing")


@dataclass(frozen=True)
class RuntimeConfig:
    """How stages run, never what they produce: no stage lists these in dvc.yaml, so changing
    one re-runs nothing. ``num_proc``: tokenize processes, or ``auto`` to let the split's size
    and the machine's cores decide (pipeline.tokenization.tokenize_processes);
    ``eval_batch_size``: batch of every evaluation pass; ``save_total_limit``/
    ``keep_checkpoints``: the Trainer's resumable checkpoints on disk (the best one is always
    kept while training)."""

    num_proc: Union[int, str]
    eval_batch_size: int
    save_total_limit: int
    keep_checkpoints: bool

    def __post_init__(self) -> None:
        if self.num_proc != "auto" and (not isinstance(self.num_proc, int) or self.num_proc < 1):
            raise ConfigError(f"runtime.num_proc={self.num_proc!r} must be auto or a number of "
                              "processes, at least 1")
        for key in ("eval_batch_size", "save_total_limit"):
            if getattr(self, key) < 1:
                raise ConfigError(f"runtime.{key}={getattr(self, key)} must be at least 1")


@dataclass(frozen=True)
class PipelineConfig:
    """The whole resolved config, as every stage sees it."""

    seed: int
    paths: PathsConfig
    dataset: DatasetConfig
    model: ModelConfig
    head: HeadConfig
    tokenize: TokenizeConfig
    train: TrainConfig
    eval: EvalConfig
    tracking: TrackingConfig
    runtime: RuntimeConfig


# Section name -> its dataclass, in PipelineConfig's order (seed is a plain value).
SECTIONS: dict[str, type] = {name: kind for name, kind
                             in typing.get_type_hints(PipelineConfig).items() if name != "seed"}
# Sections no stage lists in dvc.yaml: they never change an output (paths are deps and outs).
UNTRACKED_SECTIONS = ("paths", "tracking", "runtime")

T = TypeVar("T")


def schema_keys(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def applicable_keys(schema: type, section: dict[str, Any]) -> list[str]:
    """The keys of ``schema`` that apply to ``section``'s chosen options."""
    keys = []
    for f in dataclasses.fields(schema):
        condition = f.metadata.get("only_for")
        if condition is None or section.get(condition[0]) == condition[1]:
            keys.append(f.name)
    return keys


def load_section(cfg: DictConfig, key: str, schema: type[T]) -> T:
    """Validate ``cfg[key]`` against ``schema`` and return it as a frozen dataclass.

    Raises:
        ConfigError: the section is missing, has an unknown key, a key its chosen option does
            not take, a value of the wrong type, a missing value, or a value its schema rejects.
    """
    if key not in cfg:
        raise ConfigError(f"config has no '{key}' section")
    section = cfg[key]
    if not isinstance(section, DictConfig):
        raise ConfigError(f"config '{key}' must be a mapping, got {section!r}")
    unknown = [k for k in section if k not in schema_keys(schema)]
    if unknown:
        raise ConfigError(f"unknown key '{key}.{unknown[0]}'; valid keys of '{key}': "
                          f"{', '.join(schema_keys(schema))}")
    for f in dataclasses.fields(schema):
        condition = f.metadata.get("only_for")
        if OmegaConf.is_missing(section, f.name):
            raise ConfigError(f"'{key}.{f.name}' has no value (??? in conf/): set it, e.g. "
                              f"`dvc exp run -S {key}.{f.name}=<value>`")
        if condition is None:
            if f.name not in section:
                raise ConfigError(f"missing key '{key}.{f.name}' (conf/ sets every key; is "
                                  "params.yaml out of date? run `dvc exp run`)")
            continue
        option, wanted = condition
        chosen = section.get(option)
        if chosen == wanted and f.name not in section:
            raise ConfigError(f"{key}.{option}={wanted} needs '{key}.{f.name}': choose the option "
                              f"as a group, `dvc exp run -S {_group_of(key, option)}={wanted}`, "
                              "which sets it")
        if chosen != wanted and f.name in section:
            raise ConfigError(f"'{key}.{f.name}' applies only to {key}.{option}={wanted}, not "
                              f"{chosen}: drop it, or `dvc exp run -S "
                              f"{_group_of(key, option)}={wanted}`")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), section)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        full_key = getattr(exc, "full_key", None) or "?"
        message = str(exc).splitlines()[0]
        raise ConfigError(f"invalid value for '{key}.{full_key}': {message}") from None


def _group_of(section: str, option: str) -> str:
    """The conf/ group that chooses ``section.option`` (see conf/config.yaml)."""
    return {("head", "type"): "head", ("train", "strategy"): "strategy"}.get(
        (section, option), f"{section}.{option}")


def load_config(cfg: DictConfig) -> PipelineConfig:
    """Validate every section of a resolved config (params.yaml plus command-line overrides)."""
    unknown = [k for k in cfg if k != "seed" and k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown top-level key '{unknown[0]}'; valid keys: seed, "
                          f"{', '.join(SECTIONS)}")
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed={seed!r} must be an integer")
    sections = {name: load_section(cfg, name, schema) for name, schema in SECTIONS.items()}
    return PipelineConfig(seed=seed, **sections)


class UndeclaredParamError(RuntimeError):
    """A stage read a config value it does not declare: a bug in the stage, not a user error,
    since DVC would not re-run the stage when that value changes."""


def declared_view(cfg: PipelineConfig, stage: str, params: Sequence[str]) -> PipelineConfig:
    """``cfg`` as stage ``stage`` may read it: the sections and keys in ``params`` (the stage's
    ``params`` in dvc.yaml) plus the untracked sections; reading anything else raises
    :class:`UndeclaredParamError`. :func:`unguarded` gives the whole config back, for records."""
    readable_keys: dict[str, set[str]] = {}
    for param in params:
        section, _, key = param.partition(".")
        readable_keys.setdefault(section, set()).add(key)
    sections = {}
    for name in SECTIONS:
        value = getattr(cfg, name)
        keys = readable_keys.get(name, set())
        if name in UNTRACKED_SECTIONS or "" in keys:
            sections[name] = value
        else:
            sections[name] = _guard(value, stage, keys, f"{name}.")
    view = _guard(PipelineConfig(seed=cfg.seed, **sections), stage,
                  {"seed", *SECTIONS} if "seed" in readable_keys else set(SECTIONS), "")
    object.__setattr__(view, "_unguarded", cfg)
    return view


def unguarded(cfg: PipelineConfig) -> PipelineConfig:
    """The whole config behind a :func:`declared_view` (tracking records every value)."""
    try:
        return object.__getattribute__(cfg, "_unguarded")
    except AttributeError:
        return cfg


_GUARDED_CLASSES: dict[type, type] = {}


def _guard(section: Any, stage: str, readable: set[str], prefix: str) -> Any:
    cls = type(section)
    if cls not in _GUARDED_CLASSES:
        names = frozenset(schema_keys(cls))

        def __getattribute__(self, name):  # noqa: N807 - the dunder being defined
            if name in names and name not in object.__getattribute__(self, "_readable"):
                where = object.__getattribute__(self, "_where")
                raise UndeclaredParamError(
                    f"stage '{where[0]}' reads {where[1]}{name}, which it does not declare: add "
                    f"it to PARAMS in stages/{where[0]}.py and to the stage's params in dvc.yaml")
            return object.__getattribute__(self, name)

        _GUARDED_CLASSES[cls] = type(f"Declared{cls.__name__}", (cls,),
                                     {"__getattribute__": __getattribute__})
    guarded = object.__new__(_GUARDED_CLASSES[cls])
    guarded.__dict__.update(section.__dict__)
    object.__setattr__(guarded, "_readable", frozenset(readable))
    object.__setattr__(guarded, "_where", (stage, prefix))
    return guarded


def to_flat_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """``{"train.learning_rate": 1e-4, ...}``: the resolved config as MLflow params (keys that
    do not apply to the chosen options left out)."""
    flat: dict[str, Any] = {}
    for prefix, section in to_nested_dict(cfg).items():
        if isinstance(section, dict):
            flat.update({f"{prefix}.{key}": value for key, value in section.items()})
        else:
            flat[prefix] = section
    return flat


def to_nested_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """The resolved config as params.yaml holds it: loadable as one to reproduce a run."""
    full = unguarded(cfg)
    nested: dict[str, Any] = {"seed": full.seed}
    for name, schema in SECTIONS.items():
        values = dataclasses.asdict(getattr(full, name))
        nested[name] = {key: values[key] for key in applicable_keys(schema, values)}
    return nested
