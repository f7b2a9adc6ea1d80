"""The DVC pipeline under faults a workspace meets: two repros at once, corrupted cache and edited
outputs, changed tokenization, misspelt experiment names, two sweeps in the same second."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from support import (
    compose_params,
    dvc_executable,
    make_project,
    run,
    subprocess_env,
    tiny_overrides,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_corpus, tiny_checkpoint):
    """A tiny project after one `dvc repro`; each test leaves it up to date again."""
    root = make_project(tmp_path_factory.mktemp("faults") / "project",
                        compose_params(tiny_overrides(tiny_corpus, tiny_checkpoint)))
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    run([dvc_executable(), "repro"], root, env=env)
    return root, env


def _status(root: Path, env: dict) -> dict:
    return json.loads(run([dvc_executable(), "status", "--json"], root, env=env).stdout)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_second_repro_in_the_same_workspace_fails_fast_and_corrupts_nothing(project):
    root, env = project
    lock_before = (root / "dvc.lock").read_text()
    first = subprocess.Popen([dvc_executable(), "repro", "-f", "-s", "train"], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        output = ""
        while "Running stage 'train'" not in output and time.monotonic() < deadline:
            output += first.stdout.readline()
        assert "Running stage 'train'" in output, output
        second = run([dvc_executable(), "repro"], root, env=env, check=False, timeout=120)
    finally:
        output += first.communicate(timeout=300)[0]
    assert second.returncode != 0
    # DVC's read/write lock on the outputs: the message names the process holding them
    assert "is busy, it is being blocked by" in second.stderr, second.stderr
    assert f"(PID {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, output
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(yaml.safe_load(lock_before)["stages"])
    # The forced train re-ran bit for bit (CPU training is deterministic), so evaluate is
    # still valid; only the history's run times changed, which the report prints.
    assert set(_status(root, env)) == {"report"}
    run([dvc_executable(), "repro"], root, env=env)
    assert _status(root, env) == {}


def test_a_corrupted_cache_object_is_detected_and_rebuilt_not_trusted(project):
    root, env = project
    train = root / "data" / "raw" / "train.parquet"
    good = _digest(train)
    entry = next(o for o in yaml.safe_load((root / "dvc.lock").read_text())
                 ["stages"]["download"]["outs"] if o["path"] == "data/raw")
    listing = root / ".dvc/cache/files/md5" / entry["md5"][:2] / entry["md5"][2:]
    file_md5 = next(f["md5"] for f in json.loads(listing.read_text())
                    if f["relpath"] == "train.parquet")
    cached = root / ".dvc/cache/files/md5" / file_md5[:2] / file_md5[2:]
    cached.chmod(0o644)
    cached.write_bytes(b"not a parquet file")
    train.unlink()
    run([dvc_executable(), "checkout"], root, env=env, check=False)
    # `dvc checkout` copies what the cache holds; `dvc status` and `dvc repro` check hashes
    assert "download" in _status(root, env)
    done = run([dvc_executable(), "repro"], root, env=env)
    assert "Running stage 'download'" in done.stdout
    assert "Running stage 'tokenize'" not in done.stdout, "same snapshot: nothing downstream"
    assert _digest(train) == good
    assert _status(root, env) == {}


def test_an_edited_output_is_detected_and_rebuilt(project):
    root, env = project
    stats = root / "data" / "tokenized" / "tokenize_stats.json"
    good = stats.read_text()
    stats.write_text(good.replace('"max_length": 32', '"max_length": 64'))
    status = _status(root, env)
    assert status["tokenize"] == [{"changed outs": {"data/tokenized": "modified"}}]
    assert "train" in status, "a stage whose input changed is stale too"
    done = run([dvc_executable(), "repro"], root, env=env)
    # DVC restores the stage's recorded outputs from its run cache (or re-runs it)
    assert "Stage 'tokenize' is cached - skipping run, checking out outputs" in done.stdout \
        or "Running stage 'tokenize'" in done.stdout
    assert "Running stage 'train'" not in done.stdout, "restored identical: train stays valid"
    assert stats.read_text() == good
    assert _status(root, env) == {}


@pytest.mark.parametrize(("change", "stale"), [
    ({"tokenize": {"max_length": 24}}, {"tokenize", "report"}),
    ({"model": {"name": "tiny_bert_v2"}}, {"download", "report"}),
])
def test_changing_the_tokenizer_or_max_length_retokenizes(project, change, stale):
    """A new model (its tokenizer comes with it) re-runs download, hence tokenize; a new
    max_length re-runs tokenize; changing nothing re-uses everything."""
    root, env = project
    params_file = root / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    for section, values in change.items():
        params[section].update(values)
    try:
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        assert set(_status(root, env)) == stale
    finally:
        params_file.write_text(original)
    assert _status(root, env) == {}


def test_a_misspelt_experiment_fails_with_the_list_and_runs_nothing(project):
    root, env = project
    lock = (root / "dvc.lock").read_text()
    done = run([dvc_executable(), "exp", "run", "-S", "experiment=mrpc_minlm"], root, env=env,
               check=False)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "Could not find 'experiment/mrpc_minlm'" in output and "mrpc_minilm" in output
    assert "Running stage" not in output
    assert (root / "dvc.lock").read_text() == lock


def test_two_sweeps_started_in_the_same_second_get_their_own_folders(project):
    root, env = project
    # A job that fails at once (a bad value) still leaves its folder and job record.
    command = ["python", "-m", "stages.train", "-m", "train.learning_rate=-1"]
    sweeps = [subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for sweep in sweeps:
        sweep.communicate(timeout=300)
    records = sorted(root.glob("multirun/*/*/0/job.json"))
    assert len(records) == 2, records
    assert records[0].parent.parent != records[1].parent.parent
