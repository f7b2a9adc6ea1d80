"""Classify texts or text pairs with a trained model: a model folder or an MLflow model URI.

    hf-text-pipeline predict --model models/model "a gripping, funny film" "dull and slow"
    hf-text-pipeline predict --model runs:/<run id>/model --pairs "sentence one" "sentence two"
    printf 'first\\tits pair\\n' | hf-text-pipeline predict --model models/model --pairs
    hf-text-pipeline predict --model models/model --input rows.csv --output predictions.jsonl
    hf-text-pipeline predict --model models/model --quantize --input rows.csv

Prints one JSON object per input (JSON Lines): the input, the predicted ``label`` and the
``probabilities`` of every class, or the ``score`` of a regression model. Files (csv, tsv, jsonl)
stream through in chunks with a progress bar; their other columns pass through to the output.
Files and stdin are decoded with ``--encoding`` (default utf-8); bad input (a byte that is not
valid in it, repeated or blank column names, a malformed row, a file with no data rows) stops
with one line naming the file or <stdin> and the line, and no --output file is left behind. An
empty stdin gives no output, as filters do; an --input file without data rows is an error.

Not a DVC stage and not a Hydra app: inference takes texts and files from the command line and
stdin, which argparse expresses directly.

``--quantize`` runs the linear layers in int8 (dynamic quantization, CPU only; refused on a GPU):
faster on a CPU, at a small cost in accuracy that the evaluate stage measures with
``eval.quantize=true``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from pipeline.config import INFERENCE_PRECISIONS
from pipeline.errors import ConfigError, PipelineError
from pipeline.inference import TEXT, TEXT_PAIR
from pipeline.textfiles import FORMATS, check_encoding, iter_lines, iter_records

_ENCODING_HINT = "pass --encoding"


class InputError(Exception):
    """Bad input, reported in one line naming the file, line and column."""


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (and exit status 2), like the command's other errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-text-pipeline predict",
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
    parser.add_argument("--batch-size", type=_positive, default=64,
                        help="rows per forward pass (default: 64)")
    parser.add_argument("--quantize", action="store_true",
                        help="int8 linear layers (dynamic quantization; CPU only): faster, "
                        "slightly less accurate (eval.quantize=true measures how much)")
    parser.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="auto",
                        help="auto (default): bf16 autocast where the hardware computes bf16 "
                        "natively, else fp32; fp32: the full-precision model's exact labels")
    parser.add_argument("--encoding", type=_encoding, default="utf-8",
                        help="of --input and stdin, e.g. cp1252 or latin-1 (default: utf-8; "
                        "a UTF-8 byte-order mark is skipped)")
    return parser


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def _encoding(value: str) -> str:
    try:
        return check_encoding(value, "--encoding")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--encoding=")) from None


def _from_arguments(texts: list[str], pairs: bool) -> tuple[list[dict[str, str]], int]:
    if not pairs:
        return [{TEXT: t} for t in texts], len(texts)
    if len(texts) % 2:
        raise InputError(f"--pairs takes texts two by two; got {len(texts)} arguments")
    rows = [{TEXT: a, TEXT_PAIR: b} for a, b in zip(texts[::2], texts[1::2])]
    return rows, len(rows)


def _from_stdin(pairs: bool, encoding: str) -> Iterator[dict[str, str]]:
    # The raw bytes where there are some, so that a bad byte is named like a file's.
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is not None:
        lines = iter_lines(buffer, "<stdin>", encoding, _ENCODING_HINT)
    else:  # a text stream already decoded (tests, embedding)
        lines = enumerate(sys.stdin, start=1)
    for number, line in lines:
        line = line.rstrip("\r\n")
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


def _count_rows(path: Path) -> int:
    with open(path, "rb") as handle:
        lines = sum(1 for line in handle if line.strip())
    return lines - (FORMATS.get(path.suffix.lower()) != "jsonl")  # the header


def _from_file(path: Path, text_column: str, pair_column: str | None, pairs: bool,
               encoding: str) -> Iterator[dict[str, str]]:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unknown file type (use .csv, .tsv or .jsonl)")
    for where, row in iter_records(path, fmt, encoding, _ENCODING_HINT):
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
    from tqdm.auto import tqdm

    from pipeline.inference import Classifier

    try:
        if args.texts:
            rows, total = _from_arguments(args.texts, args.pairs)
        elif args.input:
            rows = _from_file(args.input, args.text_column, args.pair_column, args.pairs,
                              args.encoding)
            # The first row before the model loads: a bad header or an empty file fails at once.
            first = next(rows)
            rows = itertools.chain([first], rows)
            total = _count_rows(args.input)
        elif not sys.stdin.isatty():
            rows, total = _from_stdin(args.pairs, args.encoding), None
        else:
            raise InputError("nothing to classify: give texts, --input FILE, or pipe lines "
                             "to stdin")
        classifier = Classifier(args.model, batch_size=args.batch_size, quantize=args.quantize,
                                precision=args.precision)
        partial = args.output.with_name(args.output.name + ".tmp") if args.output else None
        with contextlib.ExitStack() as stack:
            output = stack.enter_context(open(partial, "w")) if partial else sys.stdout
            # The bar closes (ending its line) before any error is printed below it.
            bar = stack.enter_context(tqdm(total=total, unit="rows", disable=not args.input))
            try:
                for record in classifier.predict(rows):
                    output.write(json.dumps(record, ensure_ascii=False) + "\n")
                    bar.update(1)
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
