"""MLflow records that stay true under faults: a killed run, an unreachable tracking server, and
values beyond MLflow's limits. The server tests run a real ``mlflow server`` on 127.0.0.1."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from omegaconf import OmegaConf

from pipeline import training
from pipeline.config import load_config
from pipeline.pending import SYNCED_FROM_TAG, pending_runs
from pipeline.tracking import (
    CONTINUED_BY_TAG,
    HOST_TAG,
    MODEL_SHA_TAG,
    PID_START_TAG,
    PID_TAG,
    RECONCILED_TAG,
    stage_run,
)
from support import (
    PROJECT,
    compose_params,
    free_port,
    paths_under,
    run_stages,
    subprocess_env,
    tiny_overrides,
    wait_until_serving,
)


def tiny_params(root: Path, corpus: Path, checkpoint: Path, *overrides: str) -> dict:
    """The tiny config with every path, the pending store included, under ``root``."""
    return compose_params([*tiny_overrides(corpus, checkpoint), *paths_under(root),
                           f"tracking.pending_dir={root / 'mlruns-pending'}", *overrides])


def tiny_config(root: Path, corpus: Path, checkpoint: Path, *overrides: str):
    return load_config(OmegaConf.create(tiny_params(root, corpus, checkpoint, *overrides)))


# -- a killed run -----------------------------------------------------------------------------

HOLDER = """
import json, sys, time
from omegaconf import OmegaConf
from pipeline.config import load_config
from pipeline.tracking import stage_run
cfg = load_config(OmegaConf.create(json.loads(sys.argv[1])))
with stage_run("train", cfg, log_params=True) as run:
    print(run.info.run_id, flush=True)
    time.sleep(600)
