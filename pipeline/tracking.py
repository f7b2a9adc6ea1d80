"""MLflow tracking: where runs go, and the one run that follows a trained model through stages.

The train stage opens a run and tags it with the SHA-256 of the model it saved. The evaluate and
report stages hash the model they read and attach to the run with that tag, so train, evaluate
and report of one model land in one run without a run id ever being written into a DVC output.

What a run holds: the resolved config as params (plus the few values the Trainer resolved
that the config does not say, ``trainer.*``), each split of the dataset snapshot as a dataset
input with its digest, one metric name per quantity (``validation_*`` per epoch and for the kept
model), system metrics, and a name that says what tells it from the experiment's other runs.

Records stay true under faults: every run names the process that holds it, and the next stage
ends KILLED the runs a killed process left RUNNING; a tracking server that does not answer never
stops a stage (its records wait in a local store, see :mod:`pipeline.pending`); values beyond
MLflow's limits are cut with a marker instead of failing the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

from pipeline.artifacts import hash_path
from pipeline.config import PipelineConfig, TrackingConfig, to_flat_dict, to_nested_dict, unguarded
from pipeline.contracts import (
    TEXT,
    TEXT_PAIR,
    load_pretrained_manifest,
    load_raw_manifest,
    load_snapshot,
    validation_split_name,
)
from pipeline.errors import TrackingAuthError

logger = logging.getLogger(__name__)

MODEL_SHA_TAG = "model_sha256"
# The optimizer steps the model trained: the step every summary metric is logged at.
TRAIN_STEPS_TAG = "train_steps"
DEFAULT_DB = "mlflow.db"
# Set by the sweep callback (hydra_plugins/mlflow_sweep) in the launching process; launcher
# workers inherit it, and each job's train run becomes a child of the sweep's parent run.
SWEEP_PARENT_ENV = "PIPELINE_SWEEP_PARENT_RUN_ID"
# The process that holds a run (see process_tags), and what reconciling a killed one leaves.
HOST_TAG = "process_host"
PID_TAG = "process_pid"
PID_START_TAG = "process_start_time"
CONTINUED_BY_TAG = "continued_by"
RECONCILED_TAG = "reconciled_runs"

T = TypeVar("T")


def project_root(cwd: Optional[Path] = None) -> Path:
    """The project folder, also from inside DVC's temporary copies.

    ``dvc exp run --temp`` and queued experiments run in ``<project>/.dvc/tmp/exps/<name>``;
    their runs must reach the project's own database, not one that is deleted with the copy.
    """
    here = (cwd or Path.cwd()).resolve()
    parts = here.parts
    for index in range(len(parts) - 2):
        if parts[index] == ".dvc" and parts[index + 1] == "tmp":
            return Path(*parts[:index])
    return here


def tracking_uri(root: Optional[Path] = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite database at an absolute path in the project."""
    return (os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(root or project_root()) / DEFAULT_DB}")


def _git(args: list[str], cwd: Path) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_state(cwd: Optional[Path] = None) -> dict[str, str]:
    """The commit the code ran from and whether tracked files differed from it."""
    where = cwd or Path.cwd()
    commit = _git(["rev-parse", "HEAD"], where)
    if commit is None:
        return {"git_commit": "unknown"}
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], where)
    return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}


def is_remote(uri: str) -> bool:
    """A tracking server reached over HTTP, which can be down while a stage runs."""
    return uri.startswith(("http://", "https://"))


