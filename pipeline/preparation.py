"""The download stage's data half: validate what a source holds, de-duplicate, find leakage,
carve missing splits, and write the dataset snapshot every later stage reads.

A label set inferred from the values (no ``dataset.label_names``, no source ``ClassLabel``)
would turn one stray value into an extra class, so a label with fewer than
``dataset.min_class_rows`` rows is refused; a split left empty is refused too, since the later
stages would fail on it far from the cause.

The snapshot's shape is the contract in :mod:`pipeline.contracts`; ``manifest.json`` beside the
parquet files describes what was read, removed and why.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any, Optional

import datasets

from pipeline.artifacts import atomic_dir, write_json
from pipeline.config import DatasetConfig
from pipeline.contracts import (
    IDX,
    LABEL,
    RAW_MANIFEST,
    TEXT,
    TEXT_PAIR,
    UNLABELED,
    is_labeled,
    validation_split_name,
)
from pipeline.errors import ConfigError, DataValidationError
from pipeline.sources import SourceSplit, read_source

logger = logging.getLogger(__name__)


def _label_names(cfg: DatasetConfig, splits: dict[str, SourceSplit]) -> list[str]:
    if cfg.task == "regression":
        return []
    source_names = next((s.label_names for s in splits.values() if s.label_names), None)
    if cfg.label_names:
        if source_names and list(cfg.label_names) != source_names:
            raise ConfigError(f"dataset.label_names {list(cfg.label_names)} differ from the "
                              f"label names the source declares: {source_names}")
        return list(cfg.label_names)
    if source_names:
        return source_names
    values = {v for s in splits.values() for v in s.columns.get(cfg.label_column, [])
              if v is not None and v != "" and _as_int(v) != UNLABELED}
    if values and all(_as_int(v) is not None for v in values):
        return [str(v) for v in sorted({_as_int(v) for v in values})]
    return sorted(str(v) for v in values)


def _as_int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def _encode_label(value: Any, names: list[str], inferred_ints: bool) -> Optional[int]:
    """Label id for ``value``: a label name, or an integer id; UNLABELED for -1/empty."""
    if value is None or value == "":
        return UNLABELED
    if isinstance(value, str) and value in names:
        return names.index(value)
    number = _as_int(value)
    if number == UNLABELED:
        return UNLABELED
    if number is not None:
        if inferred_ints:
            return names.index(str(number)) if str(number) in names else None
        return number if 0 <= number < len(names) else None
    return None


def _encode_score(value: Any) -> Optional[float]:
    """A regression target: a number or a numeric string; UNLABELED for a missing value."""
    if value is None or value == "":
        return float(UNLABELED)
    if isinstance(value, bool):
        return None
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return score if score == score and abs(score) != float("inf") else None


def validate_split(split: SourceSplit, cfg: DatasetConfig, names: list[str],
                   inferred_ints: bool) -> dict[str, list[Any]]:
    """Select and check the text, pair, label (and id) columns of one split.

    Returns ``{"text": [...], ["text_pair": [...]], "label": [ids or scores], ["idx": [...]]}``.

    Raises:
        DataValidationError: naming the file (and line or row) of a missing column, an empty
            or non-string text, an unknown label or non-numeric score, or a split that is only
            partly labelled.
    """
    wanted = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    required = wanted + [cfg.label_column] + ([cfg.id_column] if cfg.id_column else [])
    for column in required:
        if column not in split.columns:
            raise DataValidationError(
                f"{split.origin}: column '{column}' not found (split '{split.name}'); columns "
                f"are: {', '.join(split.columns) or 'none'} (set dataset.text_column, "
                "dataset.text_pair_column, dataset.label_column or dataset.id_column)")
    out: dict[str, list[Any]] = {}
    for column, key in zip(wanted, (TEXT, TEXT_PAIR)):
        values = split.columns[column]
        for row, value in enumerate(values):
            if not isinstance(value, str):
                kind = "missing" if value is None else f"not a string ({value!r})"
                raise DataValidationError(f"{split.where(row)}: column '{column}' is {kind}")
            if not value.strip():
                raise DataValidationError(f"{split.where(row)}: column '{column}' is empty")
        out[key] = values
    labels = []
    for row, value in enumerate(split.columns[cfg.label_column]):
        if cfg.task == "regression":
            label = _encode_score(value)
            expected = "a number (dataset.task=regression)"
        else:
            label = _encode_label(value, names, inferred_ints)
            expected = f"one of the label set [{', '.join(names)}]"
        if label is None:
            raise DataValidationError(f"{split.where(row)}: label {value!r} in column "
                                      f"'{cfg.label_column}' is not {expected}")
        labels.append(label)
    # -1 is a real score in some regression data; only a split that is all -1 (GLUE's
    # hidden STS-B test set) is unlabelled.
    if (cfg.task == "regression" and any(label != UNLABELED for label in labels)
            and all(value not in (None, "") for value in split.columns[cfg.label_column])):
        out[LABEL] = labels
        return _with_ids(out, split, cfg)
    unlabeled = sum(1 for label in labels if label == UNLABELED)
    if 0 < unlabeled < len(labels):
        row = labels.index(UNLABELED)
        raise DataValidationError(f"{split.where(row)}: row has no label in column "
                                  f"'{cfg.label_column}', but others in split '{split.name}' do")
    out[LABEL] = labels
    return _with_ids(out, split, cfg)


def _with_ids(out: dict[str, list[Any]], split: SourceSplit,
              cfg: DatasetConfig) -> dict[str, list[Any]]:
    if cfg.id_column:
        ids = split.columns[cfg.id_column]
        for row, value in enumerate(ids):
            if _as_int(value) is None:
                raise DataValidationError(f"{split.where(row)}: id {value!r} in column "
                                          f"'{cfg.id_column}' is not an integer")
        out[IDX] = [_as_int(value) for value in ids]
    return out


def _row_keys(columns: dict[str, list[Any]]) -> list[tuple[str, ...]]:
    return list(zip(*(columns[k] for k in (TEXT, TEXT_PAIR) if k in columns)))


def drop_duplicates(columns: dict[str, list[Any]]) -> tuple[dict[str, list[Any]], dict[str, int]]:
    """Keep the first of rows whose text (and pair) are identical; count label conflicts."""
    first_label: dict[tuple[str, ...], int] = {}
    keep, conflicts = [], 0
    for row, (key, label) in enumerate(zip(_row_keys(columns), columns[LABEL])):
        if key in first_label:
            conflicts += first_label[key] != label
            continue
        first_label[key] = label
        keep.append(row)
    kept = {k: [v[i] for i in keep] for k, v in columns.items()}
    removed = len(columns[LABEL]) - len(keep)
    return kept, {"duplicates_removed": removed, "duplicates_with_conflicting_labels": conflicts}


def prepare_dataset(cfg: DatasetConfig, seed: int) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Read, validate, de-duplicate and split the configured dataset.

    Returns the snapshot as a ``DatasetDict`` and a manifest describing it.
    """
    splits, provenance = read_source(cfg)
    if "train" not in splits:
        raise DataValidationError(f"{cfg.path}: no 'train' split (found {', '.join(splits)})")
    names = _label_names(cfg, splits)
    if cfg.task == "classification" and len(names) < 2:
        raise DataValidationError(f"{cfg.path}: need at least 2 labels, found {names}")
    inferred_ints = not cfg.label_names and not any(s.label_names for s in splits.values()) \
        and all(_as_int(n) is not None for n in names)
    report: dict[str, Any] = {"splits": {}}
    columns = {}
    first_rows: dict[int, str] = {}  # label id -> where one of its rows came from
    for name, split in splits.items():
        checked = validate_split(split, cfg, names, inferred_ints)
        if cfg.task == "classification":
            for row, label in enumerate(checked[LABEL]):
                if label != UNLABELED and label not in first_rows:
                    first_rows[label] = split.where(row)
        stats = {"rows_read": len(split)}
        labeled = any(label != UNLABELED for label in checked[LABEL])
        # An unlabelled split keeps every row: a submission needs a prediction for each id.
        if cfg.deduplicate and labeled:
            checked, dedup = drop_duplicates(checked)
            stats.update(dedup)
            if dedup["duplicates_removed"]:
                logger.info("%s: removed %d duplicate rows (%d with conflicting labels)", name,
                            dedup["duplicates_removed"],
                            dedup["duplicates_with_conflicting_labels"])
        columns[name] = checked
        report["splits"][name] = stats

    report["leakage"] = _handle_leakage(columns, cfg.on_leakage)
    _require_rows(columns, report)
    if cfg.task == "classification":
        _check_class_sizes(columns, names, first_rows, cfg,
                           inferred=not cfg.label_names
                           and not any(s.label_names for s in splits.values()))
    features = datasets.Features({TEXT: datasets.Value("string")})
    if cfg.text_pair_column:
        features[TEXT_PAIR] = datasets.Value("string")
    regression = cfg.task == "regression"
    features[LABEL] = datasets.Value("float32") if regression else datasets.ClassLabel(names=names)
    if cfg.id_column:
        features[IDX] = datasets.Value("int64")
    dataset = datasets.DatasetDict({name: datasets.Dataset.from_dict(cols, features=features)
                                    for name, cols in columns.items()})
    dataset, carved = _carve_missing_splits(dataset, cfg, seed)
    for name, split in dataset.items():
        entry = report["splits"].setdefault(name, {"carved_from": "train"})
        entry["rows"] = len(split)
        entry["labeled"] = is_labeled(split)
        if regression and entry["labeled"]:
            scores = list(split[LABEL])
            entry["label_range"] = [round(min(scores), 4), round(max(scores), 4)]
            entry["label_mean"] = round(sum(scores) / len(scores), 4)
        elif not regression:
            counts = Counter(split[LABEL])
            entry["label_counts"] = {names[k]: counts[k] for k in sorted(counts) if k != UNLABELED}
    report.update({
        "name": cfg.name,
        "task": cfg.task,
        "provenance": provenance.__dict__,
        "label_names": names,
        "text_pair": bool(cfg.text_pair_column),
        "validation_split": validation_split_name(list(dataset)),
        "carved_splits": carved,
        "seed": seed,
    })
    return dataset, report


