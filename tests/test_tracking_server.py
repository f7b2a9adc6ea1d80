"""The team's tracking server, end to end: `hf-text-pipeline server` (make server) starts
PostgreSQL and `mlflow server` with basic auth on 127.0.0.1; `dvc repro`, a 4-job joblib sweep
and `dvc queue start -j 2` log through it under accounts the admin created, with nothing lost;
MLflow's compare page shows the runs in headless Chromium; wrong credentials stop a stage at its
start in one line; and the command starts once, stops everything, and keeps the runs."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from support import (
    PROJECT,
    chromium,
    compose_params,
    dvc_executable,
    dvc_experiments,
    free_port,
    make_project,
    page_text,
    run,
    subprocess_env,
    tiny_overrides,
)

# PostgreSQL and the server take half a minute to start, and the pipeline, a sweep and two
# queued experiments run through them: with the slow checks (CI runs them too).
pytestmark = pytest.mark.slow

LEARNING_RATES = ["3e-3", "1e-2", "3e-2", "1e-1"]
SCREENSHOTS = PROJECT / "test-artifacts"
EXPERIMENT = "tiny_sentiment"


def _require_postgresql() -> None:
    if list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or shutil.which("initdb"):
        return
    if os.environ.get("REQUIRE_POSTGRESQL"):
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql)")
    pytest.skip("PostgreSQL is not installed")


def _reachable_folder() -> Path:
    """A folder that PostgreSQL's own user can reach when the tests run as root (pytest's
    temporary folders are private to their owner)."""
    folder = Path(tempfile.mkdtemp(prefix="hf-text-pipeline-server-"))
    folder.chmod(0o755)
    return folder


def _password() -> str:
    return secrets.token_urlsafe(18)


def server(root: Path, env: dict, *args: str, check: bool = True):
    """`hf-text-pipeline server ...` run in the project ``root``."""
    return run([sys.executable, "-m", "pipeline.commands", "server", *args], root, env=env,
               check=check, timeout=400)


def _server_env(user: str | None, password: str | None, pg_password: str | None = None) -> dict:
    """The environment of whoever runs `server start`: the admin's credentials, and
    PostgreSQL's password for MLflow (without it, the command makes one at every start)."""
    return subprocess_env(MLFLOW_TRACKING_URI=None, MLFLOW_TRACKING_USERNAME=user,
                          MLFLOW_TRACKING_PASSWORD=password, PGPASSWORD=pg_password)


def _stop_for_good(root: Path, env: dict, state_dir: Path) -> None:
    """Stop through the command; should that fail, end what the record and the data folder
    name, so no test leaves a server behind."""
    done = server(root, env, "stop", "--state-dir", str(state_dir), check=False)
    record = state_dir / "server.json"
    if record.is_file():
        pid = json.loads(record.read_text())["pid"]
        if psutil.pid_exists(pid):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    pid_file = state_dir / "pg" / "data" / "postmaster.pid"
    if pid_file.is_file():
        postmaster = int(pid_file.read_text().split()[0])
        if psutil.pid_exists(postmaster):
            os.kill(postmaster, signal.SIGQUIT)  # PostgreSQL's immediate shutdown
    assert done.returncode == 0, done.stderr