def set_experiment(name: str, uri: Optional[str] = None) -> str:
    """Select (creating if needed) the experiment in ``uri`` (default :func:`tracking_uri`);
    artifacts of a SQLite store stay beside its database."""
    import mlflow

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _database_lock(uri), refusals_named(uri):
        experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # MLflow would put artifacts in ./mlruns of whatever folder runs first (a DVC temp
        # copy, say); keep them beside the database instead. A server decides for itself.
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between the lookup and here.
        return mlflow.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def _database_lock(uri: str) -> Iterator[None]:
    """Serialise the first connection to a SQLite database across processes.

    MLflow creates and migrates the schema on a process's first connection; processes doing
    that at once (parallel sweep jobs, ``dvc queue start -j 2`` on a new project) fail with
    "table already exists" or alembic errors. Once the schema exists, MLflow's own SQLite busy
    timeout handles concurrent writers.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock", timeout=600):
        yield


def find_model_run(experiment_id: str, model_sha: str) -> Optional[str]:
    """The newest run of this experiment that trained the model with this content hash."""
    import mlflow

    runs = mlflow.search_runs([experiment_id],
                              filter_string=f"tags.{MODEL_SHA_TAG} = '{model_sha}'",
                              order_by=["attributes.start_time DESC"], max_results=1,
                              output_format="list")
    return runs[0].info.run_id if runs else None


# -- the process behind a run -----------------------------------------------------------------


def process_tags() -> dict[str, str]:
    """Host, pid and the process's start time (which tells a live process from a later one that
    was given the same pid)."""
    import psutil

    me = psutil.Process()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(me.pid),
            PID_START_TAG: repr(me.create_time())}


def process_alive(tags: dict[str, str]) -> Optional[bool]:
    """Whether the process that recorded ``tags`` (:func:`process_tags`) still runs: None when
    that cannot be told here (no such tags, or another host)."""
    import psutil

    try:
        host, pid, started = tags[HOST_TAG], int(tags[PID_TAG]), float(tags[PID_START_TAG])
    except (KeyError, ValueError):
        return None
    if host != socket.gethostname():
        return None
    try:
        process = psutil.Process(pid)
        # A killed child its parent has not reaped yet is a zombie: dead all the same.
        return (abs(process.create_time() - started) < 1.0
                and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def reconcile_dead_runs(experiment_id: str, run_id: str) -> list[str]:
    """End KILLED the runs of this experiment left RUNNING by a process of this host that no
    longer exists (SIGKILL, OOM killer, power loss), tagging each ``continued_by=<run_id>``.

    Runs of live processes (parallel sweep jobs, another stage), of other hosts and runs
    without process tags (older than them) are left alone: nothing here can tell they ended.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    running = client.search_runs(
        [experiment_id], max_results=1000,
        filter_string=(f"attributes.status = 'RUNNING' AND "
                       f"tags.{HOST_TAG} = '{socket.gethostname()}'"))
    ended = []
    for run in running:
        if run.info.run_id == run_id or process_alive(run.data.tags) is not False:
            continue
        client.set_tag(run.info.run_id, CONTINUED_BY_TAG, run_id)
        client.set_terminated(run.info.run_id, "KILLED", end_time=last_sign_of_life(client, run))
        ended.append(run.info.run_id)
    if ended:
        client.set_tag(run_id, RECONCILED_TAG, ",".join(ended))
        logger.warning("ended %d MLflow run(s) left RUNNING by killed processes: %s (KILLED, "
                       "tagged %s=%s)", len(ended), ", ".join(ended), CONTINUED_BY_TAG, run_id)
    return ended


def last_sign_of_life(client, run) -> int:
    """The run's last metric timestamp (ms), or its start: when its process was last seen."""
    times = [run.info.start_time or 0]
    for key in run.data.metrics:
        times += [m.timestamp for m in client.get_metric_history(run.info.run_id, key)]
    return max(times)


# -- values within MLflow's limits ------------------------------------------------------------