"""


def _hold_a_run(params: dict, env: dict) -> tuple[subprocess.Popen, str]:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps(params)], env=env,
                              cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    line = holder.stdout.readline().strip()
    assert line, holder.stderr.read()[-3000:] if holder.poll() is not None else "no run id"
    return holder, line


def test_a_killed_run_is_ended_killed_by_the_next_stage_run_and_live_runs_are_left_alone(
        tmp_path, tiny_corpus, tiny_checkpoint):
    """A SIGKILLed process leaves its run RUNNING; the next stage run of the experiment ends it
    KILLED, tagged continued_by=<the new run>, and lists it in its own reconciled_runs tag. A
    run whose process still runs (a parallel sweep job), a run of another host and a run with
    no process tags stay RUNNING."""
    uri = os.environ["MLFLOW_TRACKING_URI"]  # this test's SQLite database (conftest)
    params = tiny_params(tmp_path, tiny_corpus, tiny_checkpoint)
    env = subprocess_env(PYTHONPATH=str(PROJECT))
    victim, victim_id = _hold_a_run(params, env)
    live, live_id = _hold_a_run(params, env)
    try:
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=60)
        client = mlflow.MlflowClient(uri)
        assert client.get_run(victim_id).info.status == "RUNNING"
        experiment_id = client.get_run(victim_id).info.experiment_id
        victim_tags = client.get_run(victim_id).data.tags
        elsewhere = client.create_run(experiment_id, run_name="elsewhere", tags={
            HOST_TAG: "another-host", PID_TAG: victim_tags[PID_TAG],
            PID_START_TAG: victim_tags[PID_START_TAG]}).info.run_id
        untagged = client.create_run(experiment_id, run_name="older code").info.run_id

        with stage_run("train", load_config(OmegaConf.create(params))) as run:
            new_id = run.info.run_id

        killed = client.get_run(victim_id)
        assert killed.info.status == "KILLED"
        assert killed.data.tags[CONTINUED_BY_TAG] == new_id
        assert killed.info.end_time is not None
        assert client.get_run(new_id).data.tags[RECONCILED_TAG] == victim_id
        assert client.get_run(new_id).info.status == "FINISHED"
        for run_id in (live_id, elsewhere, untagged):
            assert client.get_run(run_id).info.status == "RUNNING", run_id
            assert CONTINUED_BY_TAG not in client.get_run(run_id).data.tags
    finally:
        live.terminate()
        live.communicate(timeout=60)
    assert client.get_run(live_id).info.status == "KILLED"  # SIGTERM: its own stage_run ends it
    assert CONTINUED_BY_TAG not in client.get_run(live_id).data.tags


# -- values beyond MLflow's limits ------------------------------------------------------------


def test_params_beyond_mlflow_limits_are_logged_cut_and_training_records_its_run(
        tmp_path, tiny_corpus, tiny_checkpoint):
    """2000 long label names: the dataset.label_names param exceeds MLflow's 6000-character
    value limit; the run is still recorded in the default SQLite store, the value cut with a
    marker, the whole config in config/params.yaml (the model config's id2label, which
    transformers' callback would log, is not a param); 250 more params go in batches MLflow
    accepts, a too-long key is cut."""
    from pipeline.tracking import record_params

    names = ["negative", "positive"] + [f"a long and descriptive label name {i:04d}"
                                        for i in range(1998)]
    cfg = tiny_config(tmp_path, tiny_corpus, tiny_checkpoint, "train.num_train_epochs=1",
                      "tracking.log_model=false", f"dataset.label_names={json.dumps(names)}")
    run_stages(cfg, "download", "tokenize", "train")
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run, = client.search_runs([client.get_experiment_by_name("tiny_sentiment").experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["dataset.label_names"].endswith(
        f" ...[truncated: {len(str(names))} characters; the whole config is the artifact "
        "config/params.yaml]")
    assert params["dataset.label_names"].startswith(str(names)[:5000])
    assert not {"id2label", "label2id", "learning_rate"} & set(params)
    assert len(run.data.metrics) > 3 and "validation_accuracy" in run.data.metrics
    config = yaml.safe_load(mlflow.artifacts.load_text(
        f"{run.info.artifact_uri}/config/params.yaml"))
    assert config["dataset"]["label_names"] == names

    with stage_run("train", cfg) as extra:
        cut = record_params({**{f"extra.p{i}": i for i in range(250)}, "x" * 300: "long key"})
    assert cut == ["x" * 300]
    logged = client.get_run(extra.info.run_id).data.params
    assert len(logged) == 251 and logged["extra.p249"] == "249"


# -- an unreachable tracking server -----------------------------------------------------------


class Server:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite store and proxied artifacts in ``root``)
    that a test can kill outright and start again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.root / "server.log", "a") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                 f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination",
                 str(self.root / "server-artifacts"), "--host", "127.0.0.1", "--port",
                 str(self.port), "--workers", "1"],
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=subprocess_env(MLFLOW_TRACKING_URI=None,
                                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        wait_until_serving(f"{self.uri}/health", self.process, self.root / "server.log")

    def kill(self) -> None:
        """Gone at once, like a crashed or unplugged server (its worker processes too)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "server"
    root.mkdir()
    running = Server(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", running.uri)
    # tracking.http_* would set these for the whole pytest process; set here, they are undone.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    yield running
    running.kill()
    mlflow.set_tracking_uri(None)


def _outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "unreachable" in r.getMessage()]


def _assert_complete(client, run_id: str, history_path: Path) -> None:
    """The server run holds every value the training history holds, step for step, and the
    dataset's splits as inputs."""
    run = client.get_run(run_id)
    history = json.loads(history_path.read_text())
    losses = sorted(h["step"] for h in history if "loss" in h)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == losses
    evals = sorted(h["step"] for h in history if "eval_loss" in h)  # then the kept model's
    assert sorted(m.step for m in client.get_metric_history(run_id, "validation_loss")) == \
        evals + [int(run.data.tags["train_steps"])]
    assert "validation_accuracy" in run.data.metrics
    assert {"train.learning_rate", "trainer.optim"} <= set(run.data.params)
    assert MODEL_SHA_TAG in run.data.tags and "dataset_sha256" in run.data.tags
    contexts = [tag.value for given in run.inputs.dataset_inputs for tag in given.tags
                if tag.key == "mlflow.data.context"]
    assert sorted(contexts) == ["test", "train", "validation"]
    files = {a.path for a in client.list_artifacts(run_id, "config")}
    assert files == {"config/params.yaml"}
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert [m.name for m in models] == ["model"]


def test_server_down_at_the_start_trains_then_the_next_stage_sends_the_records(
        server, tmp_path, tiny_corpus, tiny_checkpoint, caplog):
    """No server answers when train starts: training runs and finishes, one warning says the
    server is unreachable, one line at the end says what is kept in the pending store and how
    to send it, and one that the model was not registered (the registry is the server's).
    Once the server is up, the evaluate stage sends the train run to it at its start and
    continues it there: one run with every loss step, the model, its best checkpoint and
    evaluate's metrics, and nothing left pending."""
    cfg = tiny_config(tmp_path, tiny_corpus, tiny_checkpoint)
    caplog.set_level(logging.INFO)
    run_stages(cfg, "download", "tokenize", "train")
    assert Path(cfg.paths.model_dir, "model.safetensors").is_file()
    assert len(_outage_lines(caplog)) == 1, _outage_lines(caplog)
    unregistered = [r.getMessage() for r in caplog.records
                    if r.getMessage().startswith("model not registered as 'tiny_sentiment'")]
    assert len(unregistered) == 1 and "kept in the pending store" in unregistered[0], \
        unregistered
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]
    kept = [r.getMessage() for r in caplog.records if "hf-text-pipeline sync" in r.getMessage()]
    assert len(kept) == 1 and "kept in" in kept[0] and "loss x" in kept[0], kept
    waiting, = pending_runs(Path(cfg.tracking.pending_dir))
    assert waiting.info.status == "FINISHED" and waiting.data.params

    server.start()
    run_stages(cfg, "evaluate")
    client = mlflow.MlflowClient(server.uri)
    run, = client.search_runs([client.get_experiment_by_name("tiny_sentiment").experiment_id])
    assert run.data.tags["stages"] == "train,evaluate"
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    _assert_complete(client, run.info.run_id, Path(cfg.paths.history_path))
    assert not pending_runs(Path(cfg.tracking.pending_dir))
    logged = client.list_artifacts(run.info.run_id, "checkpoints")
    assert len(logged) == 1 and logged[0].path.startswith("checkpoints/checkpoint-"), logged
    assert client.search_registered_models() == []


