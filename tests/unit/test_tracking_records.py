"""The pure parts of keeping MLflow records true: values cut to MLflow's limits, telling a live
process from a dead one, telling an outage from a refused request, which params a run gets and
what it is named."""

from __future__ import annotations

import logging
import os
import socket

import psutil
import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH
from omegaconf import OmegaConf

from pipeline.config import load_config
from pipeline.tracking import (
    HOST_TAG,
    PID_START_TAG,
    PID_TAG,
    bound_requests,
    is_outage,
    loggable,
    outage_reason,
    process_alive,
    process_tags,
)
from support import compose_params, config_section


def test_values_and_keys_beyond_mlflow_limits_are_cut_with_a_marker():
    names = [f"a rather long label name number {i}" for i in range(2000)]
    long_key = "k" * 300
    values, cut = loggable({"dataset.label_names": names, long_key: 1, "short": None},
                           where="; see config/params.yaml")
    text = values["dataset.label_names"]
    assert len(text) <= MAX_PARAM_VAL_LENGTH
    assert text.startswith(str(names)[:1000])
    assert text.endswith(f" ...[truncated: {len(str(names))} characters; see config/params.yaml]")
    cut_key = next(k for k in values if k.startswith("kkk"))
    assert len(cut_key) == MAX_ENTITY_KEY_LENGTH
    assert values[cut_key] == "1" and values["short"] == "None"
    assert cut == ["dataset.label_names", long_key]
    again, _ = loggable({"k" * 299: 1})
    assert list(again) != [cut_key], "two long keys with one prefix must stay apart"


def test_a_run_of_this_process_is_alive_and_a_reused_pid_is_not():
    mine = process_tags()
    assert mine[PID_TAG] == str(os.getpid()) and mine[HOST_TAG] == socket.gethostname()
    assert process_alive(mine) is True
    started = float(mine[PID_START_TAG])
    assert process_alive({**mine, PID_START_TAG: repr(started - 3600)}) is False


def test_a_dead_pid_is_dead_and_other_hosts_or_untagged_runs_are_unknown():
    dead = max(psutil.pids()) + 1000
    while psutil.pid_exists(dead):
        dead += 1
    tags = {**process_tags(), PID_TAG: str(dead)}
    assert process_alive(tags) is False
    assert process_alive({**tags, HOST_TAG: "another-host"}) is None
    assert process_alive({"mlflow.runName": "old run"}) is None


def test_an_unreachable_server_is_an_outage_and_a_refused_request_is_not():
    refused = MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch "
                              "failed with exception HTTPConnectionPool(host='127.0.0.1', "
                              "port=9): Max retries exceeded")
    assert is_outage(refused)
    assert is_outage(requests.exceptions.ConnectionError("connection reset"))
    assert not is_outage(RestException({"error_code": "INVALID_PARAMETER_VALUE",
                                        "message": "Changing param values is not allowed"}))
    assert not is_outage(MlflowException("Run 'abc' not found"))
    assert not is_outage(ValueError("API request to nowhere"))
    assert outage_reason(MlflowException(str(refused) + " (Caused by NewConnectionError("
                                         "'[Errno 111] Connection refused'))")) \
        == "connection refused"
    assert outage_reason(MlflowException("API request to http://h/api failed with exception "
                                         "Max retries exceeded (Caused by ResponseError("
                                         "'too many 503 error responses'))")) == "HTTP 503"


def _bound_requests_to_a_server(monkeypatch) -> None:
    """``bound_requests`` for a server on 127.0.0.1:5123, its environment variables and the
    logging filters it adds undone after the test."""
    for variable in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(variable, "1")
    for name in ("urllib3.connectionpool", "mlflow.system_metrics.system_metrics_monitor"):
        log = logging.getLogger(name)
        monkeypatch.setattr(log, "filters", list(log.filters))
    bound_requests(config_section("tracking"), "http://127.0.0.1:5123")


def test_urllib3_retry_warnings_about_the_tracking_server_are_quiet_and_others_are_not(
        monkeypatch, caplog):
    """Both shapes urllib3 warns in: a refused connection names host and port in the message; a
    connection the dying server broke mid-request names only the URL path (CI met this one)."""
    pool_logger = logging.getLogger("urllib3.connectionpool")
    _bound_requests_to_a_server(monkeypatch)
    caplog.set_level(logging.WARNING, logger="urllib3.connectionpool")

    def retry_warning(host: str, err: str, url: str) -> None:
        pool_logger.warning("Retrying (%r) after connection broken by '%r': %s", "Retry(total=1)",
                            err, url, extra={"__urllib3-retry-warning": {"host": host}})

    retry_warning("127.0.0.1", "NewConnectionError(\"HTTPConnection(host='127.0.0.1', "
                  "port=5123): Failed to establish a new connection\")", "/api/2.0/mlflow/runs/get")
    retry_warning("127.0.0.1", "ProtocolError('Connection aborted.', RemoteDisconnected("
                  "'Remote end closed connection without response'))",
                  "/api/2.0/mlflow/runs/log-batch")
    retry_warning("huggingface.co", "ProtocolError('Connection aborted.')", "/api/models/x")
    pool_logger.warning("Connection pool is full, discarding connection: 127.0.0.1")
    assert [r.getMessage()[:40] for r in caplog.records] == [
        "Retrying ('Retry(total=1)') after connec", "Connection pool is full, discarding conn"]
    assert "huggingface.co" in caplog.records[0].__dict__["__urllib3-retry-warning"]["host"]