def loggable(params: dict[str, Any], limit: Optional[int] = None,
             where: str = "") -> tuple[dict[str, str], list[str]]:
    """``params`` as MLflow accepts them: strings, keys within MLflow's key length (cut, with a
    hash of the whole key to keep them apart), values within ``limit`` (default: MLflow's param
    limit) cut with a marker that says so and ``where`` the whole value is. Returns them and the
    keys that were cut."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

    limit = limit or MAX_PARAM_VAL_LENGTH
    out: dict[str, str] = {}
    cut = []
    for key, value in params.items():
        text = "None" if value is None else str(value)
        name = str(key)
        if len(name) > MAX_ENTITY_KEY_LENGTH:
            digest = hashlib.sha256(name.encode()).hexdigest()[:8]
            name = f"{name[:MAX_ENTITY_KEY_LENGTH - 9]}-{digest}"
        if len(text) > limit:
            marker = f" ...[truncated: {len(text)} characters{where}]"
            text = text[:limit - len(marker)] + marker
        if name != key or text != str(value):
            cut.append(str(key))
        out[name] = text
    return out, cut


def loggable_tags(tags: dict[str, Any]) -> dict[str, str]:
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    return loggable(tags, MAX_TAG_VAL_LENGTH)[0]


# -- a server that refuses the credentials ----------------------------------------------------

# MLflow's error codes for HTTP 401 and 403: the server answered, and refused who asked.
REFUSED_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")


@contextlib.contextmanager
def refusals_named(uri: str) -> Iterator[None]:
    """Turn the server's refusal of the credentials into one line (:class:`TrackingAuthError`)
    naming the server and the environment variables to set: a stage fails at its start instead
    of training with nowhere to record."""
    try:
        yield
    except Exception as error:
        if getattr(error, "error_code", None) not in REFUSED_CODES:
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if error.error_code == "PERMISSION_DENIED":
            raise TrackingAuthError(
                f"MLflow server {uri} refused user {user!r} (HTTP 403, permission denied): an "
                "admin of the server can give it EDIT on the experiment") from None
        what = (f"refused the credentials of user {user!r}"
                if user and os.environ.get("MLFLOW_TRACKING_PASSWORD") else "needs credentials")
        raise TrackingAuthError(
            f"MLflow server {uri} {what} (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD to your account on it") from None


# -- an unreachable server --------------------------------------------------------------------


def is_outage(error: BaseException) -> bool:
    """The tracking server could not be reached (refused, timed out, 5xx after the retries), as
    opposed to it refusing a request (a bad value, an unknown run, wrong credentials), which is
    raised."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    if getattr(error, "error_code", None) in REFUSED_CODES:
        return False
    return (isinstance(error, MlflowException) and not isinstance(error, RestException)
            and str(error).startswith("API request to"))


def outage_reason(error: BaseException) -> str:
    """A few words for why the server did not answer (MLflow's messages run to 500
    characters)."""
    import re

    text = str(error)
    for needle, reason in (("Connection refused", "connection refused"),
                           ("timed out", "timed out"),
                           ("Name or service not known", "unknown host"),
                           ("Temporary failure in name resolution", "unknown host"),
                           ("Connection reset", "connection reset"),
                           ("RemoteDisconnected", "connection closed")):
        if needle in text:
            return reason
    status = re.search(r"too many (\d{3}) error responses|error code (\d{3})", text)
    if status:
        return f"HTTP {status.group(1) or status.group(2)}"
    first = text.splitlines()[0] if text else type(error).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def bound_requests(tracking: TrackingConfig, uri: str) -> None:
    """Bound MLflow's HTTP retries for this process (and its children) by ``tracking.http_*``,
    unless the environment sets them, and keep urllib3's per-retry warnings and MLflow's system
    metrics thread's failures about this server quiet: the pipeline reports an outage once."""
    for variable, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", tracking.http_max_retries),
                            ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", tracking.http_backoff_factor),
                            ("MLFLOW_HTTP_REQUEST_TIMEOUT", tracking.http_timeout)):
        os.environ.setdefault(variable, str(value))
    from urllib.parse import urlsplit

    where = urlsplit(uri)
    port = where.port or (443 if where.scheme == "https" else 80)
    pool_logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _QuietRetries) and f.host == where.hostname
               for f in pool_logger.filters):
        pool_logger.addFilter(_QuietRetries(where.hostname, port))
    monitor_logger = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    if not any(isinstance(f, _QuietMonitor) and f.uri == uri for f in monitor_logger.filters):
        monitor_logger.addFilter(_QuietMonitor(uri))