class ServerOutage:
    """A Trainer callback that kills the tracking server after training step ``kill_at`` and
    starts it again at the end of epoch ``back_after`` (never, if None)."""

    def __init__(self, server: Server, kill_at: int, back_after: int | None) -> None:
        self.server, self.kill_at, self.back_after = server, kill_at, back_after

    def __getattr__(self, event):
        return lambda *args, **kwargs: None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.kill_at:
            self.server.kill()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.back_after is not None and round(state.epoch) == self.back_after:
            self.server.start()


class _MlflowLines(logging.Handler):
    """MLflow's own warnings: its loggers do not propagate to pytest's caplog."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def test_server_dying_mid_training_and_coming_back_loses_nothing(
        server, tmp_path, tiny_corpus, tiny_checkpoint, caplog, monkeypatch):
    """The server dies after step 2 of 12 and is back after epoch 1: training goes on and
    finishes, the outage is one warning (not one per step, and none from MLflow's system
    metrics thread, which samples every 0.2 s here), the steps logged meanwhile wait in the
    pending store, and at the end of the stage they are in the same server run: every step's
    loss, the evaluations, the model, FINISHED; nothing is left pending."""
    cfg = tiny_config(tmp_path, tiny_corpus, tiny_checkpoint)
    run_stages(cfg, "download", "tokenize")
    server.start()
    monkeypatch.setattr(training, "train_model", functools.partial(
        training.train_model, callbacks=[ServerOutage(server, kill_at=2, back_after=1)]))
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    caplog.set_level(logging.INFO)
    mlflow_lines = _MlflowLines()
    logging.getLogger("mlflow").addHandler(mlflow_lines)
    try:
        run_stages(cfg, "train")
    finally:
        logging.getLogger("mlflow").removeHandler(mlflow_lines)
    assert Path(cfg.paths.model_dir, "model.safetensors").is_file()
    assert len(_outage_lines(caplog)) == 1, _outage_lines(caplog)
    assert "during the run (connection refused)" in _outage_lines(caplog)[0]
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]
    assert not [line for line in mlflow_lines.lines if server.uri in line], mlflow_lines.lines
    client = mlflow.MlflowClient(server.uri)
    run, = client.search_runs([client.get_experiment_by_name("tiny_sentiment").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags.get(SYNCED_FROM_TAG), "the pending part was not sent"
    _assert_complete(client, run.info.run_id, Path(cfg.paths.history_path))
    assert not pending_runs(Path(cfg.tracking.pending_dir))


def _inputs(run) -> set[tuple]:
    return {(given.dataset.name, given.dataset.digest, given.dataset.source,
             tuple(sorted((tag.key, tag.value) for tag in given.tags)))
            for given in run.inputs.dataset_inputs}


def test_sync_command_lists_exactly_what_waits_and_sends_it(
        server, tmp_path, tiny_corpus, tiny_checkpoint, capsys):
    """A stage run kept locally (the server never answered) is listed by `hf-text-pipeline
    sync --list` with each metric's number of values, its dataset inputs and each artifact,
    then sent by `sync` with every value at its step, its inputs, its artifact and its
    status."""
    from pipeline.commands import main as command
    from pipeline.tracking import log_dataset_inputs, log_metrics

    cfg = tiny_config(tmp_path, tiny_corpus, tiny_checkpoint)
    run_stages(cfg, "download")
    (tmp_path / "note.txt").write_text("kept")
    with stage_run("train", cfg, log_params=True) as run:
        log_dataset_inputs(cfg.paths.raw_dir)
        for step in range(1, 6):
            log_metrics({"loss": 1.0 / step}, step=step)
        mlflow.log_artifact(str(tmp_path / "note.txt"), artifact_path="notes")
    folder = cfg.tracking.pending_dir
    capsys.readouterr()
    assert command(["sync", "--list", "--pending-dir", folder]) == 0
    listed = capsys.readouterr().out
    assert f"{run.info.run_id}  train:" in listed and "loss x5" in listed
    assert "notes/note.txt" in listed and "1 runs wait" in listed
    assert "3 dataset inputs (tiny_sentiment/test, tiny_sentiment/train, " \
           "tiny_sentiment/validation)" in listed

    kept = _inputs(pending_runs(Path(folder))[0])
    target = f"sqlite:///{tmp_path / 'target.db'}"  # any MLflow store; the server is down here
    assert command(["sync", "--pending-dir", folder, "--tracking-uri", target]) == 0
    assert "sent 1 runs" in capsys.readouterr().out
    client = mlflow.MlflowClient(target)
    sent, = client.search_runs([client.get_experiment_by_name("tiny_sentiment").experiment_id])
    assert sent.info.run_name == "train" and sent.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(sent.info.run_id, "loss")] \
        == [(step, 1.0 / step) for step in range(1, 6)]
    assert sent.data.params["train.learning_rate"] == "0.001"
    assert sent.info.start_time == run.info.start_time
    assert [a.path for a in client.list_artifacts(sent.info.run_id, "notes")] == ["notes/note.txt"]
    assert len(kept) == 3 and _inputs(sent) == kept
    assert command(["sync", "--pending-dir", folder, "--tracking-uri", target]) == 0
    assert "nothing waits" in capsys.readouterr().out


def _sweep_config(root: Path, tiny_corpus: Path, tiny_checkpoint: Path, *overrides: str):
    """What the sweep callback reads of a multirun's config."""
    params = tiny_params(root, tiny_corpus, tiny_checkpoint)
    return OmegaConf.create({**params, "hydra": {
        "sweep": {"dir": str(root / "multirun")}, "job": {"name": "train"},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
        "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"},
        "overrides": {"task": list(overrides)}}})


