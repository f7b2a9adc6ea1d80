"""Air-gapped work and one-command reproduction.

A project copy on the tiny config runs `download` with the network on; everything after it
(the other stages, `predict`, the served model, `hf-text-pipeline reproduce`) runs with the
network off: in a network namespace of its own (`unshare -n`, only loopback) where the machine
allows one, else with the HTTP(S) proxy pointed at a closed port; with HF_HUB_OFFLINE=1 and
HF_DATASETS_OFFLINE=1; against the SQLite store. Every Python process also reports each attempt
to reach another host (an audit hook on socket connects and name lookups), so an attempt that a
library would swallow fails the test too.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from support import (
    compose_params,
    dvc_executable,
    free_port,
    make_project,
    run,
    subprocess_env,
    tiny_overrides,
)

EXPERIMENT = "tiny_sentiment"

# Loaded by every Python process of the air-gapped commands (on PYTHONPATH): logs each attempt
# to reach a host other than this one, with where it came from.
NETWORK_PROBE = '''
import os, socket, sys

_LOG = os.environ["NETWORK_PROBE_LOG"]
_LOCAL = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "::", None}


def _probe(event, args):
    if event == "socket.connect":
        sock, address = args
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or address[0] in _LOCAL:
            return
        what = f"connect to {address[0]}:{address[1]}"
    elif event == "socket.getaddrinfo":
        if args[0] in _LOCAL:
            return
        what = f"name lookup of {args[0]}"
    else:
        return
    import traceback
    with open(_LOG, "a") as log:
        log.write(f"{' '.join(sys.argv)[:200]}: {what}\\n"
                  + "".join(traceback.format_stack(limit=8)) + "\\n")


sys.addaudithook(_probe)
'''

# Run inside the air gap (a served model is on that side's loopback): serve the model, ask it
# one question, print the answer, stop the server.
SERVE_AND_ASK = '''
import json, os, signal, subprocess, sys, time, urllib.request

model, port, text, log = sys.argv[1:5]
with open(log, "w") as out:
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", model, "--host", "127.0.0.1",
                               "--port", port, "--env-manager", "local"], stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
try:
    deadline = time.monotonic() + 240
    while True:
        assert server.poll() is None, "the server exited"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline, "the server did not answer"
            time.sleep(0.5)
    body = json.dumps({"dataframe_records": [{"text": text}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    print(urllib.request.urlopen(request, timeout=60).read().decode())
finally:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(60)
'''


@functools.cache
def _namespace_works() -> bool:
    """Whether this machine gives a process a network namespace of its own with loopback up."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    done = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"],
                          capture_output=True, timeout=30)
    return done.returncode == 0