class _QuietMonitor(logging.Filter):
    """Drops MLflow's system metrics thread's lines about a server that does not answer.

    The thread logs through its own client, past the stage's guarded writes: it meets an outage
    on its own, says so in a line that holds MLflow's whole error (and again when the run ends),
    and stops sampling; the stage's records fail over without it. MLflow words an unreachable
    server's errors "API request to <url> failed ..."; a server that answers with an error is
    not matched, so that still shows."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self.needle = f"API request to {uri.rstrip('/')}"

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


class _QuietRetries(logging.Filter):
    """Drops urllib3's "Retrying ..." warnings for the tracking server.

    A refused connection names host and port in the message, but a connection the server broke
    mid-request (it died, or a pooled keep-alive connection to its old process) names neither:
    the message only carries the URL path. urllib3 tags every retry warning with its pool's
    host in the record (the hook pip uses to rewrite them), so that is matched as well."""

    def __init__(self, host: Optional[str], port: int) -> None:
        super().__init__()
        self.host = host
        self.needle = f"host='{host}', port={port}"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Retrying"):
            return True
        tagged = getattr(record, "__urllib3-retry-warning", None) or {}
        return not (self.needle in message or tagged.get("host") == self.host)


@dataclass
class _Link:
    """Where the open stage run records: the server, or from its first outage on, a run in the
    pending store (``hf-text-pipeline sync`` replays it into the server)."""

    server_uri: str
    pending_dir: Path
    experiment_name: str
    what: str
    system_metrics: bool = False
    run_name: str = ""
    server_run_id: Optional[str] = None
    pending_run_id: Optional[str] = None
    outage: Optional[str] = None

    @property
    def remote(self) -> bool:
        return is_remote(self.server_uri)

    def report_outage(self, error: BaseException, when: str) -> None:
        """The one warning of an outage."""
        if self.outage is not None:
            return
        self.outage = outage_reason(error)
        logger.warning("MLflow server %s unreachable %s (%s); %s goes on and records into %s",
                       self.server_uri, when, self.outage, self.what, self.pending_dir)


_current: Optional[_Link] = None


def _pending_dir(tracking: TrackingConfig) -> Path:
    folder = Path(tracking.pending_dir)
    return folder if folder.is_absolute() else project_root() / folder


def _connect(cfg: PipelineConfig, what: str) -> tuple[_Link, str]:
    """The stage's link and experiment: on the server if it answers (first replaying what
    earlier stages kept in the pending store), else in the pending store."""
    from pipeline import pending

    link = _Link(tracking_uri(), _pending_dir(cfg.tracking), cfg.tracking.experiment_name, what,
                 cfg.tracking.system_metrics)
    # The monitor's start, stop and "no GPU metrics" lines (four a stage) tell a user nothing;
    # its warnings still show.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    if not link.remote:
        return link, set_experiment(link.experiment_name, link.server_uri)
    bound_requests(cfg.tracking, link.server_uri)
    try:
        experiment_id = set_experiment(link.experiment_name, link.server_uri)
    except Exception as error:
        if not is_outage(error):
            raise
        return link, _go_offline(link, error, "at the start")
    pending.sync_quietly(link.pending_dir, link.server_uri)
    return link, experiment_id


def _go_offline(link: _Link, error: BaseException, when: str) -> str:
    from pipeline import pending

    link.report_outage(error, when)
    return set_experiment(link.experiment_name, pending.store_uri(link.pending_dir))


def _fail_over(link: _Link, error: BaseException) -> None:
    """Continue the stage's server run in a run of the pending store (tagged with the server
    run it continues), nested on the fluent run stack so every later ``mlflow.*`` call of the
    stage, the pipeline's or not, records there without waiting on the server again."""
    import mlflow

    from pipeline import pending

    experiment_id = _go_offline(link, error, "during the run")
    run = mlflow.start_run(experiment_id=experiment_id, run_name=link.run_name, nested=True,
                           tags={pending.CONTINUES_TAG: link.server_run_id or "",
                                 **process_tags()},
                           log_system_metrics=link.system_metrics)
    link.pending_run_id = run.info.run_id


def _guarded(write: Callable[[], T]) -> T:
    """``write()`` (an ``mlflow.*`` call on the active run); if the server is unreachable,
    fail over to the pending store and write there instead."""
    link = _current
    if link is None or not link.remote or link.pending_run_id or link.outage:
        return write()
    try:
        return write()
    except Exception as error:
        if not is_outage(error):
            raise
        _fail_over(link, error)
        return write()


def recording_locally() -> bool:
    """Whether the open stage run records into the pending store (the server did not answer):
    what it writes reaches the server only with ``hf-text-pipeline sync``."""
    return _current is not None and _current.pending_run_id is not None


def ensure_reachable() -> None:
    """Ask the server once (bounded by ``tracking.http_*``); fail over if it does not answer,
    so that the stage's next direct ``mlflow.*`` calls do not meet the outage."""
    link = _current
    if link is None or not link.remote or link.pending_run_id or link.outage:
        return
    from mlflow import MlflowClient

    try:
        MlflowClient(link.server_uri).get_run(link.server_run_id)
    except Exception as error:
        if not is_outage(error):
            raise
        _fail_over(link, error)


