"""Reading, validating, de-duplicating and splitting dataset sources."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import datasets
import pytest

from pipeline.config import DatasetConfig
from pipeline.contracts import load_raw_manifest, load_snapshot
from pipeline.errors import ConfigError, DataValidationError
from pipeline.preparation import drop_duplicates, prepare_and_save, prepare_dataset
from pipeline.sources import resolve_package_path
from support import config_section


def local(path: Path, fmt: str, **overrides) -> DatasetConfig:
    return config_section("dataset", name="t", source="local", path=str(path), format=fmt,
                          **overrides)


def write_tsv(path: Path, rows: list[str], header: str = "sentence1\tsentence2\tlabel") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def pairs_cfg(path: Path, **overrides) -> DatasetConfig:
    return local(path, "tsv", **{"text_column": "sentence1", "text_pair_column": "sentence2",
                                 "label_names": ["no", "yes"], **overrides})


def test_tsv_is_read_with_quoting_off(tmp_path):
    # Unbalanced quotes, as in GLUE MRPC: a quoting reader would swallow the following rows.
    rows = [f'" he said {i}\tthe other " text {i}\t{i % 2}' for i in range(20)]
    write_tsv(tmp_path / "train.tsv", rows)
    dataset, manifest = prepare_dataset(pairs_cfg(tmp_path), seed=0)
    texts = sorted(t for split in dataset.values() for t in split["text"])
    assert len(texts) == 20
    assert '" he said 0' in texts
    assert set(dataset["train"].column_names) == {"text", "text_pair", "label"}
    assert manifest["carved_splits"] == ["test", "validation"]


def test_malformed_tsv_row_names_file_and_line(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", ["a\tb\t1", "c\td\t0", "only two\t1", "e\tf\t1"])
    with pytest.raises(DataValidationError,
                       match=rf"{path}:4: malformed row: expected 3 tab-separated fields"):
        prepare_dataset(pairs_cfg(tmp_path), seed=0)


def test_missing_column_names_file_and_columns(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", ["a\t1"], header="sentence1\tlabel")
    with pytest.raises(DataValidationError) as error:
        prepare_dataset(pairs_cfg(tmp_path), seed=0)
    message = str(error.value)
    assert str(path) in message and "'sentence2' not found" in message
    assert "columns are: sentence1, label" in message


def test_empty_text_names_file_and_line(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", ["a\tb\t1", "  \td\t0"])
    with pytest.raises(DataValidationError, match=rf"{path}:3: column 'sentence1' is empty"):
        prepare_dataset(pairs_cfg(tmp_path), seed=0)


def test_unknown_label_names_value_and_label_set(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine", "label": "yes"}\n{"text": "odd", "label": "maybe"}\n')
    cfg = local(path, "jsonl", label_names=["no", "yes"])
    with pytest.raises(DataValidationError,
                       match=rf"{path}:2: label 'maybe' .* not one of the label set "
                             r"\[no, yes\]"):
        prepare_dataset(cfg, seed=0)


def test_integer_label_out_of_range_is_rejected(tmp_path):
    write_tsv(tmp_path / "train.tsv", ["a\tb\t1", "c\td\t2"])
    with pytest.raises(DataValidationError, match=r"train.tsv:3: label '2'"):
        prepare_dataset(pairs_cfg(tmp_path), seed=0)


def test_invalid_json_line_is_located(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1\n')
    with pytest.raises(DataValidationError, match=rf"{path}:2: invalid JSON"):
        prepare_dataset(local(path, "jsonl"), seed=0)


def test_duplicates_are_removed_and_conflicts_counted():
    columns = {"text": ["a", "b", "a", "a", "c"], "label": [0, 1, 0, 1, 0]}
    kept, stats = drop_duplicates(columns)
    assert kept == {"text": ["a", "b", "c"], "label": [0, 1, 0]}
    assert stats == {"duplicates_removed": 2, "duplicates_with_conflicting_labels": 1}


def test_pairs_are_duplicates_only_when_both_texts_match():
    columns = {"text": ["a", "a"], "text_pair": ["x", "y"], "label": [0, 1]}
    kept, stats = drop_duplicates(columns)
    assert stats["duplicates_removed"] == 0 and kept == columns


def _jsonl_splits(root: Path, splits: dict[str, list[tuple[str, str]]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (root / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return root


def test_leakage_is_dropped_from_train_and_reported(tmp_path):
    root = _jsonl_splits(tmp_path, {
        "train": [("shared", "a"), ("only train", "b"), ("x", "a"), ("y", "b")],
        "validation": [("shared", "a"), ("val", "b")],
        "test": [("t1", "a"), ("t2", "b")],
    })
    dataset, manifest = prepare_dataset(local(root, "jsonl"), seed=0)
    assert "shared" not in list(dataset["train"]["text"])
    assert manifest["leakage"] == {"shared_with_train": {"validation": 1}, "action": "drop",
                                   "dropped_from_train": 1}


def test_leakage_can_be_an_error(tmp_path):
    root = _jsonl_splits(tmp_path, {"train": [("shared", "a"), ("b", "b")],
                                    "validation": [("shared", "a"), ("c", "b")]})
    with pytest.raises(DataValidationError,
                       match="leakage: 1 texts appear in train and in validation"):
        prepare_dataset(local(root, "jsonl", on_leakage="error"), seed=0)


def test_missing_splits_are_carved_stratified_and_deterministically(tmp_path):
    rows = [(f"text {i}", "rare" if i % 5 == 0 else "common") for i in range(200)]
    root = _jsonl_splits(tmp_path, {"train": rows})
    cfg = local(root, "jsonl", validation_size=0.1, test_size=0.2)
    first, manifest = prepare_dataset(cfg, seed=7)
    again, _ = prepare_dataset(cfg, seed=7)
    other, _ = prepare_dataset(cfg, seed=8)
    assert {k: len(v) for k, v in first.items()} == {"train": 140, "test": 40, "validation": 20}
    assert list(first["test"]["text"]) == list(again["test"]["text"]) != list(other["test"]["text"])
    names = first["train"].features["label"].names
    for split in first.values():  # every split keeps the 1:4 class ratio
        counts = Counter(names[i] for i in split["label"])
        assert counts["common"] == 4 * counts["rare"]
    assert not set(first["train"]["text"]) & set(first["test"]["text"])
    assert manifest["splits"]["test"]["carved_from"] == "train"


def test_unlabelled_split_is_kept_with_minus_one(tmp_path):
    root = _jsonl_splits(tmp_path, {"train": [("a", "x"), ("b", "y"), ("c", "x"), ("d", "y")],
                                    "validation": [("e", "x"), ("f", "y")]})
    (root / "test.jsonl").write_text('{"text": "g", "label": -1}\n{"text": "h", "label": -1}\n')
    dataset, manifest = prepare_dataset(local(root, "jsonl"), seed=0)
    assert list(dataset["test"]["label"]) == [-1, -1]
    assert manifest["splits"]["test"]["labeled"] is False


def test_partly_labelled_split_is_an_error(tmp_path):
    root = _jsonl_splits(tmp_path, {"train": [("a", "x"), ("b", "y")]})
    (root / "test.jsonl").write_text('{"text": "g", "label": "x"}\n{"text": "h", "label": null}\n')
    with pytest.raises(DataValidationError, match=r"test.jsonl:2: row has no label"):
        prepare_dataset(local(root, "jsonl"), seed=0)


def test_class_folders_read_cp1252_files(tmp_path):
    for label, texts in {"sport": ["goal", "match"], "tech": ["chip", "code"]}.items():
        (tmp_path / label).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / label / f"{i:03d}.txt").write_text(f"{text} headline\n\nbody {i}\n")
    (tmp_path / "sport" / "002.txt").write_bytes(b"cost \xa3100\n")
    (tmp_path / "tech" / "002.txt").write_text("code headline\n\nbody 1\n")  # duplicate text
    dataset, manifest = prepare_dataset(local(tmp_path, "folders", validation_size=0.3,
                                              test_size=0.3), seed=0)
    everything = [t for split in dataset.values() for t in split["text"]]
    assert "cost £100" in everything
    assert manifest["splits"]["train"]["duplicates_removed"] == 1
    assert dataset["train"].features["label"].names == ["sport", "tech"]


def test_parquet_keeps_hub_label_names(tmp_path):
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    for split, offset in (("train", 0), ("validation", 10), ("test", 20)):
        datasets.Dataset.from_dict({"sentence": [f"s {offset + i}" for i in range(6)],
                                    "label": [i % 2 for i in range(6)]},
                                   features=features).to_parquet(str(tmp_path / f"{split}.parquet"))
    cfg = local(tmp_path, "parquet", text_column="sentence")
    dataset, manifest = prepare_dataset(cfg, seed=0)
    assert manifest["label_names"] == ["negative", "positive"]
    assert manifest["carved_splits"] == []


def test_snapshot_round_trip_is_byte_identical(tmp_path, tiny_corpus):
    cfg = local(tiny_corpus, "jsonl", text_column="sentence")
    prepare_and_save(cfg, 0, str(tmp_path / "a"))
    prepare_and_save(cfg, 0, str(tmp_path / "b"))
    for file in sorted((tmp_path / "a").iterdir()):
        assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes(), file.name
    snapshot = load_snapshot(str(tmp_path / "a"))
    assert snapshot["train"].features["label"].names == ["negative", "positive"]
    assert load_raw_manifest(str(tmp_path / "a"))["splits"]["train"]["rows"] == 48


def test_failed_validation_leaves_no_output(tmp_path):
    write_tsv(tmp_path / "src" / "train.tsv", ["a\tb\t1", "broken"])
    out = tmp_path / "raw"
    with pytest.raises(DataValidationError):
        prepare_and_save(pairs_cfg(tmp_path / "src"), 0, str(out))
    assert not out.exists()
    assert not list(tmp_path.glob(".raw*"))


def test_package_source_checks_the_pinned_version():
    folder, version = resolve_package_path("pipeline", None)
    assert folder.is_dir() and version
    with pytest.raises(ConfigError, match="is version .* but the config pins revision 0.0.1"):
        resolve_package_path("pipeline", "0.0.1")
    with pytest.raises(ConfigError, match="package 'no_such_package_xyz' .* is not installed"):
        resolve_package_path("no_such_package_xyz/data")


def test_csv_is_read_with_standard_quoting(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"fine, really",yes\n"said ""no""",no\nplain,yes\nother,no\n')
    dataset, _ = prepare_dataset(local(path, "csv", validation_size=0.25, test_size=0.25), seed=0)
    texts = {t for split in dataset.values() for t in split["text"]}
    assert texts == {"fine, really", 'said "no"', "plain", "other"}