def _job_record(config, num: int, status: str, error: str = "") -> None:
    folder = Path(config.hydra.sweep.dir) / str(num)
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({
        "num": num, "overrides": [f"train.learning_rate={num}e-3"], "status": status,
        **({"error": error} if error else {})}))


def test_a_sweep_whose_server_is_down_runs_without_a_parent_and_says_so(
        server, tmp_path, tiny_corpus, tiny_checkpoint, caplog, capsys):
    """The sweep callback meets an unreachable server: one warning, no parent run (each job
    records its own run, kept until sent), and the summary comes from the jobs' records."""
    from hydra_plugins.mlflow_sweep.callback import MlflowSweepCallback

    config = _sweep_config(tmp_path, tiny_corpus, tiny_checkpoint, "train.learning_rate=1e-3,2e-3")
    callback = MlflowSweepCallback()
    callback.on_multirun_start(config)
    assert callback.run_id is None and "PIPELINE_SWEEP_PARENT_RUN_ID" not in os.environ
    assert len(_outage_lines(caplog)) == 1
    _job_record(config, 0, "COMPLETED")
    _job_record(config, 1, "FAILED", "ValueError: diverged")
    callback.on_multirun_end(config)
    err = capsys.readouterr().err
    assert "sweep: 1 of 2 jobs finished" in err
    assert "sweep: job 1 failed (train.learning_rate=1e-3): ValueError: diverged" in err