def run_params(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as MLflow params: every key but ``paths.*``, which say where files go, never
    what a run is (they stay in the ``config/params.yaml`` artifact with the rest)."""
    return {key: value for key, value in to_flat_dict(cfg).items()
            if not key.startswith("paths.")}


def record_params(params: dict[str, Any], where: str = "") -> list[str]:
    """Log ``params`` cut to MLflow's limits (see :func:`loggable`); MLflow's client splits them
    into batches it accepts. Returns the keys that were cut."""
    import mlflow

    values, cut = loggable(params, where=where)
    if cut:
        logger.info("MLflow params cut to MLflow's limits: %s", ", ".join(cut))
    _guarded(lambda: mlflow.log_params(values))
    return cut


def log_metrics(metrics: dict[str, float], step: Optional[int] = None) -> None:
    """``mlflow.log_metrics``, synchronous, surviving an outage (the values keep their time)."""
    import mlflow

    now = int(time.time() * 1000)
    _guarded(lambda: mlflow.log_metrics(metrics, step=step, timestamp=now))


def log_dataset_inputs(raw_dir: str) -> None:
    """Each split of the dataset snapshot as a dataset input of the run, named after the
    snapshot's dataset, ``context`` the split (``train``, ``validation``, ``test``): what the
    MLflow UI's Datasets column shows and ``dataset.context`` searches. MLflow's digest is the
    first 16 hex digits of the split file's SHA-256 (MLflow takes at most 36 characters), the
    input tag ``sha256`` all of it, ``rows`` the row count (from the parquet footer). No row is
    loaded: MLflow's own dataset classes would load and hash up to 10,000 rows instead."""
    import warnings

    import mlflow
    import pyarrow.parquet as pq
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    name = str(load_raw_manifest(raw_dir).get("name", Path(raw_dir).name))
    datasets, contexts, tags = [], [], []
    for file in sorted(Path(raw_dir).glob("*.parquet")):
        sha256 = hash_path(file)
        footer = pq.read_metadata(file)
        with warnings.catch_warnings():  # a path is a "" and a "file" URI alike: the same class
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(file))
        datasets.append(MetaDataset(source, name=name, digest=sha256[:16],
                                    schema=_mlflow_schema(footer.schema.to_arrow_schema())))
        contexts.append(file.stem)
        tags.append({"sha256": sha256, "rows": str(footer.num_rows)})
    if datasets:
        _guarded(lambda: mlflow.log_inputs(datasets, contexts=contexts, tags_list=tags))


def _mlflow_schema(arrow_schema) -> Any:
    """The snapshot's columns as an MLflow schema (a type it has no name for shows as string)."""
    import pyarrow as pa
    from mlflow.types import ColSpec, DataType, Schema

    def kind(arrow_type) -> DataType:
        for test, data_type in ((pa.types.is_string, DataType.string),
                                (pa.types.is_large_string, DataType.string),
                                (pa.types.is_int64, DataType.long),
                                (pa.types.is_integer, DataType.integer),
                                (pa.types.is_float32, DataType.float),
                                (pa.types.is_floating, DataType.double),
                                (pa.types.is_boolean, DataType.boolean)):
            if test(arrow_type):
                return data_type
        return DataType.string

    return Schema([ColSpec(kind(field.type), field.name) for field in arrow_schema])


def log_artifact(path: str, artifact_path: Optional[str] = None) -> None:
    """``mlflow.log_artifact`` (a file) or ``log_artifacts`` (a folder), surviving an outage."""
    import mlflow

    if Path(path).is_dir():
        _guarded(lambda: mlflow.log_artifacts(path, artifact_path=artifact_path))
    else:
        _guarded(lambda: mlflow.log_artifact(path, artifact_path=artifact_path))


def set_tags(tags: dict[str, Any]) -> None:
    """``mlflow.set_tags``, values cut to MLflow's limit, surviving an outage."""
    import mlflow

    _guarded(lambda: mlflow.set_tags(loggable_tags(tags)))


def trainer_params(arguments: dict[str, Any]) -> dict[str, Any]:
    """What the Trainer was given that the config does not say, as ``trainer.*`` params: the
    effective batch (per device x gradient accumulation x processes), the optimizer, gradient
    clipping and the precision ``train.precision=auto`` resolved to. The rest of
    ``TrainingArguments`` repeats the config or is fixed by the code."""
    accumulation = int(arguments["gradient_accumulation_steps"])
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    precision = "bf16" if arguments["bf16"] else "fp16" if arguments["fp16"] else "fp32"
    return {"trainer.effective_batch_size":
            int(arguments["per_device_train_batch_size"]) * accumulation * processes,
            "trainer.gradient_accumulation_steps": accumulation,
            "trainer.optim": str(arguments["optim"]),
            "trainer.max_grad_norm": arguments["max_grad_norm"],
            "trainer.precision": precision}