def _processes_of(state_dir: Path) -> list[str]:
    """Command lines of running processes that use the server's state folder."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        line = " ".join(process.info["cmdline"] or [])
        if str(state_dir) in line and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(line)
    return found


@dataclass
class Team:
    root: Path
    uri: str
    accounts: dict[str, tuple[str, str]]  # name -> (username, password)
    start_seconds: float
    secrets: tuple[str, ...]  # what must never be written to disk

    def env(self, who: str, **extra: str | None) -> dict:
        username, password = self.accounts[who]
        # A request that takes longer than tracking.http_timeout (10 s) is sent again by MLflow,
        # POSTs too, which can record a logged model twice; CI's two shared cores can be that
        # slow, and this test is not about outages.
        return subprocess_env(**{
            "MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": username,
            "MLFLOW_TRACKING_PASSWORD": password, "OMP_NUM_THREADS": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "120", **extra})

    def client(self, monkeypatch) -> mlflow.MlflowClient:
        username, password = self.accounts["admin"]
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        return mlflow.MlflowClient(self.uri)


def _create_user(uri: str, admin: tuple[str, str], user: tuple[str, str]) -> None:
    token = base64.b64encode(":".join(admin).encode()).decode()
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/users/create", method="POST",
        data=json.dumps({"username": user[0], "password": user[1]}).encode(),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200


@pytest.fixture(scope="module")
def team(tiny_corpus, tiny_checkpoint):
    """The server started by the project's command in a copy of the project (its state in the
    default .state/server), an admin from the environment, and two users the admin created."""
    _require_postgresql()
    base = _reachable_folder()
    params = compose_params(tiny_overrides(tiny_corpus, tiny_checkpoint))
    root = make_project(base / "project", params)
    admin, pg_password = ("ci-admin", _password()), _password()
    env = _server_env(*admin, pg_password)
    state_dir = root / ".state" / "server"
    try:
        port, pg_port = free_port(), free_port()
        started = server(root, env, "start", "--port", str(port), "--pg-port", str(pg_port))
        seconds = float(re.search(r" in ([\d.]+) s:", started.stderr).group(1))
        uri = f"http://127.0.0.1:{port}"
        assert f"export MLFLOW_TRACKING_URI={uri}" in started.stdout.splitlines()
        accounts = {"admin": admin, "alice": ("alice", _password()), "bob": ("bob", _password())}
        for name in ("alice", "bob"):
            _create_user(uri, admin, accounts[name])
        yield Team(root, uri, accounts, seconds, (admin[1], pg_password))
    finally:
        try:
            _stop_for_good(root, env, state_dir)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    assert not _processes_of(state_dir), _processes_of(state_dir)


def _loss_steps(path: Path) -> tuple[list[int], list[int]]:
    history = json.loads(path.read_text())
    return (sorted(h["step"] for h in history if "loss" in h),
            sorted(h["step"] for h in history if "eval_loss" in h))


def _assert_recorded(client, run, history_path: Path) -> None:
    """FINISHED with the config as params, every logged step of the curves (validation's, then
    the kept model's), the dataset as inputs, the best checkpoint, and the model."""
    run_id = run.info.run_id
    assert run.info.status == "FINISHED", run.info
    assert {"train.learning_rate", "model.name", "trainer.optim"} <= set(run.data.params)
    losses, evaluations = _loss_steps(history_path)
    assert len(losses) > 3
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == losses
    assert sorted(m.step for m in client.get_metric_history(run_id, "validation_loss")) == \
        evaluations + [int(run.data.tags["train_steps"])]
    assert "validation_accuracy" in run.data.metrics
    contexts = [tag.value for given in run.inputs.dataset_inputs for tag in given.tags
                if tag.key == "mlflow.data.context"]
    assert sorted(contexts) == ["test", "train", "validation"]
    assert "config/params.yaml" in [a.path for a in client.list_artifacts(run_id, "config")]
    # tracking.log_checkpoints=best: the checkpoint the model came from, with no pickle in it.
    checkpoint, = client.list_artifacts(run_id, "checkpoints")
    files = [a.path for a in client.list_artifacts(run_id, checkpoint.path)]
    assert any(f.endswith("model.safetensors") for f in files), files
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pth"))], files
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert [(m.name, m.status.name) for m in models] == [("model", "READY")], models


@pytest.fixture(scope="module")
def logged(team):
    """Alice runs `dvc repro`; Bob a 4-job joblib sweep of the train stage into the experiment
    Alice's run created, every job logging its model (four uploads at once)."""
    run([dvc_executable(), "repro"], team.root, env=team.env("alice"), timeout=900)
    sweep = run([sys.executable, "-m", "stages.train", "-m", "hydra/launcher=joblib",
                 "hydra.launcher.n_jobs=4", f"train.learning_rate={','.join(LEARNING_RATES)}",
                 "tracking.log_sweep_models=true"],
                team.root, env=team.env("bob"), timeout=900)
    parent_id = re.search(r"MLflow parent run (\w+)", sweep.stderr).group(1)
    return parent_id


def test_repro_and_a_parallel_sweep_record_every_run_on_the_server(team, logged, monkeypatch):
    client = team.client(monkeypatch)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    pipeline_run, = client.search_runs([experiment.experiment_id],
                                       filter_string="tags.stages = 'train,evaluate,report'")
    _assert_recorded(client, pipeline_run, team.root / "models" / "train_history.json")
    assert "test_accuracy" in pipeline_run.data.metrics

    parent = client.get_run(logged)
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs"] == "4"
    assert parent.data.tags["failed_jobs"] == "none"
    children = sorted(client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{logged}'"),
        key=lambda c: int(c.data.tags["sweep_job"]))
    assert [float(c.data.params["train.learning_rate"]) for c in children] == \
        [float(lr) for lr in LEARNING_RATES]
    sweep_dir = Path(parent.data.tags["sweep_dir"])
    for child in children:
        _assert_recorded(client, child,
                         sweep_dir / child.data.tags["sweep_job"] / "train_history.json")
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "parallel"
    # Artifacts went through the server into its default destination, the project's state.
    stored = team.root / ".state" / "server" / "mlartifacts"
    assert len(list(stored.rglob("config/params.yaml"))) == 5
    # Nothing secret on disk: neither the admin's nor PostgreSQL's password is in any file of
    # the server (its logs, settings, database files) or of the project.
    leaks = [p for p in team.root.rglob("*") if p.is_file()
             for secret in team.secrets if secret.encode() in p.read_bytes()]
    assert not leaks, leaks
    print(f"server start (cold: initdb, migrations): {team.start_seconds:.1f} s")


def test_the_compare_page_shows_the_runs_to_a_signed_in_browser(team, logged, monkeypatch):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{team.uri}/api/2.0/mlflow/experiments/search?max_results=1",
                               timeout=30)
    assert anonymous.value.code == 401
    client = team.client(monkeypatch)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("sweep") != "true" and "dvc_exp_name" not in r.data.tags]
    assert len(runs) == 5
    page = (f"{team.uri}/#/compare-runs?"
            f"runs={urllib.parse.quote(json.dumps([r.info.run_id for r in runs]))}"
            f"&experiments={urllib.parse.quote(json.dumps([experiment.experiment_id]))}")
    wanted = [*(r.info.run_name for r in runs), "validation_accuracy", "train.learning_rate"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    screenshot = SCREENSHOTS / "mlflow-server-compare-runs.png"
    browser = chromium(auth=team.accounts["alice"])
    try:
        browser.get(page)
        try:
            WebDriverWait(browser, 120).until(lambda b: all(t in page_text(b) for t in wanted))
        except TimeoutException:
            pytest.fail(f"the compare page never showed "
                        f"{[t for t in wanted if t not in page_text(browser)]}")
        finally:
            browser.save_screenshot(str(screenshot))
    finally:
        browser.quit()
    assert screenshot.stat().st_size > 10_000


def test_wrong_or_missing_credentials_stop_a_stage_at_its_start_in_one_line(
        team, logged, monkeypatch):
    client = team.client(monkeypatch)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    before = len(client.search_runs([experiment.experiment_id]))
    model = team.root / "models" / "model" / "model.safetensors"
    written = model.stat().st_mtime_ns
    wrong = team.env("alice", MLFLOW_TRACKING_PASSWORD="not-alices-password")
    missing = team.env("alice", MLFLOW_TRACKING_USERNAME=None, MLFLOW_TRACKING_PASSWORD=None)
    for env, said, prefix, args in (
            (wrong, "refused the credentials of user 'alice'", "train", []),
            (missing, "needs credentials", "train", []),
            (wrong, "refused the credentials of user 'alice'", "sweep",
             ["-m", "train.learning_rate=1e-2,2e-2"])):
        done = run([sys.executable, "-m", "stages.train", *args, "train.num_train_epochs=1"],
                   team.root, env=env, check=False)
        assert done.returncode == 1
        errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
        assert errors == [f"{prefix}: error: MLflow server {team.uri} {said} (HTTP 401): set "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your "
                          "account on it"], done.stderr[-3000:]
        assert "Traceback" not in done.stdout + done.stderr
        assert "Launching" not in done.stdout + done.stderr, "no sweep job may start"
    assert model.stat().st_mtime_ns == written, "nothing trained"
    assert len(client.search_runs([experiment.experiment_id])) == before
    assert not (team.root / "mlruns-pending").exists(), "not taken for an outage"


def _tiny_experiment(root: Path, tiny_corpus: Path, tiny_checkpoint: Path) -> None:
    """conf/experiment/tiny.yaml: the tiny overrides as an experiment, for `dvc exp run -S`."""
    groups, values = [], {}
    for override in tiny_overrides(tiny_corpus, tiny_checkpoint):
        key, value = override.split("=", 1)
        if "." not in key:
            groups.append({f"override /{key}": value})
            continue
        *parents, leaf = key.split(".")
        node = values
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    (root / "conf" / "experiment" / "tiny.yaml").write_text(
        "# @package _global_\n" + yaml.safe_dump({"defaults": groups, **values}, sort_keys=False))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny experiment", "--no-verify"], root)


def test_two_queued_experiments_run_two_at_a_time_and_lose_nothing(
        team, logged, tiny_corpus, tiny_checkpoint, monkeypatch):
    """`dvc queue start -j 2` workers take the credentials of the environment that starts them
    (not of `dvc exp run --queue`)."""
    root = team.root
    _tiny_experiment(root, tiny_corpus, tiny_checkpoint)
    quiet = subprocess_env(MLFLOW_TRACKING_URI=None)  # enqueueing needs no credentials
    run([dvc_executable(), "exp", "run", "--queue", "-S", "experiment=tiny",
         "-S", "train.learning_rate=2e-3,2e-2"], root, env=quiet)
    try:
        run([dvc_executable(), "queue", "start", "-j", "2"], root, env=team.env("alice"))
        deadline = time.monotonic() + 900
        while True:
            status = run([dvc_executable(), "queue", "status"], root, env=quiet).stdout
            if status.count("Success") + status.count("Failed") >= 2 \
                    or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert status.count("Success") == 2, status
    finally:
        run([dvc_executable(), "queue", "stop", "--kill"], root, env=quiet, check=False)
    shown = json.loads(run([dvc_executable(), "exp", "show", "--json"], root, env=quiet).stdout)
    experiments = dvc_experiments(shown)
    assert len(experiments) == 2, experiments.keys()

    client = team.client(monkeypatch)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    queued = client.search_runs([experiment.experiment_id],
                                filter_string="tags.dvc_exp_name LIKE '%'")
    assert sorted(r.data.tags["dvc_exp_name"] for r in queued) == sorted(experiments)
    losses, evaluations = _loss_steps(root / "models" / "train_history.json")
    for mlflow_run in queued:
        exp = experiments[mlflow_run.data.tags["dvc_exp_name"]]
        assert mlflow_run.info.status == "FINISHED"
        assert mlflow_run.data.tags["stages"] == "train,evaluate,report"
        assert float(mlflow_run.data.params["train.learning_rate"]) == \
            exp["params"]["train"]["learning_rate"]
        assert mlflow_run.data.metrics["test_accuracy"] == exp["metrics"]["test"]["accuracy"]
        # The same data and epochs as the workspace's run: every step is there.
        run_id = mlflow_run.info.run_id
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == losses
        assert sorted(m.step for m in client.get_metric_history(run_id, "validation_loss")) \
            == evaluations + [int(mlflow_run.data.tags["train_steps"])]
        assert client.search_logged_models(
            [experiment.experiment_id], filter_string=f"source_run_id = '{run_id}'")


def test_the_server_command_starts_once_stops_everything_and_keeps_the_runs(tmp_path):
    """Refuses to start without usable credentials; a second start reports the running server;
    stop ends PostgreSQL and every server process; a restart keeps the runs and takes the
    admin's password from the environment again. As root, a state folder PostgreSQL's user
    cannot reach is refused in one line."""
    _require_postgresql()
    base = _reachable_folder()
    root = make_project(base / "project", {}, with_git=False)
    state_dir = base / "state"
    where = ["--state-dir", str(state_dir), "--port", str(free_port()),
             "--pg-port", str(free_port())]
    admin = ("ci-admin", _password())
    env = _server_env(*admin)
    try:
        for bad_env, said in ((_server_env(None, None), "set MLFLOW_TRACKING_USERNAME and "
                               "MLFLOW_TRACKING_PASSWORD: the server's admin account (and yours "
                               "as a client)"),
                              (_server_env("ci-admin", "short"), "MLFLOW_TRACKING_PASSWORD is "
                               "5 characters long; MLflow's basic auth needs at least 12")):
            done = server(root, bad_env, "start", *where, check=False)
            assert (done.returncode, done.stderr.strip()) == (1, f"server: error: {said}")
        if os.geteuid() == 0:
            private = tmp_path / "state"  # under pytest's folder, private to root
            done = server(root, env, "start", "--state-dir", str(private), check=False)
            assert done.returncode == 1 and done.stderr.strip().startswith(
                f"server: error: PostgreSQL runs as user postgres, which cannot reach "
                f"{private / 'pg'}")

        server(root, env, "start", *where)
        uri = json.loads((state_dir / "server.json").read_text())["uri"]
        pid = json.loads((state_dir / "server.json").read_text())["pid"]
        again = server(root, env, "start", *where)
        assert "already running" in again.stderr
        assert json.loads((state_dir / "server.json").read_text())["pid"] == pid
        wrong = server(root, _server_env("ci-admin", _password()), "start", *where, check=False)
        assert wrong.returncode == 1 and "refuses MLFLOW_TRACKING_USERNAME=ci-admin" in \
            wrong.stderr
        assert server(root, env, "status", *where).returncode == 0

        client_env = subprocess_env(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME=admin[0],
                                    MLFLOW_TRACKING_PASSWORD=admin[1])
        logging = ("import mlflow; mlflow.set_experiment('kept');"
                   "run = mlflow.start_run(); mlflow.log_metric('m', 1.0); mlflow.end_run();"
                   "print(run.info.run_id)")
        run_id = run([sys.executable, "-c", logging], root, env=client_env).stdout.split()[-1]

        stopped = server(root, env, "stop", *where)
        assert "stopped the MLflow server" in stopped.stderr
        assert "stopped PostgreSQL" in stopped.stderr
        assert not psutil.pid_exists(pid) and not _processes_of(state_dir)
        assert server(root, env, "status", *where, check=False).returncode == 1

        rotated = ("ci-admin", _password())
        server(root, _server_env(*rotated), "start", *where)
        reading = f"import mlflow; print(mlflow.get_run('{run_id}').data.metrics['m'])"
        kept = run([sys.executable, "-c", reading], root, env={
            **client_env, "MLFLOW_TRACKING_PASSWORD": rotated[1]})
        assert kept.stdout.split()[-1] == "1.0"
        old = run([sys.executable, "-c", reading], root, env=client_env, check=False)
        assert old.returncode != 0 and "401" in old.stderr
    finally:
        _stop_for_good(root, env, state_dir)
        shutil.rmtree(base, ignore_errors=True)
    assert not _processes_of(state_dir)
