"""Atomic outputs: leftovers of killed writers, errors that name the output, one-line errors;
content hashes that are computed once per process yet follow every change."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from datetime import datetime

import pytest
from tqdm import tqdm

from pipeline import artifacts
from pipeline.artifacts import atomic_dir, atomic_file, hash_path
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


def _aged(folder, files: dict[str, bytes], mtime: float | None = None) -> None:
    """Write ``files`` under ``folder`` with an mtime in the past, as a stage's inputs have."""
    past = time.time() - 60 if mtime is None else mtime
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
        os.utime(folder / name, (past, past))


def _count_opens(monkeypatch) -> list[str]:
    opened = []

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(artifacts, "open", counting_open, raising=False)
    return opened


def test_an_unchanged_folder_is_read_once_per_process(tmp_path, monkeypatch):
    folder = tmp_path / "tokenized"
    _aged(folder, {"train/data.arrow": b"x" * 5000, "dataset_dict.json": b"{}"})
    opened = _count_opens(monkeypatch)
    first = hash_path(folder)
    assert hash_path(folder) == hash_path(str(folder)) == first
    assert sorted(opened) == sorted(str(p) for p in folder.rglob("*") if p.is_file())


def test_a_changed_file_is_hashed_again(tmp_path, monkeypatch):
    folder = tmp_path / "pretrained"
    _aged(folder, {"model.safetensors": b"a" * 100, "config.json": b"{}"})
    first = hash_path(folder)
    # Same size, same (restored) mtime: only the inode's ctime tells the change apart.
    st = (folder / "model.safetensors").stat()
    (folder / "model.safetensors").write_bytes(b"b" * 100)
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    second = hash_path(folder)
    assert second != first
    (folder / "model.safetensors").write_bytes(b"c" * 100)  # just written: never remembered
    third = hash_path(folder)
    assert third not in (first, second)
    (folder / "model.safetensors").write_bytes(b"d" * 100)
    assert hash_path(folder) not in (first, second, third)
    _aged(folder, {"extra.txt": b"a new file"})
    assert hash_path(folder) not in (first, second, third)


def test_a_folder_replaced_by_atomic_dir_is_hashed_again(tmp_path):
    target = tmp_path / "tokenized"
    past = time.time() - 60
    with atomic_dir(target) as out:
        _aged(out, {"data.arrow": b"old!"}, mtime=past)
    first = hash_path(target)
    with atomic_dir(target) as out:  # same name, size and mtime: a new inode
        _aged(out, {"data.arrow": b"new!"}, mtime=past)
    assert hash_path(target) != first
    assert hash_path(target) == hashlib.sha256(b"data.arrow\0new!\0").hexdigest()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=oct)
def test_outputs_are_created_with_the_umask_so_a_release_can_be_shared(tmp_path, umask):
    """tempfile's private 0700 folders and 0600 files would otherwise become the outputs, and
    safetensors 0.8 writes weights 0600 whatever the umask."""
    import numpy as np
    from safetensors.numpy import save_file

    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "release") as out:
            save_file({"weight": np.zeros(2, dtype=np.float32)}, str(out / "model.safetensors"))
            (out / "figures").mkdir()
        artifacts.write_json(tmp_path / "metrics.json", {"accuracy": 1.0})
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in
             (tmp_path / "release", tmp_path / "release" / "figures",
              tmp_path / "release" / "model.safetensors", tmp_path / "metrics.json")}
    assert modes == {"release": 0o777 & ~umask, "figures": 0o777 & ~umask,
                     "model.safetensors": 0o666 & ~umask, "metrics.json": 0o666 & ~umask}
