"""Reading csv, tsv and jsonl files row by row, with errors that name the file, line and byte.

Shared by the download stage's readers and the inference command, so that both refuse the same
faulty files in the same words. Python's own text mode would fail on a byte that is not valid in
the encoding with a traceback that names neither the file nor the line; ``json.loads`` silently
keeps the last of a repeated key; the csv module reads a repeated header name without complaint
(and a dict built from the rows keeps one of them). Each of those would misalign texts and
labels without a word, so the readers here refuse them.

Lines are split on ``\\n``, ``\\r\\n`` and ``\\r`` in the raw bytes, as text mode with
``newline=""`` does, and decoded one at a time, which needs an encoding that writes those
characters (and the delimiters) as single ASCII bytes: UTF-8, cp1252, latin-1 and the like.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import ConfigError, DataValidationError

UTF8 = "utf-8"
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}

_BOM = codecs.BOM_UTF8
_LINES = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_SEPARATORS = "\n\r\t,\"{}:[] "


def check_encoding(name: str, key: str) -> str:
    """``name`` if Python knows it as an encoding the line readers can use.

    Raises:
        ConfigError: naming ``key`` (the config key or option that set it).
    """
    try:
        codec = codecs.lookup(name)
    except LookupError:
        raise ConfigError(f"{key}={name!r} is not an encoding Python knows (e.g. utf-8, "
                          "cp1252, latin-1)") from None
    try:
        compatible = codec.decode(_SEPARATORS.encode("ascii"))[0] == _SEPARATORS
    except (TypeError, ValueError):  # UTF-16's odd length; bytes-to-bytes codecs (base64)
        compatible = False
    if not compatible:
        raise ConfigError(f"{key}={name!r} is not supported: the readers split lines and fields "
                          "on ASCII bytes, so the encoding must be ASCII-compatible (utf-8, "
                          "cp1252, latin-1, ...); convert the file to UTF-8 first")
    return name


def is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == UTF8


def decode_error(where: str, offset: int, exc: UnicodeDecodeError, encoding: str,
                 hint: str) -> DataValidationError:
    """The one-line error for a byte that ``encoding`` cannot decode.

    Args:
        where: ``file:line`` (or ``<stdin>:line``) of the line holding the byte.
        offset: the byte offset in the file of the start of ``exc.object``.
        hint: how the user names another encoding (``set dataset.encoding``, ``pass
            --encoding``).
    """
    bad = exc.object[exc.start:min(exc.end, exc.start + 4)]
    shown = " ".join(f"0x{b:02x}" for b in bad)
    return DataValidationError(
        f"{where}: byte {shown} at byte offset {offset + exc.start} is not valid {encoding}; "
        f"if the file is in another encoding, {hint} (e.g. cp1252 or latin-1)")


def iter_lines(stream: IO[bytes], name: str, encoding: str,
               hint: str) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its line ending) for each line of a binary stream.

    A UTF-8 byte-order mark at the start is dropped when ``encoding`` is UTF-8.

    Raises:
        DataValidationError: naming ``name:line``, the byte offset and the byte that
            ``encoding`` cannot decode, and ``hint``.
    """
    utf8 = is_utf8(encoding)
    number = offset = 0
    for chunk in stream:
        pieces = _LINES.findall(chunk) if b"\r" in chunk else [chunk]
        for raw in pieces:
            number += 1
            skip = len(_BOM) if number == 1 and utf8 and raw.startswith(_BOM) else 0
            try:
                text = raw[skip:].decode(encoding)
            except UnicodeDecodeError as exc:
                raise decode_error(f"{name}:{number}", offset + skip, exc, encoding,
                                   hint) from None
            offset += len(raw)
            yield number, text


