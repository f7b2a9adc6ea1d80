"""The pure parts of keeping MLflow records true: values cut to MLflow's limits, telling a live
process from a dead one, telling an outage from a refused request."""

from __future__ import annotations

import logging
import os
import socket

import psutil
import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

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
from support import config_section


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


def test_urllib3_retry_warnings_about_the_tracking_server_are_quiet_and_others_are_not(
        monkeypatch, caplog):
    """Both shapes urllib3 warns in: a refused connection names host and port in the message; a
    connection the dying server broke mid-request names only the URL path (CI met this one)."""
    for variable in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(variable, "1")
    pool_logger = logging.getLogger("urllib3.connectionpool")
    monkeypatch.setattr(pool_logger, "filters", list(pool_logger.filters))
    bound_requests(config_section("tracking"), "http://127.0.0.1:5123")
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