def _require_rows(columns: dict[str, dict[str, list[Any]]], report: dict[str, Any]) -> None:
    """Refuse a split that de-duplication or leakage removal left without rows."""
    for name, cols in columns.items():
        if cols[LABEL]:
            continue
        stats = report["splits"][name]
        dropped = report["leakage"]["dropped_from_train"] if name == "train" else 0
        raise DataValidationError(
            f"split '{name}' is empty: of its {stats['rows_read']} rows, "
            f"{stats.get('duplicates_removed', 0)} were duplicates and {dropped} also appear in "
            "an evaluation split (dataset.on_leakage=drop); fix the source, or set "
            "dataset.on_leakage=warn")


def _check_class_sizes(columns: dict[str, dict[str, list[Any]]], names: list[str],
                       first_rows: dict[int, str], cfg: DatasetConfig, inferred: bool) -> None:
    """Log the label set with its row counts over the labelled splits; where the set was
    inferred from the values, refuse a label with fewer than ``dataset.min_class_rows`` rows.

    Raises:
        DataValidationError: naming the rarest such label, its count, one of its rows and the
            two ways out.
    """
    counts = Counter(label for cols in columns.values() for label in cols[LABEL]
                     if label != UNLABELED)
    logger.info("labels (rows over the labelled splits): %s",
                ", ".join(f"{n} {counts[i]}" for i, n in enumerate(names)))
    if not inferred:
        return
    rare = sorted((counts[i], i) for i in range(len(names)) if counts[i] < cfg.min_class_rows)
    if not rare:
        return
    count, label = rare[0]
    others = "".join(f", and label {names[i]!r} {n} row{'' if n == 1 else 's'}"
                     for n, i in rare[1:4]) + (", ..." if len(rare) > 4 else "")
    left = " once duplicates and leakage are removed" if count == 0 else ""
    scores = ("; if the labels are scores, not classes: dataset.task=regression and "
              "dataset.main_metric=pearson" if _look_like_scores(names) else "")
    raise DataValidationError(
        f"{first_rows[label]}: label {names[label]!r} has {count} row{'' if count == 1 else 's'}"
        f" over the labelled splits{left}{others} (dataset.min_class_rows={cfg.min_class_rows}):"
        " fix the row if the label is a mistake; if it is a real class, list it in "
        f"dataset.label_names or lower dataset.min_class_rows{scores}")