def test_snapshot_does_not_depend_on_where_the_source_lives(tmp_path, tiny_corpus, monkeypatch):
    import shutil

    for machine in ("a", "bb"):
        shutil.copytree(tiny_corpus, tmp_path / machine / "corpus")
        monkeypatch.chdir(tmp_path / machine)
        prepare_and_save(local(Path("corpus"), "jsonl", text_column="sentence"), 0, "raw")
    for file in sorted((tmp_path / "a" / "raw").iterdir()):
        assert file.read_bytes() == (tmp_path / "bb" / "raw" / file.name).read_bytes(), file.name


def _scores(tmp_path: Path, train_scores: list[str], test_scores: list[str]) -> Path:
    header = "sentence1\tsentence2\tlabel\tidx"
    write_tsv(tmp_path / "train.tsv",
              [f"a {i}\tb {i}\t{s}\t{i}" for i, s in enumerate(train_scores)], header)
    write_tsv(tmp_path / "validation.tsv", [f"v {i}\tw {i}\t{i % 5}.5\t{i}" for i in range(6)],
              header)
    write_tsv(tmp_path / "test.tsv", [f"t {i}\tu {i}\t{s}\t{i}" for i, s in enumerate(test_scores)],
              header)
    return tmp_path


def regression_cfg(path: Path) -> DatasetConfig:
    return pairs_cfg(path, label_names=None, task="regression", main_metric="pearson",
                     id_column="idx")