def test_system_metrics_thread_lines_about_an_unreachable_server_are_quiet(monkeypatch):
    """MLflow's system metrics thread logs past the stage's guarded writes: its line about the
    unreachable server (MLflow's whole error, ~500 characters) would repeat the stage's one
    warning. A server that answers with an error, or another server, still shows."""
    monitor_logger = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    _bound_requests_to_a_server(monkeypatch)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    monitor_logger.addHandler(handler)
    try:
        monitor_logger.warning("Failed to get mlflow run: API request to http://127.0.0.1:5123/api/"
                               "2.0/mlflow/runs/get failed with exception HTTPConnectionPool(host="
                               "'127.0.0.1', port=5123): Max retries exceeded.")
        monitor_logger.error("Error terminating system metrics monitoring process: API request to "
                             "http://127.0.0.1:5123/api/2.0/mlflow/runs/log-batch failed.")
        monitor_logger.warning("Failed to log system metrics: RESOURCE_DOES_NOT_EXIST: Run x")
        monitor_logger.warning("Failed to get mlflow run: API request to http://10.0.0.9:5000/api"
                               "/2.0/mlflow/runs/get failed with exception ...")
    finally:
        monitor_logger.removeHandler(handler)
    assert [line[:40] for line in seen] == ["Failed to log system metrics: RESOURCE_D",
                                            "Failed to get mlflow run: API request to"]


# What transformers' MLflowCallback hands over: every TrainingArguments field (args.to_dict())
# over the model's config; a few of each here.
TRAINER_ARGUMENTS = {"hidden_size": 384, "id2label": {0: "a"}, "output_dir": "checkpoints/x",
                     "learning_rate": 5e-5, "num_train_epochs": 3.0, "seed": 42,
                     "per_device_train_batch_size": 16, "gradient_accumulation_steps": 2,
                     "optim": "adamw_torch_fused", "max_grad_norm": 1.0, "bf16": False,
                     "fp16": True, "tf32": True}


def test_the_trainer_adds_only_what_the_config_does_not_say(monkeypatch):
    from pipeline.tracking import trainer_params

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert trainer_params(TRAINER_ARGUMENTS) == {
        "trainer.effective_batch_size": 32, "trainer.gradient_accumulation_steps": 2,
        "trainer.optim": "adamw_torch_fused", "trainer.max_grad_norm": 1.0,
        "trainer.precision": "fp16"}
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun: every process takes its own batches
    assert trainer_params(TRAINER_ARGUMENTS)["trainer.effective_batch_size"] == 128


def test_no_composition_gives_a_run_more_than_80_params():
    """The issue's bound: the resolved config of the widest composition (two phases, the pooled
    head's keys) plus the Trainer's few, where transformers' callback logged about 200."""
    from pipeline.tracking import run_params, trainer_params

    widest = load_config(OmegaConf.create(compose_params(["strategy=two_phase", "head=pooled"])))
    params = {**run_params(widest), **trainer_params(TRAINER_ARGUMENTS)}
    assert len(params) == len(run_params(widest)) + 5, "a trainer.* key repeats the config"
    assert len(params) <= 80, len(params)
    assert not [key for key in params if key.startswith("paths.")]
    assert {"train.learning_rate", "model.revision", "dataset.name"} <= set(params)


def test_run_names_say_what_tells_a_run_from_the_others_of_its_experiment(monkeypatch):
    from pipeline.tracking import run_name

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    base = load_config(OmegaConf.create(compose_params([])))
    other = load_config(OmegaConf.create(compose_params(["train.learning_rate=3e-5"])))
    faster = load_config(OmegaConf.create(compose_params(["runtime.eval_batch_size=8"])))
    assert run_name(base).startswith("minilm_l6-bbc_news-")
    assert run_name(base) != run_name(other), "dvc repro of another config: another name"
    assert run_name(base) == run_name(faster), "runtime knobs change no result"
    assert run_name(other, ["train.learning_rate=3e-5"]) == \
        "minilm_l6-bbc_news train.learning_rate=3e-5"
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-hunt")
    assert run_name(base) == "sunny-hunt"
    assert run_name(base, ["train.learning_rate=1e-4", "seed=1"], job=3) == \
        "job3 train.learning_rate=1e-4 seed=1"
    assert len(run_name(base, [f"train.learning_rate={'1' * 400}"], job=0)) == 250