def _look_like_scores(names: list[str]) -> bool:
    """Labels that are all numbers, some with a fraction: a regression target read as classes
    (the task is configured, not inferred, since it decides the metrics)."""
    try:
        values = [float(name) for name in names]
    except ValueError:
        return False
    return any(not value.is_integer() for value in values)


def _handle_leakage(columns: dict[str, dict[str, list[Any]]], action: str) -> dict[str, Any]:
    """Find eval rows whose text also appears in train; drop them from train, warn, or fail."""
    train_keys = _row_keys(columns["train"])
    found: dict[str, int] = {}
    leaked: set[tuple[str, ...]] = set()
    for name, cols in columns.items():
        if name == "train":
            continue
        shared = set(_row_keys(cols)) & set(train_keys)
        if shared:
            found[name] = len(shared)
            leaked |= shared
    if not leaked:
        return {"shared_with_train": {}, "action": action, "dropped_from_train": 0}
    example = next(iter(leaked))[0][:80]
    message = (f"{sum(found.values())} texts appear in train and in "
               f"{', '.join(f'{k} ({v})' for k, v in found.items())}, e.g. {example!r}")
    if action == "error":
        raise DataValidationError(f"leakage: {message} (dataset.on_leakage=error)")
    dropped = 0
    if action == "drop":
        keep = [i for i, key in enumerate(train_keys) if key not in leaked]
        dropped = len(train_keys) - len(keep)
        columns["train"] = {k: [v[i] for i in keep] for k, v in columns["train"].items()}
    logger.warning("leakage: %s; %s", message,
                   f"dropped {dropped} rows from train" if action == "drop" else "kept (warn)")
    return {"shared_with_train": found, "action": action, "dropped_from_train": dropped}