class AirGap:
    """Commands with the network off, and the attempts their processes made to reach it."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sitecustomize.py").write_text(NETWORK_PROBE)
        self.folder = folder
        self.log = folder / "attempts.log"

    def env(self, **overrides: str | None) -> dict:
        settings = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1",
                    # MLflow's usage telemetry is on unless this says otherwise.
                    "MLFLOW_DISABLE_TELEMETRY": "true",
                    "PYTHONPATH": str(self.folder), "NETWORK_PROBE_LOG": str(self.log),
                    # As in a user's shell: libraries go quiet under a test runner or in CI.
                    "PYTEST_CURRENT_TEST": None, "CI": None}
        env = subprocess_env(**{**settings, **overrides})
        if not _namespace_works():
            closed = "http://127.0.0.1:9"
            env.update(HTTP_PROXY=closed, HTTPS_PROXY=closed, http_proxy=closed,
                       https_proxy=closed, NO_PROXY="127.0.0.1,localhost",
                       no_proxy="127.0.0.1,localhost")
        return env

    def run(self, cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900,
            **env: str | None) -> subprocess.CompletedProcess:
        if _namespace_works():
            cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
        return run(cmd, cwd, check=check, timeout=timeout, env=self.env(**env))

    def attempts(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture(scope="module")
def gapped(tmp_path_factory, tiny_corpus, tiny_checkpoint):
    """The project after `download` with the network on and `dvc repro` of the rest with it
    off; its outputs pushed to a DVC remote (a local folder, the project's default); tracking
    to its own mlflow.db."""
    base = tmp_path_factory.mktemp("gapped")
    corpus = shutil.copytree(tiny_corpus, base / "corpus")
    root = make_project(base / "project",
                        compose_params(tiny_overrides(corpus, tiny_checkpoint)))
    env = subprocess_env(MLFLOW_TRACKING_URI=None)
    dvc = dvc_executable()
    run([dvc, "remote", "add", "--local", "-d", "-f", "store", str(base / "remote")], root,
        env=env)
    run([dvc, "repro", "download"], root, env=env)
    gap = AirGap(base / "air-gap")
    done = gap.run([dvc, "repro"], root, MLFLOW_TRACKING_URI=None)
    run([dvc, "push"], root, env=env)
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (run_,) = client.search_runs([experiment_id])
    return root, gap, done, client, run_


def test_every_stage_after_download_runs_with_the_network_off(gapped):
    root, gap, done, _, run_ = gapped
    for stage in ("tokenize", "train", "evaluate", "report"):
        assert f"Running stage '{stage}'" in done.stdout
    assert "Running stage 'download'" not in done.stdout
    assert run_.info.status == "FINISHED" and "test_accuracy" in run_.data.metrics
    assert (root / "reports" / "report.md").is_file()
    assert not gap.attempts(), f"a process tried to reach the network:\n{gap.attempts()}"


def test_predict_and_the_served_model_answer_with_the_network_off(gapped, tmp_path):
    root, gap, _, _, run_ = gapped
    text = "the film was superb"
    uri = f"runs:/{run_.info.run_id}/model"
    store = f"sqlite:///{root / 'mlflow.db'}"
    answers = []
    for model in ("models/model", uri):
        done = gap.run([sys.executable, "-m", "pipeline.commands", "predict", "--model", model,
                        text], root, MLFLOW_TRACKING_URI=store)
        answers.append(json.loads(done.stdout.splitlines()[-1]))
    assert answers[0] == answers[1] and set(answers[0]) == {"text", "label", "probabilities"}
    driver = tmp_path / "serve_and_ask.py"
    driver.write_text(SERVE_AND_ASK)
    done = gap.run([sys.executable, str(driver), uri, str(free_port()), text,
                    str(tmp_path / "serve.log")], root, MLFLOW_TRACKING_URI=store)
    (served,) = json.loads(done.stdout.splitlines()[-1])["predictions"]
    assert served == {k: v for k, v in answers[0].items() if k != "text"}
    assert not gap.attempts(), f"a process tried to reach the network:\n{gap.attempts()}"


def test_reproduce_pulls_the_inputs_retrains_and_gets_every_metric_identical(gapped):
    """On the network-off side: the inputs come from the DVC remote (download does not run),
    train, evaluate and report run again into a new run tagged reproduces=<run id>, and every
    metric is identical to the last digit, step by step."""
    root, gap, _, client, run_ = gapped
    done = gap.run([sys.executable, "-m", "pipeline.commands", "reproduce", run_.info.run_id],
                   root, check=False, MLFLOW_TRACKING_URI=None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pulled the inputs from the DVC remote 'store'" in done.stderr
    assert "Running stage 'download'" not in done.stdout
    for stage in ("train", "evaluate", "report"):
        assert f"Running stage '{stage}'" in done.stdout
    (new,) = client.search_runs([run_.info.experiment_id],
                                filter_string=f"tags.reproduces = '{run_.info.run_id}'")
    assert new.info.run_id != run_.info.run_id and new.info.status == "FINISHED"
    assert new.data.tags["reproduction"] == "identical"
    assert new.data.tags["stages"] == "train,evaluate,report"
    assert new.data.tags["model_sha256"] == run_.data.tags["model_sha256"]
    for name, value in run_.data.metrics.items():
        if not name.endswith(("_runtime", "_per_second")):
            assert new.data.metrics[name] == value, name
    files = {a.path for a in client.list_artifacts(new.info.run_id, "reproduction")}
    assert files == {"reproduction/comparison.md", "reproduction/comparison.json"}
    assert f"reproduces every metric of run {run_.info.run_id}" in done.stderr
    assert "| test_accuracy |" in done.stdout
    assert not list((root / ".dvc" / "tmp" / "reproduce").iterdir()), "the worktree is removed"
    assert len(run(["git", "worktree", "list"], root).stdout.splitlines()) == 1
    assert not gap.attempts(), f"a process tried to reach the network:\n{gap.attempts()}"


def test_reproduce_stops_before_training_when_the_source_data_changed(gapped, tmp_path):
    """The remote does not have the inputs, so download runs again, from a source that has
    changed since the run: one line names the dataset, and nothing trains."""
    root, gap, _, client, run_ = gapped
    source = Path(yaml.safe_load((root / "params.yaml").read_text())["dataset"]["path"])
    train = source / "train.jsonl"
    kept = train.read_text()
    dvc = dvc_executable()
    runs_before = len(client.search_runs([run_.info.experiment_id]))
    try:
        train.write_text(kept + json.dumps({"sentence": "train the plot was superb 99",
                                            "label": "positive"}) + "\n")
        run([dvc, "remote", "add", "--local", "-d", "-f", "store", str(tmp_path / "empty")],
            root)
        done = gap.run([sys.executable, "-m", "pipeline.commands", "reproduce",
                        run_.info.run_id], root, check=False, MLFLOW_TRACKING_URI=None)
    finally:
        train.write_text(kept)
        run([dvc, "remote", "add", "--local", "-d", "-f", "store",
             str(root.parent / "remote")], root)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("reproduce: error")]
    assert errors == [done.stderr.strip().splitlines()[-1]], done.stderr[-3000:]
    (line,) = errors
    assert line.startswith("reproduce: error: the dataset snapshot (data/raw) is not the one "
                           f"run {run_.info.run_id} trained on: dataset_sha256 ")
    assert f"its source (local {source}) changed since the run" in line
    assert line.endswith("nothing was trained")
    assert "Running stage 'download'" in done.stdout
    assert "Running stage 'train'" not in done.stdout
    assert len(client.search_runs([run_.info.experiment_id])) == runs_before
    assert not gap.attempts(), f"a process tried to reach the network:\n{gap.attempts()}"


def test_reproduce_of_an_unknown_run_is_one_line(tmp_path):
    root = make_project(tmp_path / "project", compose_params([]), with_git=False)
    store = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.MlflowClient(store).search_experiments()  # an empty store
    done = run([sys.executable, "-m", "pipeline.commands", "reproduce", "0123456789abcdef"],
               root, check=False, env=subprocess_env(MLFLOW_TRACKING_URI=None))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"reproduce: error: no MLflow run 0123456789abcdef in "
                                        f"{store}"]