def check_column_names(names: Iterable[Any], where: str) -> None:
    """Refuse blank, repeated, or case-colliding column names (``Text`` and ``text``).

    Any of them makes "the column named X" ambiguous: readers keep one of two columns, or a
    config picks the other, and texts end up paired with the wrong labels.

    Raises:
        DataValidationError: naming ``where`` (the file, or ``file:line``) and the columns.
    """
    seen: dict[str, tuple[int, str]] = {}
    for position, name in enumerate(names, start=1):
        text = str(name)
        if not text.strip():
            raise DataValidationError(f"{where}: column {position} has a blank name "
                                      f"({text!r}); name it or remove it")
        key = text.casefold()
        if key in seen:
            first, other = seen[key]
            if other == text:
                raise DataValidationError(
                    f"{where}: column name {text!r} is repeated (columns {first} and "
                    f"{position}); rename or remove one")
            raise DataValidationError(
                f"{where}: column names {other!r} (column {first}) and {text!r} (column "
                f"{position}) differ only in case; rename or remove one")
        seen[key] = (position, text)


def no_data_rows(name: str, detail: str = "") -> DataValidationError:
    return DataValidationError(f"{name}: no data rows{f' ({detail})' if detail else ''}")


def iter_records(path: Path, fmt: str, encoding: str,
                 hint: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, row) for each row of a csv (standard quoting), tsv (quoting off) or jsonl
    file; blank lines are skipped. A csv or tsv file needs a header row.

    Raises:
        DataValidationError: naming the file (and line) of bytes ``encoding`` cannot decode,
            bad column names, a malformed row or JSON line, or a file with no data rows.
    """
    with open(path, "rb") as handle:
        lines = iter_lines(handle, str(path), encoding, hint)
        rows = _jsonl(path, lines) if fmt == "jsonl" else _delimited(path, fmt, lines)
        count = 0
        for row in rows:
            count += 1
            yield row
        if not count:
            raise no_data_rows(str(path), "only a header" if fmt != "jsonl" else "")


def _delimited(path: Path, fmt: str,
               lines: Iterator[tuple[int, str]]) -> Iterator[tuple[str, dict[str, Any]]]:
    tsv = fmt == "tsv"
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"delimiter": ","}
    kind = "tab" if tsv else "comma"
    reader = csv.reader((line for _, line in lines), **dialect)
    start = 1
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            raise no_data_rows(str(path), "the file is empty; a header row is required")
        check_column_names(header, str(path))
        start = reader.line_num + 1
        for row in reader:
            if row:
                if len(row) != len(header):
                    raise DataValidationError(
                        f"{path}:{start}: malformed row: expected {len(header)} "
                        f"{kind}-separated fields ({', '.join(header)}), found {len(row)}")
                yield f"{path}:{start}", dict(zip(header, row))
            start = reader.line_num + 1
    except csv.Error as exc:  # a NUL byte, an over-long field, a stray line break
        raise DataValidationError(f"{path}:{start}: malformed row: {exc}") from None


class _RepeatedKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        keys = [key for key, _ in pairs]
        raise _RepeatedKeyError(next(key for key in keys if keys.count(key) > 1))
    return record


def _jsonl(path: Path,
           lines: Iterator[tuple[int, str]]) -> Iterator[tuple[str, dict[str, Any]]]:
    columns: dict[str, str] = {}  # casefolded key -> the spelling first seen in the file
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line, object_pairs_hook=_object)
        except json.JSONDecodeError as exc:
            raise DataValidationError(f"{where}: invalid JSON: {exc.msg}") from None
        except _RepeatedKeyError as repeated:
            raise DataValidationError(
                f"{where}: key {repeated.key!r} is repeated in one object (a JSON reader keeps "
                "only the last); rename or remove one") from None
        if not isinstance(record, dict):
            raise DataValidationError(f"{where}: expected a JSON object per line")
        check_column_names(record, where)
        for key in record:
            first = columns.setdefault(key.casefold(), key)
            if first != key:
                raise DataValidationError(
                    f"{where}: key {key!r} differs only in case from the column {first!r} of "
                    "earlier lines; rename one")
        yield where, record