def test_regression_scores_are_floats_and_an_all_minus_one_split_is_unlabelled(tmp_path):
    # -1 is a real score in train; the test split, all -1 like GLUE STS-B's, has no labels.
    source = _scores(tmp_path, ["-1", "0.5", "4.25", "3", "-1", "2"], ["-1", "-1", "-1", "-1"])
    dataset, manifest = prepare_dataset(regression_cfg(source), seed=0)
    assert dataset["train"].features["label"] == datasets.Value("float32")
    assert list(dataset["train"]["label"]) == [-1.0, 0.5, 4.25, 3.0, -1.0, 2.0]
    assert manifest["splits"]["train"]["labeled"] and not manifest["splits"]["test"]["labeled"]
    assert manifest["splits"]["train"]["label_range"] == [-1.0, 4.25]
    assert list(dataset["test"]["idx"]) == [0, 1, 2, 3]


def test_a_score_that_is_not_a_number_names_its_line(tmp_path):
    source = _scores(tmp_path, ["0.5", "high", "3"], ["-1"])
    with pytest.raises(DataValidationError, match=rf"{source / 'train.tsv'}:3: label 'high' in "
                                                  r"column 'label' is not a number"):
        prepare_dataset(regression_cfg(source), seed=0)


def test_a_missing_id_column_is_named(tmp_path):
    write_tsv(tmp_path / "train.tsv", ["a\tb\t1", "c\td\t0"])
    with pytest.raises(DataValidationError, match=r"column 'idx' not found .*dataset.id_column"):
        prepare_dataset(pairs_cfg(tmp_path, id_column="idx"), seed=0)