def metric_name(key: str) -> str:
    """One name per quantity: the Trainer's ``eval_<metric>`` is the validation split's, logged as
    ``validation_<metric>`` like the kept model's score (train) and the evaluate stage's."""
    return f"validation_{key.removeprefix('eval_')}" if key.startswith("eval_") else key


class _Mlflow:
    """The ``mlflow`` module as transformers' MLflowCallback calls it, with its writes going
    through this module: synchronous (MLflow's asynchronous logging fails in a background
    thread, with an error line per batch, where nothing can keep the values), cut to MLflow's
    limits instead of dropped, and surviving an outage.

    Of the params (every ``TrainingArguments`` field and the model's config, about 200) only
    :func:`trainer_params` are kept: the run's params are the resolved config. Metrics keep one
    name per quantity (:func:`metric_name`)."""

    def __getattr__(self, name: str) -> Any:
        import mlflow

        return getattr(mlflow, name)

    def log_params(self, params: dict[str, Any], synchronous: Optional[bool] = None) -> None:
        record_params(trainer_params(params))

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None,
                    synchronous: Optional[bool] = None) -> None:
        log_metrics({metric_name(key): value for key, value in metrics.items()}, step)

    def set_tags(self, tags: dict[str, Any], synchronous: Optional[bool] = None) -> None:
        set_tags(tags)


def callback_mlflow() -> Any:
    """What transformers' MLflowCallback should use as ``mlflow`` (see :class:`_Mlflow`)."""
    return _Mlflow()


class _Terminated(BaseException):
    """SIGTERM (DVC, a scheduler or a user killing the stage) as an exception.

    A BaseException, like KeyboardInterrupt, so that libraries' ``except Exception`` retry loops
    do not swallow it.
    """


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def stage_run(stage: str, cfg: PipelineConfig, *, run_id: Optional[str] = None,
              parent_run_id: Optional[str] = None, run_name: Optional[str] = None,
              log_params: bool = False) -> Iterator[Any]:
    """Open (or reopen) the MLflow run for ``stage``; it ends FINISHED, FAILED or KILLED.

    A new run gets the git state and DVC experiment name as tags, and with ``log_params`` the
    resolved config as params. Every run is tagged with the process that holds it, and runs of
    the experiment that killed processes left RUNNING are ended KILLED (see
    :func:`reconcile_dead_runs`). An exception ends the run FAILED; Ctrl-C or SIGTERM ends it
    KILLED; either way the exception propagates.

    With a tracking server (``MLFLOW_TRACKING_URI=http...``) that does not answer, at the start
    or later, the stage goes on and its records go to ``tracking.pending_dir`` (one warning);
    at the end they are sent if the server is back, else one line says what is kept where and
    how to send it (``hf-text-pipeline sync``; the next stage that reaches the server does it).
    """
    cfg = unguarded(cfg)  # records hold every value, also those the stage does not read
    link, experiment_id = _connect(cfg, stage)
    with refusals_named(link.server_uri), _open_run(
            stage, cfg, link, experiment_id, run_id=run_id, parent_run_id=parent_run_id,
            run_name=run_name, log_params=log_params) as run:
        yield run