def test_a_sweep_parent_names_its_process_and_a_long_search_space_is_cut(
        tmp_path, tiny_corpus, tiny_checkpoint):
    """The parent run carries the launching process (a killed sweep's parent is ended KILLED
    by the next stage like any run) and a search space beyond MLflow's limit is cut."""
    from hydra_plugins.mlflow_sweep.callback import MlflowSweepCallback

    values = ",".join(f"{i}e-6" for i in range(1500))
    config = _sweep_config(tmp_path, tiny_corpus, tiny_checkpoint, f"train.learning_rate={values}")
    callback = MlflowSweepCallback()
    callback.on_multirun_start(config)
    try:
        parent = mlflow.MlflowClient().get_run(callback.run_id)
        assert parent.info.status == "RUNNING"
        # Named after the sweep (before: "sweep-train", as every sweep of the stage).
        assert parent.info.run_name.startswith("sweep train.learning_rate=0e-6,1e-6,2e-6,")
        assert len(parent.info.run_name) == 250
        assert parent.data.tags[PID_TAG] == str(os.getpid())
        assert parent.data.params["search_space"].endswith(
            f"...[truncated: {len('train.learning_rate=' + values)} characters]")
    finally:
        callback.on_multirun_end(config)
    assert mlflow.MlflowClient().get_run(parent.info.run_id).info.status == "FINISHED"


# -- a server that refuses the credentials ----------------------------------------------------


def _refusing_server(status: int):
    """An HTTP server on 127.0.0.1 answering every request as MLflow's basic-auth app does a
    request it refuses (401: no or wrong credentials; 403: not allowed); its URL."""
    import http.server
    import threading

    body = b"You are not authenticated." if status == 401 else b"Permission denied"

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815 (http.server's method naming)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_a_server_refusing_the_credentials_fails_the_stage_at_its_start(
        tmp_path, tiny_corpus, tiny_checkpoint, monkeypatch):
    """Wrong or missing credentials (HTTP 401) and a user without permission (403) are not an
    outage: the train stage fails before training with one line naming the server and the
    variables to set, and nothing is kept in the pending store."""
    from pipeline.errors import TrackingAuthError

    cfg = tiny_config(tmp_path, tiny_corpus, tiny_checkpoint)
    run_stages(cfg, "download", "tokenize")
    for status, user, password, said in (
            (401, "alice", "not-her-password", "refused the credentials of user 'alice' "
             "(HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your "
             "account on it"),
            (401, None, None, "needs credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
             "MLFLOW_TRACKING_PASSWORD to your account on it"),
            (403, "alice", "her-password-12", "refused user 'alice' (HTTP 403, permission "
             "denied): an admin of the server can give it EDIT on the experiment")):
        server, uri = _refusing_server(status)
        try:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            for name, value in (("MLFLOW_TRACKING_USERNAME", user),
                                ("MLFLOW_TRACKING_PASSWORD", password)):
                if value is None:
                    monkeypatch.delenv(name, raising=False)
                else:
                    monkeypatch.setenv(name, value)
            with pytest.raises(TrackingAuthError) as refused:
                run_stages(cfg, "train")
        finally:
            server.shutdown()
            server.server_close()
        assert str(refused.value) == f"MLflow server {uri} {said}"
        assert not Path(cfg.paths.model_dir).exists(), "nothing may train"
        assert not list(Path(cfg.paths.trainer_checkpoints_dir).glob("*/checkpoint-*"))
        assert not pending_runs(Path(cfg.tracking.pending_dir)), "not an outage"
    mlflow.set_tracking_uri(None)


def test_a_sweep_whose_credentials_are_refused_stops_before_its_jobs(
        tmp_path, tiny_corpus, tiny_checkpoint, monkeypatch, capsys):
    """Hydra would turn the callback's error into a warning and launch every job into the same
    refusal: the sweep stops at its start in one line instead."""
    from hydra_plugins.mlflow_sweep.callback import MlflowSweepCallback

    server, uri = _refusing_server(401)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-her-password")
    config = _sweep_config(tmp_path, tiny_corpus, tiny_checkpoint, "train.learning_rate=1e-3,2e-3")
    try:
        with pytest.raises(SystemExit) as stopped:
            MlflowSweepCallback().on_multirun_start(config)
    finally:
        server.shutdown()
        server.server_close()
        mlflow.set_tracking_uri(None)
    assert stopped.value.code == 1
    assert capsys.readouterr().err == (
        f"sweep: error: MLflow server {uri} refused the credentials of user 'alice' (HTTP 401): "
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on it\n")
    assert "PIPELINE_SWEEP_PARENT_RUN_ID" not in os.environ