def test_unlabelled_splits_keep_their_duplicates(tmp_path):
    write_tsv(tmp_path / "train.tsv", [f"a {i}\tb {i}\t{i % 2}" for i in range(20)])
    write_tsv(tmp_path / "test.tsv", ["same\tpair\t-1", "same\tpair\t-1", "other\tpair\t-1"])
    dataset, _ = prepare_dataset(pairs_cfg(tmp_path), seed=0)
    assert len(dataset["test"]) == 3, "a submission needs a prediction for every row"


def _stray_label(tmp_path: Path) -> Path:
    rows = [(f"good {i}", "positive") for i in range(4)] + [(f"bad {i}", "negative")
                                                             for i in range(4)]
    rows.insert(5, ("oops", "postive"))
    return _jsonl_splits(tmp_path, {"train": rows}) / "train.jsonl"


def test_a_label_with_too_few_rows_is_refused_naming_its_row(tmp_path):
    # Before: with no label_names, "postive" silently became a third class.
    path = _stray_label(tmp_path)
    with pytest.raises(DataValidationError) as error:
        prepare_dataset(local(path, "jsonl"), seed=0)
    assert str(error.value) == (
        f"{path}:6: label 'postive' has 1 row over the labelled splits "
        "(dataset.min_class_rows=2): fix the row if the label is a mistake; if it is a real "
        "class, list it in dataset.label_names or lower dataset.min_class_rows")


def test_scores_read_as_classes_are_refused_with_the_regression_settings(tmp_path):
    """A CSV of similarity scores under the default classification task: every score would be
    a class of its own."""
    path = tmp_path / "scores.csv"
    path.write_text("text,label\n" + "".join(f"sentence {i},{i % 7 * 0.75}\n" for i in range(12))
                    + "odd one,4.6\n")
    with pytest.raises(DataValidationError) as error:
        prepare_dataset(local(path, "csv"), seed=0)
    assert str(error.value).startswith(f"{path}:7: label '3.75' has 1 row")
    assert str(error.value).endswith("; if the labels are scores, not classes: "
                                     "dataset.task=regression and dataset.main_metric=pearson")