@contextlib.contextmanager
def _open_run(stage: str, cfg: PipelineConfig, link: _Link, experiment_id: str, *,
              run_id: Optional[str], parent_run_id: Optional[str], run_name: Optional[str],
              log_params: bool) -> Iterator[Any]:
    import mlflow
    from mlflow.entities import RunTag

    global _current
    if _current is not None:
        raise RuntimeError(f"stage run {_current.what} is still open")
    offline = link.outage is not None
    tags = process_tags()
    if run_id is not None:
        # Before the run turns RUNNING again: another process reconciling in between must see
        # this live process, not the one that held the run before.
        mlflow.MlflowClient().log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id,
                               log_system_metrics=link.system_metrics)
    else:
        if offline and parent_run_id:
            # The parent is on the server; the pending store cannot check it, the sync keeps it.
            tags["mlflow.parentRunId"], parent_run_id = parent_run_id, None
        run = mlflow.start_run(experiment_id=experiment_id, parent_run_id=parent_run_id,
                               run_name=run_name or stage, tags=tags,
                               log_system_metrics=link.system_metrics)
    link.run_name = run.info.run_name
    if offline:
        link.pending_run_id = run.info.run_id
    else:
        link.server_run_id = run.info.run_id
    _current = link
    previous = signal.signal(signal.SIGTERM, _raise_terminated) \
        if _in_main_thread() else None
    status = "FINISHED"
    try:
        tags = {"stages": _append_stage(run, stage)}
        if run_id is None:
            tags.update(git_state())
            tags["dataset"] = cfg.dataset.name
            tags["model"] = cfg.model.name
            if os.environ.get("DVC_EXP_NAME"):
                tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        set_tags(tags)
        if log_params and record_params(
                run_params(cfg), where="; the whole config is the artifact config/params.yaml"):
            log_config(cfg)
        if not offline:
            try:
                reconcile_dead_runs(experiment_id, run.info.run_id)
            except Exception as error:
                if not (link.remote and is_outage(error)):
                    raise
                _fail_over(link, error)
        logger.info("MLflow run %s (%s) in %s", run.info.run_id, stage, mlflow.get_tracking_uri())
        yield run
    except (KeyboardInterrupt, _Terminated):
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        _current = None
        try:
            _close(link, status)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _close(link: _Link, status: str) -> None:
    """End the stage's run(s) with ``status``; after an outage, send the pending run if the
    server is back, else say what it holds and how to send it."""
    import mlflow

    from pipeline import pending

    if link.pending_run_id is None:
        try:
            mlflow.end_run(status)
            return
        except Exception as error:
            if not (link.remote and is_outage(error)):
                raise
            _fail_over(link, error)  # only to record the status: the server still says RUNNING
    mlflow.end_run(status)
    mlflow.set_tracking_uri(link.server_uri)
    if mlflow.active_run() is not None:
        # The server run the pending one continued: off the run stack, and ended if it answers.
        with contextlib.suppress(Exception):
            mlflow.end_run(status)
    pending.settle(link.pending_dir, link.server_uri, link.pending_run_id, link.what)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _append_stage(run, stage: str) -> str:
    done = run.data.tags.get("stages", "")
    return ",".join([s for s in done.split(",") if s and s != stage] + [stage])


def run_name(cfg: PipelineConfig, overrides: Sequence[str] = (),
             job: Optional[int] = None) -> str:
    """The name of the run that follows one trained model, saying what tells it from the other
    runs of its experiment: a sweep job's number and overrides (``job3 train.learning_rate=1e-4``);
    else under ``dvc exp run`` the DVC experiment's name; else ``<model>-<dataset>`` and the
    command line's overrides, or without any (``dvc repro``) a short hash of the config, which
    runs of the same config share."""
    if job is not None:
        return shorten(" ".join([f"job{job}", *overrides]))
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    cfg = unguarded(cfg)
    name = f"{cfg.model.name}-{cfg.dataset.name}"
    if overrides:
        return shorten(" ".join([name, *overrides]))
    return f"{name}-{_config_digest(cfg)[:6]}"


def _config_digest(cfg: PipelineConfig) -> str:
    """SHA-256 of the resolved config's values that can change an output (not ``tracking.*`` or
    ``runtime.*``)."""
    values = {key: value for key, value in to_flat_dict(unguarded(cfg)).items()
              if not key.startswith(("tracking.", "runtime."))}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def shorten(name: str, limit: int = 250) -> str:
    """A run name short enough to read in the MLflow UI's run list (MLflow would take 8000
    characters)."""
    return name if len(name) <= limit else name[:limit - 3] + "..."


def last_train_step(run) -> int:
    """The optimizer steps the run's model trained (0 when unknown): summary metrics are logged
    at that step, after the per-epoch values, so each metric's latest value is the model's."""
    try:
        return int(run.data.tags.get(TRAIN_STEPS_TAG, 0))
    except ValueError:
        return 0


