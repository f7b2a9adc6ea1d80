"""The inference command's input checks that fail before a model loads: bad options exit 2 in
one line, bad input files exit 1 in one line naming the file and line. The checks that need a
trained model (errors mid-file, stdin) are in tests/stages/test_stage_chain.py."""

from __future__ import annotations

import pytest

from pipeline.commands.predict import main

NO_MODEL = "no/such/model"  # the input is refused before the model is looked for


@pytest.mark.parametrize("option, problem", [
    (["--batch-size", "0"], "argument --batch-size: 0 is not a positive integer"),
    (["--batch-size", "-3"], "argument --batch-size: -3 is not a positive integer"),
    (["--encoding", "klingon"], "argument --encoding: 'klingon' is not an encoding Python knows"),
])
def test_bad_options_are_one_line_argparse_errors(capsys, option, problem):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", NO_MODEL, *option, "some text"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"hf-text-pipeline predict: error: {problem}")


@pytest.mark.parametrize("name, data, problem", [
    ("rows.csv", b"id,text\n", ": no data rows (only a header)"),
    ("rows.tsv", b"", ": no data rows (the file is empty; a header row is required)"),
    ("rows.jsonl", b"\n\n", ": no data rows"),
    ("rows.csv", b"text,id,text\na,1,b\n",
     ": column name 'text' is repeated (columns 1 and 3); rename or remove one"),
    ("rows.jsonl", b'{"text": "a", "text": "b"}\n',
     ":1: key 'text' is repeated in one object (a JSON reader keeps only the last); rename or "
     "remove one"),
    ("rows.csv", b"id,text\n1,caf\xe9\n",
     ":2: byte 0xe9 at byte offset 13 is not valid utf-8; if the file is in another encoding, "
     "pass --encoding (e.g. cp1252 or latin-1)"),
])
def test_bad_input_files_fail_in_one_line_before_the_model_loads(tmp_path, capsys, name, data,
                                                                  problem):
    # Before: a header-only file or a repeated column went on to the model (and a repeated
    # column silently lost one of its values); a bad byte was a UnicodeDecodeError traceback.
    source = tmp_path / name
    source.write_bytes(data)
    output = tmp_path / "out.jsonl"
    assert main(["--model", NO_MODEL, "--input", str(source), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"predict: error: {source}{problem}"]
    assert not output.exists() and not list(tmp_path.glob("*.tmp"))
