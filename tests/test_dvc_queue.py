"""DVC's experiment queue over the whole pipeline: two models (a config group) x two learning
rates, run two at a time, listed by `dvc exp show` and joined to MLflow by experiment name."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import build_tiny_checkpoint

from support import (
    compose_params,
    dvc_executable,
    dvc_experiments,
    make_project,
    run,
    subprocess_env,
    tiny_overrides,
)


def _write_yaml(path: Path, text: str, data: dict) -> None:
    path.write_text(text + yaml.safe_dump(data, sort_keys=False))


def _wait_for_queue(root: Path, env: dict, count: int, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = run([dvc_executable(), "queue", "status"], root, env=env).stdout
        finished = status.count("Success") + status.count("Failed")
        if finished >= count or time.monotonic() > deadline:
            return status
        time.sleep(5)


# Four whole pipelines through DVC's queue take about three minutes here: with the slow checks.
@pytest.mark.slow
def test_queued_experiments_switch_model_and_learning_rate(tmp_path, tiny_corpus, tiny_checkpoint):
    one_layer = build_tiny_checkpoint(tmp_path / "one_layer", layers=1, seed=1)
    root = make_project(tmp_path / "project",
                        compose_params(tiny_overrides(tiny_corpus, tiny_checkpoint)))
    for name, path in (("tiny_two_layer", tiny_checkpoint), ("tiny_one_layer", one_layer)):
        _write_yaml(root / "conf" / "model" / f"{name}.yaml", "",
                    {"name": name, "source": "local", "path": str(path), "revision": None,
                     "base_model": None, "license": None})
    _write_yaml(root / "conf" / "experiment" / "tiny.yaml", "# @package _global_\n", {
        "defaults": [{"override /dataset": "glue_sst2"}, {"override /train": "smoke"}],
        "dataset": {"name": "tiny_sentiment", "source": "local", "path": str(tiny_corpus),
                    "format": "jsonl", "revision": None, "metrics": None, "id_column": None,
                    "submission_name": None},
        "tokenize": {"max_length": 32},
        "train": {"num_train_epochs": 2, "max_train_samples": None, "max_eval_samples": None},
        "tracking": {"log_model": False},
    })
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny models", "--no-verify"], root)
    env = subprocess_env(MLFLOW_TRACKING_URI=None, OMP_NUM_THREADS="1")

    run([dvc_executable(), "exp", "run", "--queue", "-S", "experiment=tiny",
         "-S", "model=tiny_two_layer,tiny_one_layer", "-S", "train.learning_rate=1e-3,1e-2"],
        root, env=env)
    run([dvc_executable(), "queue", "start", "-j", "2"], root, env=env)
    status = _wait_for_queue(root, env, 4)
    assert status.count("Success") == 4, status + run(
        [dvc_executable(), "queue", "logs", status.split()[-4]], root, env=env, check=False).stdout

    shown = json.loads(run([dvc_executable(), "exp", "show", "--json"], root, env=env).stdout)
    experiments = dvc_experiments(shown)
    assert len(experiments) == 4, experiments.keys()
    combos = {(e["params"]["model"]["name"], e["params"]["train"]["learning_rate"])
              for e in experiments.values()}
    assert combos == {(m, lr) for m in ("tiny_two_layer", "tiny_one_layer") for lr in (1e-3, 1e-2)}
    assert all("accuracy" in e["metrics"]["test"] for e in experiments.values())

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("tiny_sentiment").experiment_id
    runs = client.search_runs([experiment_id], filter_string="tags.dvc_exp_name LIKE '%'")
    assert sorted(r.data.tags["dvc_exp_name"] for r in runs) == sorted(experiments)
    for mlflow_run in runs:
        exp = experiments[mlflow_run.data.tags["dvc_exp_name"]]
        assert mlflow_run.info.status == "FINISHED"
        assert mlflow_run.info.run_name == mlflow_run.data.tags["dvc_exp_name"]
        assert mlflow_run.data.tags["stages"] == "train,evaluate,report"
        assert mlflow_run.data.params["model.name"] == exp["params"]["model"]["name"]
        assert mlflow_run.data.metrics["test_accuracy"] == exp["metrics"]["test"]["accuracy"]

    out = tmp_path / "comparison"
    run(["python", "-m", "pipeline.commands", "compare", "--experiment", "tiny_sentiment",
         "--dvc-experiments", "--output", str(out)], root, env=env)
    table = (out / "runs.md").read_text()
    assert all(name in table for name in experiments)
    assert "model.name" in table and "train.learning_rate" in table
