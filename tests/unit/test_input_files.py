"""Faulty input files fail in one line naming the file (and line), never silently: column names,
encodings and files without data rows, for every reader of the download stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DatasetConfig
from pipeline.errors import ConfigError, DataValidationError
from pipeline.preparation import prepare_dataset
from pipeline.textfiles import check_column_names
from support import config_section

ROWS = [("a fine film", "pos"), ("a dull film", "neg"), ("great", "pos"), ("awful", "neg")]


def local(path: Path, fmt: str, **overrides) -> DatasetConfig:
    return config_section("dataset", name="t", source="local", path=str(path), format=fmt,
                          **overrides)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def delimited(header: list[str], rows=ROWS, sep: str = ",") -> str:
    return "".join(sep.join(fields) + "\n" for fields in [header, *rows])


@pytest.mark.parametrize("names, problem", [
    (["text", "label", "text"], "column name 'text' is repeated (columns 1 and 3)"),
    (["text", "", "label"], "column 2 has a blank name ('')"),
    (["text", "  ", "label"], "column 2 has a blank name ('  ')"),
    (["Text", "label", "text"],
     "column names 'Text' (column 1) and 'text' (column 3) differ only in case"),
    (["STRASSE", "straße"],  # casefold, not lower: ß is ss
     "column names 'STRASSE' (column 1) and 'straße' (column 2) differ only in case"),
])
def test_column_names_that_are_repeated_blank_or_differ_in_case_are_refused(names, problem):
    with pytest.raises(DataValidationError, match="^data/x.csv: " + re.escape(problem)):
        check_column_names(names, "data/x.csv")
    check_column_names(["text", "label", "text_pair"], "data/x.csv")


@pytest.mark.parametrize("fmt, sep", [("csv", ","), ("tsv", "\t")])
@pytest.mark.parametrize("header, problem", [
    (["text", "label", "text"], "column name 'text' is repeated"),
    (["text", "label", " "], "column 3 has a blank name"),
    (["Text", "text", "label"], "column names 'Text' (column 1) and 'text' (column 2)"),
])
def test_delimited_headers_with_ambiguous_names_are_refused(tmp_path, fmt, sep, header, problem):
    # Before: a repeated name was read without complaint, and one column silently won.
    rows = [(t, "spare", lab) for t, lab in ROWS]
    path = write(tmp_path / f"train.{fmt}", delimited(header, rows, sep))
    with pytest.raises(DataValidationError, match=f"^{re.escape(str(path))}: {re.escape(problem)}"):
        prepare_dataset(local(path, fmt), seed=0)


def test_jsonl_key_repeated_in_one_object_names_the_line(tmp_path):
    # json.loads keeps the last "label" of line 2 without a word.
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": "pos"}\n'
                 '{"text": "b", "label": "pos", "label": "neg"}\n')
    with pytest.raises(DataValidationError,
                       match=rf"^{re.escape(str(path))}:2: key 'label' is repeated in one object"):
        prepare_dataset(local(path, "jsonl"), seed=0)


def test_jsonl_keys_that_differ_in_case_or_are_blank_are_refused(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": "pos"}\n\n'
                 '{"Text": "b", "label": "neg"}\n')
    with pytest.raises(DataValidationError, match=rf"^{re.escape(str(path))}:3: key 'Text' "
                                                  r"differs only in case from the column 'text'"):
        prepare_dataset(local(path, "jsonl"), seed=0)
    write(path, '{"text": "a", "label": "pos", " ": 1}\n')
    with pytest.raises(DataValidationError, match=rf"{re.escape(str(path))}:1: column 3 has a "
                                                  "blank name"):
        prepare_dataset(local(path, "jsonl"), seed=0)


def _parquet(path: Path, names: list[str], rows: int = 4) -> Path:
    columns = [pa.array([f"{name} {i}" for i in range(rows)], pa.string()) for name in names]
    pq.write_table(pa.table(columns, names=names), path)
    return path


@pytest.mark.parametrize("names, problem", [
    (["text", "label", "text"], "column name 'text' is repeated"),
    (["text", "Label", "label"], "column names 'Label' (column 2) and 'label' (column 3)"),
])
def test_parquet_fields_with_ambiguous_names_are_refused(tmp_path, names, problem):
    # pyarrow writes repeated field names; reading them back failed with "Multiple matches for
    # FieldRef", and case-colliding names were read as two columns.
    path = _parquet(tmp_path / "train.parquet", names)
    with pytest.raises(DataValidationError, match=f"^{re.escape(str(path))}: {re.escape(problem)}"):
        prepare_dataset(local(path, "parquet"), seed=0)


def test_hub_dataset_columns_that_differ_in_case_are_refused(tmp_path):
    # load_dataset takes a local folder the way it takes a Hub id (no network).
    write(tmp_path / "train.jsonl", "".join(json.dumps({"text": t, "Text": t, "label": lab}) + "\n"
                                            for t, lab in ROWS))
    cfg = config_section("dataset", name="x", source="hub", path=str(tmp_path))
    with pytest.raises(DataValidationError,
                       match=r"hf://datasets/.*/train: column names 'text' \(column 1\) and "
                             r"'Text' \(column 2\) differ only in case"):
        prepare_dataset(cfg, seed=0)


CP1252 = "caf\u00e9 cr\u00e8me".encode("cp1252")  # é is 0xe9, not valid UTF-8 on its own
ODD_ROWS = [(b"fine", b"pos"), (CP1252, b"neg"), (b"last", b"pos"), (b"more", b"neg")]


def _encoded(fmt: str, rows: list[tuple[bytes, bytes]]) -> bytes:
    if fmt == "jsonl":
        return b"".join(b'{"text": "' + t + b'", "label": "' + lab + b'"}\n' for t, lab in rows)
    sep = b"\t" if fmt == "tsv" else b","
    return b"".join(t + sep + lab + b"\r\n" for t, lab in [(b"text", b"label"), *rows])


@pytest.mark.parametrize("fmt, line", [("csv", 3), ("tsv", 3), ("jsonl", 2)])
def test_bytes_that_are_not_utf8_name_file_line_offset_and_the_key(tmp_path, fmt, line):
    # Before: a UnicodeDecodeError traceback naming neither the file nor the line.
    data = _encoded(fmt, ODD_ROWS)
    path = write(tmp_path / f"train.{fmt}", data)
    offset = data.index(CP1252) + 3
    with pytest.raises(DataValidationError) as error:
        prepare_dataset(local(path, fmt), seed=0)
    assert str(error.value) == (
        f"{path}:{line}: byte 0xe9 at byte offset {offset} is not valid utf-8; if "
        "the file is in another encoding, set dataset.encoding (e.g. cp1252 or latin-1)")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_dataset_encoding_reads_other_encodings(tmp_path, fmt):
    path = write(tmp_path / f"train.{fmt}", _encoded(fmt, ODD_ROWS))
    dataset, _ = prepare_dataset(local(path, fmt, encoding="cp1252", validation_size=0.25,
                                       test_size=0.25), seed=0)
    assert "caf\u00e9 cr\u00e8me" in {t for split in dataset.values() for t in split["text"]}


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, fmt):
    rows = [{"text": t, "label": lab} for t, lab in ROWS]
    if fmt == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        text = delimited(["text", "label"], sep="\t" if fmt == "tsv" else ",")
    path = write(tmp_path / f"train.{fmt}", b"\xef\xbb\xbf" + text.encode())
    dataset, _ = prepare_dataset(local(path, fmt, validation_size=0.25, test_size=0.25), seed=0)
    assert sum(len(split) for split in dataset.values()) == 4


@pytest.mark.parametrize("encoding, problem", [
    ("klingon", "dataset.encoding='klingon' is not an encoding Python knows"),
    ("utf-16", "dataset.encoding='utf-16' is not supported: the readers split lines"),
])
def test_an_unusable_encoding_is_a_config_error(tmp_path, encoding, problem):
    path = write(tmp_path / "train.csv", delimited(["text", "label"]))
    with pytest.raises(ConfigError, match=re.escape(problem)):
        prepare_dataset(local(path, "csv", encoding=encoding), seed=0)


def _class_folders(root: Path, odd: bytes) -> Path:
    for label, texts in {"sport": ["goal", "match"], "tech": ["chip", "code"]}.items():
        (root / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            (root / label / f"{i:03d}.txt").write_text(f"{text} headline\n\nbody {i}\n")
    (root / "sport" / "002.txt").write_bytes(b"headline\n\ncost " + odd + b"100\n")
    return root


def test_class_folders_use_an_explicit_encoding_strictly(tmp_path, caplog):
    # The default (utf-8) falls back to cp1252 with a warning (BBC News: see test_data.py).
    root = _class_folders(tmp_path / "ok", b"\xa3")
    dataset, _ = prepare_dataset(local(root, "folders", encoding="cp1252", validation_size=0.3,
                                       test_size=0.3), seed=0)
    assert "headline\n\ncost \u00a3100" in [t for s in dataset.values() for t in s["text"]]
    assert "not valid UTF-8" not in caplog.text
    root = _class_folders(tmp_path / "bad", b"\x81")  # no character in cp1252
    with pytest.raises(DataValidationError,
                       match=rf"^{re.escape(str(root / 'sport' / '002.txt'))}:3: byte 0x81 at "
                             r"byte offset 15 is not valid cp1252; .* set dataset.encoding"):
        prepare_dataset(local(root, "folders", encoding="cp1252"), seed=0)


@pytest.mark.parametrize("name, data, detail", [
    ("train.csv", "text,label\n", " (only a header)"),
    ("train.csv", "text,label\n\n\n", " (only a header)"),
    ("train.csv", "", " (the file is empty; a header row is required)"),
    ("train.csv", "\n\n", " (the file is empty; a header row is required)"),
    ("train.tsv", "text\tlabel\r\n", " (only a header)"),
    ("train.jsonl", "", ""),
    ("train.jsonl", "\n  \n\n", ""),
])
def test_files_without_data_rows_are_refused(tmp_path, name, data, detail):
    # Before: written as an empty split, or a header-only file's columns reached the carving
    # and tokenize stage empty.
    path = write(tmp_path / name, data)
    with pytest.raises(DataValidationError) as error:
        prepare_dataset(local(path, Path(name).suffix[1:]), seed=0)
    assert str(error.value) == f"{path}: no data rows{detail}"


def test_an_empty_parquet_file_or_split_file_is_refused(tmp_path):
    _parquet(tmp_path / "train.parquet", ["text", "label"], rows=0)
    with pytest.raises(DataValidationError) as error:
        prepare_dataset(local(tmp_path / "train.parquet", "parquet"), seed=0)
    assert str(error.value) == f"{tmp_path / 'train.parquet'}: no data rows"
    # An evaluation split's file, not only train's.
    root = tmp_path / "folder"
    write(root / "train.jsonl", "".join(json.dumps({"text": t, "label": lab}) + "\n"
                                        for t, lab in ROWS))
    write(root / "validation.jsonl", "\n")
    with pytest.raises(DataValidationError, match=rf"^{re.escape(str(root))}/validation.jsonl: "
                                                  "no data rows$"):
        prepare_dataset(local(root, "jsonl"), seed=0)


def test_an_empty_hub_split_is_refused(monkeypatch):
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    loaded = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]},
                                            features=features),
        "test": datasets.Dataset.from_dict({"text": [], "label": []}, features=features)})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: loaded)
    cfg = config_section("dataset", name="x", source="hub", path="acme/x",
                         revision="0123456789abcdef0123456789abcdef01234567")
    with pytest.raises(DataValidationError) as error:
        prepare_dataset(cfg, seed=0)
    assert str(error.value) == ("hf://datasets/acme/x@0123456789abcdef0123456789abcdef01234567/"
                                "/test: no data rows")