def test_a_rare_label_is_kept_when_listed_or_when_the_minimum_allows_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.preparation")
    path = _stray_label(tmp_path)
    listed = local(path, "jsonl", label_names=["negative", "positive", "postive"],
                   validation_size=0.25, test_size=0.25)
    dataset, _ = prepare_dataset(listed, seed=0)
    assert dataset["train"].features["label"].names == ["negative", "positive", "postive"]
    assert "labels (rows over the labelled splits): negative 4, positive 4, postive 1" in \
        caplog.text
    dataset, _ = prepare_dataset(local(path, "jsonl", min_class_rows=1, validation_size=0.25,
                                       test_size=0.25), seed=0)
    assert len(dataset["train"].features["label"].names) == 3


def test_class_rows_are_counted_over_labelled_splits_after_deduplication(tmp_path):
    ok = _jsonl_splits(tmp_path / "ok", {
        "train": [("a", "x"), ("b", "x"), ("c", "y")], "validation": [("d", "y"), ("e", "x")],
        "test": [("f", "x"), ("g", "y")]})
    prepare_dataset(local(ok, "jsonl", min_class_rows=3), seed=0)  # y: 1 + 1 + 1 rows
    integers = _jsonl_splits(tmp_path / "ints", {  # 7 in place of a 1: an extra integer class
        "train": [("a", 0), ("b", 1), ("c", 0), ("d", 7), ("e", 1)]})
    with pytest.raises(DataValidationError, match=r"train.jsonl:4: label '7' has 1 row"):
        prepare_dataset(local(integers, "jsonl"), seed=0)
    repeated = _jsonl_splits(tmp_path / "dup", {  # two rows, one once de-duplicated
        "train": [("a", "x"), ("b", "x"), ("c", "y"), ("c", "y"), ("d", "x")]})
    with pytest.raises(DataValidationError, match=r"train.jsonl:3: label 'y' has 1 row"):
        prepare_dataset(local(repeated, "jsonl"), seed=0)
    conflict = _jsonl_splits(tmp_path / "conflict", {  # its one row repeats an earlier text
        "train": [("a", "x"), ("b", "x"), ("a", "y"), ("c", "x")]})
    with pytest.raises(DataValidationError, match=r"train.jsonl:3: label 'y' has 0 rows over the "
                                                  "labelled splits once duplicates and leakage"):
        prepare_dataset(local(conflict, "jsonl", min_class_rows=1), seed=0)


def test_regression_scores_are_not_classes(tmp_path):
    source = _scores(tmp_path, ["0.5", "4.25", "3", "2", "1.5", "0"], ["-1", "-1"])
    cfg = regression_cfg(source)
    assert cfg.min_class_rows == 2
    dataset, _ = prepare_dataset(cfg, seed=0)  # every score occurs once
    assert len(dataset["train"]) == 6


def test_min_class_rows_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.min_class_rows=-1 must be 0 or more"):
        local(tmp_path, "jsonl", min_class_rows=-1)


def test_a_split_emptied_by_leakage_removal_is_refused(tmp_path):
    # Before: an empty train split was written, and tokenize or train failed far from the cause.
    root = _jsonl_splits(tmp_path, {"train": [("a", "x"), ("b", "y"), ("a", "x")],
                                    "validation": [("a", "x"), ("b", "y")],
                                    "test": [("c", "x"), ("d", "y")]})
    with pytest.raises(DataValidationError) as error:
        prepare_dataset(local(root, "jsonl"), seed=0)
    assert str(error.value) == (
        "split 'train' is empty: of its 3 rows, 1 were duplicates and 2 also appear in an "
        "evaluation split (dataset.on_leakage=drop); fix the source, or set "
        "dataset.on_leakage=warn")


def test_a_train_split_too_small_to_carve_is_refused(tmp_path):
    # Before: a ValueError traceback from datasets' train_test_split.
    root = _jsonl_splits(tmp_path, {"train": [("a", "x"), ("b", "y")]})
    with pytest.raises(DataValidationError, match=r"split 'train' has 1 row left, too few"):
        prepare_dataset(local(root, "jsonl", min_class_rows=1), seed=0)
