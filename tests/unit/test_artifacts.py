"""Atomic outputs: leftovers of killed writers, errors that name the output, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime

import pytest
from tqdm import tqdm

from pipeline.artifacts import atomic_dir, atomic_file
from pipeline.errors import CheckpointError, DataValidationError
from stages.entrypoint import print_error, sweep_stamp


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_partial_folders_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    stale = tmp_path / f".raw.{_dead_pid()}.abcd1234.partial"
    (stale / "train.parquet").parent.mkdir()
    (stale / "train.parquet").write_text("half")
    stale_file = tmp_path / f".metrics.json.{_dead_pid()}.x1.partial"
    stale_file.write_text("{")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as writer:
        live = tmp_path / f".raw.{writer.pid}.efgh5678.partial"
        live.mkdir()
        try:
            with atomic_dir(tmp_path / "raw") as out:
                (out / "train.parquet").write_text("whole")
            with atomic_file(tmp_path / "metrics.json") as out:
                out.write_text("{}")
        finally:
            writer.kill()
    assert not stale.exists() and not stale_file.exists()
    assert live.is_dir(), "another process is writing it right now"
    assert (tmp_path / "raw" / "train.parquet").read_text() == "whole"


def test_an_error_names_the_output_not_its_temporary_folder(tmp_path):
    with pytest.raises(CheckpointError) as error, atomic_dir(tmp_path / "pretrained") as out:
        raise CheckpointError(f"{out}: the tokenizer files do not load: {out / 'tokenizer.json'}")
    assert ".partial" not in str(error.value)
    assert str(error.value).startswith(f"{tmp_path / 'pretrained'}: the tokenizer files")
    with pytest.raises(DataValidationError, match="^bad row$"), atomic_dir(tmp_path / "raw"):
        raise DataValidationError("bad row")
    assert not list(tmp_path.glob(".*.partial"))


def test_an_error_never_continues_a_progress_bar_line(capsys):
    bar = tqdm(total=10, file=sys.stderr)
    bar.update(3)
    print_error("tokenize", DataValidationError("data/raw: no dataset snapshot"))
    err = capsys.readouterr().err
    assert err.endswith("\ntokenize: error: data/raw: no dataset snapshot\n")


def test_two_sweeps_in_the_same_second_get_distinct_folders():
    now = datetime(2026, 11, 26, 0, 30, 1)
    assert sweep_stamp(now, pid=101) == "2026-11-26/00-30-01-101"
    assert sweep_stamp(now, pid=101) != sweep_stamp(now, pid=102)
    assert sweep_stamp().endswith(f"-{os.getpid()}")
