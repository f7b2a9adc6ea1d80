"""Classify texts or text pairs with a trained model: a model folder or an MLflow model URI.

    hf-text-pipeline predict --model models/model "a gripping, funny film" "dull and slow"
    hf-text-pipeline predict --model runs:/<run id>/model --pairs "sentence one" "sentence two"
    printf 'first\\tits pair\\n' | hf-text-pipeline predict --model models/model --pairs
    hf-text-pipeline predict --model models/model --input rows.csv --output predictions.jsonl

Prints one JSON object per input (JSON Lines): the input, the predicted ``label`` and the
``probabilities`` of every class, or the ``score`` of a regression model. Files (csv, tsv, jsonl)
stream through in chunks with a progress bar; their other columns pass through to the output.

Not a DVC stage and not a Hydra app: inference takes texts and files from the command line and
stdin, which argparse expresses directly.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline.artifacts import iter_jsonl
from pipeline.errors import PipelineError
from pipeline.inference import TEXT, TEXT_PAIR


class InputError(Exception):
    """Bad input, reported in one line naming the file, line and column."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-text-pipeline predict",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="*", help="texts to classify (with --pairs: text, pair, "
                        "text, pair, ...); none: read --input or stdin")
    parser.add_argument("--model", "-m", required=True,
                        help="model folder (models/model) or MLflow model URI (runs:/<id>/model)")
    parser.add_argument("--pairs", action="store_true",
                        help="inputs are text pairs: arguments two by two, stdin lines as "
                        "text<TAB>pair")
    parser.add_argument("--input", "-i", type=Path, help="a .csv, .tsv or .jsonl file")
    parser.add_argument("--text-column", default=TEXT)
    parser.add_argument("--pair-column", default=None,
                        help=f"column of the second text (default: {TEXT_PAIR} if the file has it)")
    parser.add_argument("--output", "-o", type=Path, help="write JSON Lines here (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=64)
    return parser


def _from_arguments(texts: list[str], pairs: bool) -> tuple[list[dict[str, str]], int]:
    if not pairs:
        return [{TEXT: t} for t in texts], len(texts)
    if len(texts) % 2:
        raise InputError(f"--pairs takes texts two by two; got {len(texts)} arguments")
    rows = [{TEXT: a, TEXT_PAIR: b} for a, b in zip(texts[::2], texts[1::2])]
    return rows, len(rows)


def _from_stdin(pairs: bool) -> Iterator[dict[str, str]]:
    for number, line in enumerate(sys.stdin, start=1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if not pairs:
            yield {TEXT: line}
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise InputError(f"<stdin>:{number}: expected text<TAB>pair, found "
                             f"{len(parts)} tab-separated fields")
        yield {TEXT: parts[0], TEXT_PAIR: parts[1]}


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, row) for each row of a csv, tsv or jsonl file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, record in iter_jsonl(path):
            yield f"{path}:{number}", record
    elif suffix in (".csv", ".tsv"):
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, **dialect)
            for row in reader:
                yield f"{path}:{reader.line_num}", row
    else:
        raise InputError(f"{path}: unknown file type (use .csv, .tsv or .jsonl)")


def _count_rows(path: Path) -> int:
    with open(path, "rb") as handle:
        lines = sum(1 for line in handle if line.strip())
    return lines - (path.suffix.lower() in (".csv", ".tsv"))  # the header


def _from_file(path: Path, text_column: str, pair_column: str | None,
               pairs: bool) -> Iterator[dict[str, str]]:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    for where, row in _records(path):
        if pair_column is None and (pairs or TEXT_PAIR in row):
            pair_column = TEXT_PAIR
        for column in (text_column, pair_column):
            if column is None:
                continue
            if column not in row:
                raise InputError(f"{where}: no column '{column}' (columns: "
                                 f"{', '.join(row)}); set --text-column / --pair-column")
            if not isinstance(row[column], str) or not row[column].strip():
                raise InputError(f"{where}: column '{column}' is empty or not a string")
        out = {k: v for k, v in row.items() if k not in (text_column, pair_column)}
        out[TEXT] = row[text_column]
        if pair_column is not None:
            out[TEXT_PAIR] = row[pair_column]
        yield out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.inference import Classifier

    try:
        if args.texts:
            rows, total = _from_arguments(args.texts, args.pairs)
        elif args.input:
            rows = _from_file(args.input, args.text_column, args.pair_column, args.pairs)
            total = _count_rows(args.input) if args.input.is_file() else None
        elif not sys.stdin.isatty():
            rows, total = _from_stdin(args.pairs), None
        else:
            raise InputError("nothing to classify: give texts, --input FILE, or pipe lines "
                             "to stdin")
        classifier = Classifier(args.model, batch_size=args.batch_size)
        partial = args.output.with_name(args.output.name + ".tmp") if args.output else None
        with contextlib.ExitStack() as stack:
            output = stack.enter_context(open(partial, "w")) if partial else sys.stdout
            try:
                for record in classifier.predict(rows, total=total, progress=bool(args.input)):
                    output.write(json.dumps(record, ensure_ascii=False) + "\n")
            except BaseException:
                if partial:  # never leave a partial file under the requested name
                    stack.close()
                    partial.unlink(missing_ok=True)
                raise
        if partial:
            partial.replace(args.output)
    except (InputError, PipelineError, OSError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
