"""`make demo`: the two-minute first look, on the real MiniLM-L6 and BBC News."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from huggingface_hub import ModelCard

from support import PROJECT, compose_params, dvc_executable, make_project, run, subprocess_env

pytestmark = pytest.mark.slow


def test_make_demo_writes_every_output_and_leaves_make_repro_the_full_run(tmp_path):
    root = make_project(tmp_path / "project", compose_params([]))
    shutil.copy(PROJECT / "Makefile", root / "Makefile")
    env = subprocess_env(MLFLOW_TRACKING_URI=None)
    venv = Path(sys.executable).parent.parent
    # -o install: the test's environment is the installed one
    run(["make", "-o", "install", "demo", f"VENV={venv}"], root, env=env, timeout=1800)

    paths = compose_params([])["paths"]
    for key in ("raw_dir", "pretrained_dir", "tokenized_dir", "model_dir", "predictions_dir",
                "report_dir", "release_dir"):
        assert any((root / paths[key]).iterdir()), key
    for key in ("history_path", "metrics_path", "confusion_path"):
        assert (root / paths[key]).is_file(), key
    metrics = json.loads((root / paths["metrics_path"]).read_text())
    assert metrics["test"]["examples"] == 426
    assert metrics["test"]["accuracy"] > 0.8, metrics  # 5 topics: chance is about 0.2
    assert "Per class on **test**" in (root / paths["report_dir"] / "report.md").read_text()
    card = ModelCard.load(root / paths["release_dir"] / "README.md").data
    assert card.eval_results and card.base_model == "sentence-transformers/all-MiniLM-L6-v2"

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    [tracked] = client.search_runs([client.get_experiment_by_name("bbc_news").experiment_id])
    assert tracked.info.status == "FINISHED" and tracked.data.params["train.max_train_samples"] \
        == "800"
    shown = json.loads(run([dvc_executable(), "exp", "show", "--json"], root, env=env).stdout)
    experiments = [exp for commit in shown for exp in commit.get("experiments") or []]
    assert [e["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]["max_train_samples"]
            for e in experiments] == [800]

    # params.yaml is the default again, so `make repro` (dvc repro) trains the full model; the
    # snapshots and tokenized data carry over
    assert yaml.safe_load((root / "params.yaml").read_text()) == compose_params([])
    status = json.loads(run([dvc_executable(), "status", "--json"], root, env=env).stdout)
    assert set(status) == {"train", "report"}, status
