"""Sweeps of the train stage on the tiny config: Hydra's joblib and submitit launchers, the
optuna_search sweeper, MLflow parent and child runs, the comparison files and command, and
2-process torchrun training. Each sweep reuses the project's tokenized data."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from pipeline.artifacts import hash_path
from support import (
    PROJECT,
    chromium,
    compose_params,
    dvc_executable,
    free_port,
    make_project,
    page_text,
    run,
    subprocess_env,
    tiny_overrides,
    wait_until_serving,
)

# Four epochs let the tiny model separate the learning rates: 1e-2 learns the task, the
# others stay at or near chance.
LEARNING_RATES = ["3e-3", "1e-2", "3e-2", "1e-1"]
# The MLflow UI screenshot stays after the run for people to look at (git ignores the folder).
SCREENSHOTS = PROJECT / "test-artifacts"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_corpus, tiny_checkpoint):
    """A tiny project whose data is downloaded and tokenized (by `dvc repro tokenize`) once."""
    params = compose_params(tiny_overrides(tiny_corpus, tiny_checkpoint)
                            + ["train.num_train_epochs=4", "tracking.log_model=false"])
    root = make_project(tmp_path_factory.mktemp("sweeps") / "project", params)
    # Parallel jobs share two cores: one thread each. The default database, as users have it.
    env = subprocess_env(MLFLOW_TRACKING_URI=None, OMP_NUM_THREADS="1")
    run([dvc_executable(), "repro", "tokenize"], root, env=env)
    return root, env


def _tokenized(root: Path) -> Path:
    return root / yaml.safe_load((root / "params.yaml").read_text())["paths"]["tokenized_dir"]


def _sweep(root: Path, env: dict, *overrides: str, check: bool = True):
    tokenized = _tokenized(root)
    before = hash_path(tokenized), {p: p.stat().st_mtime_ns for p in tokenized.rglob("*")}
    done = run([sys.executable, "-m", "stages.train", "-m", *overrides], root, env=env,
               check=check)
    after = hash_path(tokenized), {p: p.stat().st_mtime_ns for p in tokenized.rglob("*")}
    assert after == before, "a sweep job must reuse the tokenized data, not write it again"
    assert "database is locked" not in done.stdout + done.stderr
    match = re.search(r"MLflow parent run (\w+)", done.stderr)
    assert match, done.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = client.get_run(match.group(1))
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return done, client, parent, sorted(children, key=lambda c: int(c.data.tags["sweep_job"]))


@pytest.fixture(scope="module")
def joblib_sweep(project):
    root, env = project
    return _sweep(root, env, "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
                  f"train.learning_rate={','.join(LEARNING_RATES)}", "tracking.log_model=true")


def test_joblib_sweep_runs_four_jobs_in_parallel_as_children_of_one_parent(project, joblib_sweep):
    root, _ = project
    done, client, parent, children = joblib_sweep
    assert [c.info.status for c in children] == ["FINISHED"] * 4
    assert [float(c.data.params["train.learning_rate"]) for c in children] == \
        [float(lr) for lr in LEARNING_RATES]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["launcher"] == "JoblibLauncher"
    assert parent.data.tags["jobs"] == "4" and parent.data.tags["failed_jobs"] == "none"
    assert f"train.learning_rate={','.join(LEARNING_RATES)}" in parent.data.params["search_space"]
    # Parallel: the jobs' runs overlap in time.
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
    # Each job trained into its own folder; the DVC outs were never written.
    assert len(list(root.glob("multirun/*/*/*/model/model.safetensors"))) == 4
    assert not (root / "models").exists()


def test_sweep_parent_names_the_best_child_and_logs_the_comparison(project, joblib_sweep):
    _, client, parent, children = joblib_sweep
    best = max(children, key=lambda c: c.data.metrics["validation_accuracy"])
    assert best.data.metrics["validation_accuracy"] > min(
        c.data.metrics["validation_accuracy"] for c in children), "the sweep should separate them"
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.tags["best_job"] == best.data.tags["sweep_overrides"]
    assert parent.data.metrics["best_validation_accuracy"] == \
        best.data.metrics["validation_accuracy"]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert logged == {"comparison/runs.csv", "comparison/runs.md",
                      "comparison/metric_vs_params.png"}
    table = Path(client.download_artifacts(parent.info.run_id, "comparison/runs.csv"))
    rows = list(csv.DictReader(table.open()))
    assert rows[0]["run_id"] == best.info.run_id, "best first"
    assert {float(r["train.learning_rate"]) for r in rows} == {float(lr) for lr in LEARNING_RATES}
    assert {"validation_accuracy", "validation_loss", "status"} <= set(rows[0])


def test_runs_are_named_after_the_sweep_and_only_the_best_job_logs_its_model(project,
                                                                            joblib_sweep):
    """Before: every child named tiny_bert-tiny_sentiment-job<N>, the parent sweep-entrypoint,
    and every job logged a copy of its model (tracking.log_sweep_models is false here)."""
    root, _ = project
    _, client, parent, children = joblib_sweep
    assert parent.info.run_name == (f"sweep train.learning_rate={','.join(LEARNING_RATES)} "
                                    "tracking.log_model=true")
    assert [c.info.run_name for c in children] == [  # each job's overrides as Hydra gives them
        f"job{num} train.learning_rate={float(lr)} tracking.log_model=True"
        for num, lr in enumerate(LEARNING_RATES)]
    with_model = [c.info.run_id for c in children if client.search_logged_models(
        [parent.info.experiment_id], filter_string=f"source_run_id = '{c.info.run_id}'")]
    assert with_model == [parent.data.tags["best_run_id"]]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{with_model[0]}/model")
    finally:
        mlflow.set_tracking_uri(None)
    assert model.predict(pd.DataFrame({"text": ["the film was great"]}))[0]["label"] in \
        {"negative", "positive"}


def test_compare_command_rebuilds_the_comparison(project, joblib_sweep, tmp_path):
    root, env = project
    _, _, parent, children = joblib_sweep
    done = run([sys.executable, "-m", "pipeline.commands", "compare",
                "--parent", parent.info.run_id, "--metric", "validation_loss",
                "--output", str(tmp_path / "cmp")], root, env=env)
    assert done.stdout.split() == [str(tmp_path / "cmp" / name)
                                   for name in ("runs.csv", "runs.md", "metric_vs_params.png")]
    rows = list(csv.DictReader((tmp_path / "cmp" / "runs.csv").open()))
    assert len(rows) == 4
    losses = [float(r["validation_loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True), "ranked by the chosen metric"
    bad = run([sys.executable, "-m", "pipeline.commands", "compare", "--parent", "0" * 32], root,
              env=env, check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("compare: error:")
    assert "Traceback" not in bad.stderr


def test_a_failing_job_ends_failed_while_the_others_finish(project):
    root, env = project
    done, _, parent, children = _sweep(root, env, "hydra/launcher=joblib",
                                       "hydra.launcher.n_jobs=4",
                                       "train.num_train_epochs=1",
                                       "train.learning_rate=1e-2,2e-2,3e-2,-1", check=False)
    assert done.returncode != 0
    assert [c.info.status for c in children] == ["FINISHED"] * 3 + ["FAILED"]
    assert "must be a finite number above 0" in children[3].data.tags["error"]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["jobs"] == "4"
    assert parent.data.tags["failed_jobs"] == "3: train.num_train_epochs=1 train.learning_rate=-1"
    assert "job 3 failed (train.num_train_epochs=1 train.learning_rate=-1)" in done.stderr
    records = [json.loads(p.read_text()) for p in
               Path(parent.data.tags["sweep_dir"]).glob("*/job.json")]
    assert sorted(r["status"] for r in records) == ["COMPLETED"] * 3 + ["FAILED"]


def test_a_job_failing_inside_its_run_gets_the_error_on_that_run(project):
    """A failure after the stage opened its MLflow run tags that run instead of adding one."""
    root, env = project
    done, _, parent, children = _sweep(root, env, "train.metric_for_best_model=nope",
                                       check=False)
    assert done.returncode != 0
    assert len(children) == 1 and children[0].info.status == "FAILED"
    assert children[0].info.run_name == "job0 train.metric_for_best_model=nope"
    assert "train.metric_for_best_model=nope" in children[0].data.tags["error"]
    assert parent.info.status == "FAILED" and parent.data.tags["jobs"] == "1"


def test_submitit_local_launcher(project):
    root, env = project
    done, _, parent, children = _sweep(root, env, "hydra/launcher=submitit_local",
                                       "train.learning_rate=1e-2,3e-2")
    assert [c.info.status for c in children] == ["FINISHED"] * 2
    assert parent.data.tags["launcher"] == "LocalLauncher" and parent.info.status == "FINISHED"
    sweep_dir = Path(parent.data.tags["sweep_dir"])
    assert list(sweep_dir.glob(".submitit/*/*_result.pkl")), "jobs ran through submitit"


def test_optuna_search_sweeper(project):
    root, env = project
    done, _, parent, children = _sweep(root, env, "hydra/sweeper=optuna_search",
                                       "hydra.sweeper.n_trials=3",
                                       "train.learning_rate=tag(log,interval(3e-3,3e-2))")
    assert parent.data.tags["sweeper"] == "OptunaSearchSweeper"
    assert "interval(3e-3,3e-2)" in parent.data.params["search_space"]
    assert [c.info.status for c in children] == ["FINISHED"] * 3
    rates = [float(c.data.params["train.learning_rate"]) for c in children]
    assert all(3e-3 <= lr <= 3e-2 for lr in rates) and len(set(rates)) == 3
    results = yaml.safe_load((Path(parent.data.tags["sweep_dir"])
                              / "optimization_results.yaml").read_text())
    assert len(results["trials"]) == 3 and results["metric"] == "accuracy"
    assert results["best_value"] == max(c.data.metrics["validation_accuracy"] for c in children)
    assert results["best_value"] == parent.data.metrics["best_validation_accuracy"]


def test_optuna_search_without_a_search_space_is_a_clear_error(project):
    root, env = project
    done = run([sys.executable, "-m", "stages.train", "-m", "hydra/sweeper=optuna_search",
                "train.learning_rate=1e-2"], root, env=env, check=False)
    assert done.returncode != 0
    assert "optuna_search has nothing to search" in done.stderr


@pytest.fixture
def mlflow_server(project):
    """`mlflow server` on 127.0.0.1 over the sweep's database; its URL."""
    root, env = project
    port = free_port()
    log = (root / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/health", server, root / "mlflow-server.log")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_mlflow_ui_compares_the_sweep_runs(joblib_sweep, mlflow_server):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    _, _, parent, children = joblib_sweep
    runs = json.dumps([c.info.run_id for c in children])
    experiments = json.dumps([parent.info.experiment_id])
    page = (f"{mlflow_server}/#/compare-runs?runs={urllib.parse.quote(runs)}"
            f"&experiments={urllib.parse.quote(experiments)}")
    names = [c.info.run_name for c in children]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    try:
        browser.get(page)
        wanted = [*names, "validation_accuracy", "train.learning_rate"]
        try:
            WebDriverWait(browser, 90).until(lambda b: all(t in page_text(b) for t in wanted))
        except TimeoutException:
            missing = [t for t in wanted if t not in page_text(browser)]
            pytest.fail(f"the compare page never showed {missing}")
        finally:
            browser.save_screenshot(str(SCREENSHOTS / "mlflow-compare-runs.png"))
        body = page_text(browser)
    finally:
        browser.quit()
    # Every compared run's validation accuracy is on the page, as MLflow formats it.
    for child in children:
        value = child.data.metrics["validation_accuracy"]
        assert any(shown in body for shown in (f"{value:.3g}", f"{value:.4g}", repr(value))), value
    assert (SCREENSHOTS / "mlflow-compare-runs.png").stat().st_size > 10_000


def _last_epoch(history_path: Path) -> dict:
    """The optimizer steps taken and the last epoch's validation figures."""
    history = json.loads(history_path.read_text())
    last = [h for h in history if "eval_loss" in h][-1]
    return {"steps": max(h["step"] for h in history), "accuracy": last["eval_accuracy"],
            "loss": last["eval_loss"]}


def test_torchrun_two_processes_match_one_process(project):
    """DDP on CPU (gloo): 2 processes x batch 8 against 1 process x batch 16, same steps."""
    root, env = project
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")

    def run_ids() -> set[str]:
        experiment = client.get_experiment_by_name("tiny_sentiment")
        return set() if experiment is None else {
            r.info.run_id for r in client.search_runs([experiment.experiment_id])}

    settings = ["train.num_train_epochs=8", "train.learning_rate=1e-2"]
    history = root / "models" / "train_history.json"
    before = run_ids()
    torchrun = Path(sys.executable).parent / "torchrun"
    run([str(torchrun), "--nproc_per_node", "2", "-m", "stages.train", *settings,
         "train.per_device_train_batch_size=8"], root, env=env)
    new = [client.get_run(run_id) for run_id in run_ids() - before]
    assert len(new) == 1, "rank 0 alone logs the run"
    assert new[0].data.tags["world_size"] == "2"
    assert new[0].info.status == "FINISHED" and "validation_accuracy" in new[0].data.metrics
    distributed = _last_epoch(history)
    run([sys.executable, "-m", "stages.train", *settings, "train.per_device_train_batch_size=16"],
        root, env={**env, "OMP_NUM_THREADS": "2"})
    single = _last_epoch(history)
    assert distributed["steps"] == single["steps"], "each process took half of every batch"
    # The two shuffle differently (DistributedSampler), so they agree within a tolerance: the
    # same accuracy up to one of the 16 validation sentences, and a validation loss within 0.1.
    assert single["accuracy"] >= 0.9, single
    assert abs(distributed["accuracy"] - single["accuracy"]) <= 1 / 16 + 1e-9, (distributed, single)
    assert abs(distributed["loss"] - single["loss"]) <= 0.1, (distributed, single)


def test_a_sweep_job_logs_its_model_but_registers_no_version(project):
    """Jobs of a sweep do not compete for the registry's champion alias (parallel jobs would
    race for it): the sweep's best job, run as a DVC experiment, registers like any run."""
    root, env = project
    _, client, _, children = _sweep(root, env, "train.learning_rate=1e-2",
                                    "tracking.log_model=true", "tracking.log_checkpoints=none")
    job, = children
    assert job.info.status == "FINISHED"
    assert client.search_logged_models([job.info.experiment_id],
                                       filter_string=f"source_run_id = '{job.info.run_id}'")
    assert client.search_registered_models() == []