@contextlib.contextmanager
def model_run(stage: str, cfg: PipelineConfig, model_sha: str) -> Iterator[Any]:
    """Reopen the run that trained the model with ``model_sha``, or start one if none is found
    (a wiped database, or a model trained with tracking elsewhere). With the server
    unreachable, the run is looked up in the pending store; one started there is merged into
    the server's run of the same model when it is sent."""
    cfg = unguarded(cfg)
    link, experiment_id = _connect(cfg, stage)
    try:
        run_id = find_model_run(experiment_id, model_sha)
    except Exception as error:
        if not (link.remote and link.outage is None and is_outage(error)):
            raise
        experiment_id = _go_offline(link, error, "at the start")
        run_id = find_model_run(experiment_id, model_sha)
    if run_id is None:
        logger.warning("no MLflow run trained model %s; starting a new run", model_sha[:12])
    with refusals_named(link.server_uri), _open_run(
            stage, cfg, link, experiment_id, run_id=run_id, parent_run_id=None,
            run_name=run_name(cfg), log_params=run_id is None) as run:
        if run_id is None:
            set_tags({MODEL_SHA_TAG: model_sha})
        yield run


def log_metrics_by_split(metrics: dict[str, Any], step: int = 0) -> None:
    """``{"test": {"accuracy": .9}}`` -> MLflow metrics ``test_accuracy`` and so on, at ``step``
    (see :func:`last_train_step`); a value that is not a finite number (an undefined
    correlation) is not logged as one."""
    import mlflow

    flat = {f"{split}_{name}": value
            for split, values in metrics.items() if isinstance(values, dict)
            for name, value in values.items()
            if isinstance(value, (int, float)) and math.isfinite(value)}
    _guarded(lambda: mlflow.log_metrics(flat, step=step))


def lineage_tags(raw_dir: str, pretrained_dir: str, tokenized_dir: str) -> dict[str, str]:
    """Content hashes and revisions of what a model was trained from."""
    return {
        "dataset_sha256": hash_path(raw_dir),
        "tokenized_sha256": hash_path(tokenized_dir),
        "checkpoint_sha256": load_pretrained_manifest(pretrained_dir)["sha256"],
        "dataset_revision": str(load_raw_manifest(raw_dir)["provenance"]["revision"]),
    }


def log_config(cfg: PipelineConfig) -> None:
    """The whole resolved config as an artifact, loadable as a params.yaml to reproduce the run."""
    import mlflow

    _guarded(lambda: mlflow.log_dict(to_nested_dict(cfg), "config/params.yaml"))


def log_dvc_lock() -> None:
    """Under DVC (``dvc repro``, ``dvc exp run``: DVC_ROOT is set), DVC's lock file as the
    stage finds it, as the artifact ``config/dvc.lock``. Its download and tokenize entries
    already name this run's inputs in DVC's cache and remote, which ``hf-text-pipeline
    reproduce`` pulls: the lock of the run's git commit is the one from before the run."""
    lock = Path(os.environ.get("DVC_ROOT", "")) / "dvc.lock"
    if "DVC_ROOT" in os.environ and lock.is_file():
        log_artifact(str(lock), artifact_path="config")


def input_example(raw_dir: str, rows: int = 2) -> list[dict[str, str]]:
    """A few validation rows (texts cut to 500 characters) to log with the MLflow model."""
    raw = load_snapshot(raw_dir)
    split = raw[validation_split_name(list(raw))].select(range(rows))
    columns = [c for c in (TEXT, TEXT_PAIR) if c in split.column_names]
    return [{c: row[c][:500] for c in columns} for row in split]


def log_model(model_dir: str, input_example: list[dict[str, str]],
              run_id: Optional[str] = None) -> Any:
    """Log the trained model as an MLflow python model (``pipeline/serving.py``) that
    ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` load with this package, into the
    active run or the finished run ``run_id`` (a sweep's best job; its experiment becomes the
    active one, where MLflow files a model logged without an active run); returns its
    ``ModelInfo``."""
    import importlib.metadata

    import mlflow
    import pandas as pd
    from mlflow.models import Model

    if run_id is not None:
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id)
                              .info.experiment_id)
    package = Path(__file__).resolve().parent
    # Explicit requirements: MLflow's guesses assume torchvision, which this stack never uses.
    requirements = [f"{name}=={importlib.metadata.version(name)}"
                    for name in ("mlflow", "transformers", "torch", "tokenizers", "safetensors",
                                 "numpy", "pandas")]
    return _guarded(lambda: Model.log(
        artifact_path=None,
        run_id=run_id,
        flavor=mlflow.pyfunc,
        name="model",
        python_model=str(package / "serving.py"),
        artifacts={"model": str(Path(model_dir).resolve())},
        code_paths=[str(package)],
        input_example=pd.DataFrame(input_example),
        pip_requirements=requirements,
    ))