def _carve_missing_splits(dataset: datasets.DatasetDict, cfg: DatasetConfig,
                          seed: int) -> tuple[datasets.DatasetDict, list[str]]:
    """Make validation and test splits from train, stratified by label, where the source has
    none."""
    carved = []
    train = dataset["train"]
    need_test = not any(name.startswith("test") for name in dataset)
    need_validation = validation_split_name(list(dataset)) is None
    if need_test:
        train, dataset["test"] = _stratified_split(train, cfg.test_size, seed, cfg.task)
        carved.append("test")
    if need_validation:
        # The fraction is of the original train split, whether or not test was carved first.
        fraction = cfg.validation_size / (1 - cfg.test_size) if need_test else cfg.validation_size
        train, dataset["validation"] = _stratified_split(train, fraction, seed, cfg.task)
        carved.append("validation")
    dataset["train"] = train
    return dataset, carved


def _stratified_split(split: datasets.Dataset, fraction: float, seed: int,
                      task: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    parts = None
    if task != "regression":
        try:
            parts = split.train_test_split(test_size=fraction, stratify_by_column=LABEL,
                                           seed=seed)
        except ValueError as exc:
            logger.warning("stratified split impossible (%s); splitting without stratification",
                           exc)
    if parts is None:
        try:
            parts = split.train_test_split(test_size=fraction, seed=seed)
        except ValueError:
            rows = f"{len(split)} row{'' if len(split) == 1 else 's'}"
            raise DataValidationError(
                f"split 'train' has {rows} left, too few to carve a validation or test split "
                "(dataset.validation_size, dataset.test_size) and keep rows to train on: add "
                "rows, or give the source validation and test splits") from None
    return parts["train"], parts["test"]


def save_snapshot(dataset: datasets.DatasetDict, manifest: dict[str, Any], out_dir: str) -> None:
    """Write one parquet file per split (with HF features metadata) and the manifest, atomically."""
    with atomic_dir(out_dir) as tmp:
        for name, split in dataset.items():
            split.to_parquet(str(tmp / f"{name}.parquet"))
        write_json(tmp / RAW_MANIFEST, manifest)


def prepare_and_save(cfg: DatasetConfig, seed: int, out_dir: str) -> dict[str, Any]:
    """Download stage, data half: build the snapshot of ``cfg`` in ``out_dir``; returns the
    manifest."""
    dataset, manifest = prepare_dataset(cfg, seed)
    for name, split in dataset.items():
        stats = manifest["splits"][name]
        logger.info("split %-22s %6d rows%s", name, len(split),
                    "" if stats["labeled"] else " (no labels)")
    save_snapshot(dataset, manifest, out_dir)
    return manifest
