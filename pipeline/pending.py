"""Runs kept locally while the MLflow tracking server was unreachable, and their replay to it.

When a stage cannot reach the server (``MLFLOW_TRACKING_URI=http...``), at its start or midway,
it records into a SQLite MLflow store in ``tracking.pending_dir`` (default ``mlruns-pending/``
in the project) with MLflow's own API, so nothing the stage logs is lost or changed: params,
tags, every metric value with its step and time, dataset inputs, artifacts and the logged
model. A run that took over midway is tagged with the server run it continues.

:func:`sync` sends them: a continuation into the run it continues, a run that found no run of
its model on the server (evaluate or report while the server was down) into the server's run of
that model, any other run as a new run, with its start and end times. Each sent run is deleted
from the store (its files too). Stages sync at their start when the server answers, and the
``hf-text-pipeline sync`` command does it on demand.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.tracking import MODEL_SHA_TAG, last_sign_of_life, process_alive, set_experiment

logger = logging.getLogger(__name__)

DATABASE = "mlflow.db"
CONTINUES_TAG = "pending_continues_run"
SYNCED_TO_TAG = "synced_to"
SYNCED_FROM_TAG = "synced_from"
_BATCH_METRICS = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
_BATCH_TAGS = 100      # MAX_PARAMS_TAGS_PER_BATCH


def store_uri(pending_dir: Path) -> str:
    return f"sqlite:///{Path(pending_dir).resolve() / DATABASE}"


@dataclass(frozen=True)
class Sent:
    pending_run_id: str
    server_run_id: str
    name: str
    what: str


def pending_runs(pending_dir: Path) -> list[Any]:
    """The runs waiting in ``pending_dir``, oldest first (parents before their children)."""
    from mlflow import MlflowClient

    from pipeline.tracking import _database_lock

    if not (Path(pending_dir) / DATABASE).is_file():
        return []
    uri = store_uri(pending_dir)
    with _database_lock(uri):
        client = MlflowClient(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=50_000) if experiments else []
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def sync(pending_dir: Path, target_uri: str, only: Optional[set[str]] = None,
         wait: bool = True, report: Optional[Callable[[Sent], None]] = None) -> list[Sent]:
    """Send the finished runs of ``pending_dir`` (or those of ``only``) to ``target_uri``;
    ``report`` is called with each as soon as it is sent.

    Runs still RUNNING are sent only if their process is known to be dead (then as KILLED): a
    live one is still being written. ``wait=False`` returns at once when another process is
    syncing. Raises what the server raises (an outage included): a run is deleted from the
    store only once all of it was sent.
    """
    from filelock import FileLock, Timeout
    from mlflow import MlflowClient

    pending_dir = Path(pending_dir)
    if not (pending_dir / DATABASE).is_file():
        return []
    try:
        lock = FileLock(str(pending_dir / "sync.lock"), timeout=-1 if wait else 0)
        lock.acquire()
    except Timeout:
        return []
    try:
        local = MlflowClient(store_uri(pending_dir))
        sent: list[Sent] = []
        for run in pending_runs(pending_dir):
            if only is not None and run.info.run_id not in only:
                continue
            if run.info.status == "RUNNING" and process_alive(run.data.tags) is not False:
                continue
            what = describe(local, run)
            target = _send(local, MlflowClient(target_uri), target_uri, run)
            local.set_tag(run.info.run_id, SYNCED_TO_TAG, target)
            _forget(local, run)
            sent.append(Sent(run.info.run_id, target, run.info.run_name, what))
            if report:
                report(sent[-1])
        return sent
    finally:
        lock.release()


def sync_quietly(pending_dir: Path, target_uri: str) -> None:
    """At a stage's start, with the server answering: send what earlier stages kept; never fail
    the stage for it."""
    if not (Path(pending_dir) / DATABASE).is_file():
        return
    try:
        for done in sync(pending_dir, target_uri, wait=False):
            logger.info("sent run %s kept in %s while %s was unreachable: now run %s (%s)",
                        done.name, pending_dir, target_uri, done.server_run_id, done.what)
    except Exception as error:  # the stage's own work matters more than old records
        logger.warning("could not send the runs kept in %s to %s (%s); they stay there for "
                       "`hf-text-pipeline sync`", pending_dir, target_uri,
                       str(error).splitlines()[0][:300])


def settle(pending_dir: Path, target_uri: str, run_id: str, stage: str) -> bool:
    """At the end of a stage that recorded into the pending store: send its run if the server
    is back, else say in one line what it holds and how to send it. True if it is sent."""
    from mlflow import MlflowClient

    # Still down (or refusing): the records wait, and the line below says so.
    with contextlib.suppress(Exception):
        sync(pending_dir, target_uri, only={run_id})
    local = MlflowClient(store_uri(pending_dir))
    run = local.get_run(run_id)
    if SYNCED_TO_TAG in run.data.tags:  # by this process or one syncing at the same time
        logger.info("MLflow server %s answers again: the %s run's records are on it (run %s)",
                    target_uri, stage, run.data.tags[SYNCED_TO_TAG])
        return True
    logger.warning("MLflow: the %s run %s is not on %s; kept in %s: %s. Send it with "
                   "`hf-text-pipeline sync` (the next stage that reaches the server does)",
                   stage, run.info.run_name, target_uri, pending_dir, describe(local, run))
    return False


def describe(client, run) -> str:
    """What a pending run holds, exactly: counts, metric names with their number of values,
    artifact files and logged models."""
    points = {key: len(client.get_metric_history(run.info.run_id, key))
              for key in sorted(run.data.metrics)}
    files = sorted(str(p.relative_to(folder)) for folder in [_artifact_dir(run.info.artifact_uri)]
                   if folder.is_dir() for p in folder.rglob("*") if p.is_file())
    models = [m.name for m in _models(client, run)]
    inputs = [_context(i) for i in run.inputs.dataset_inputs] if run.inputs else []
    continues = run.data.tags.get(CONTINUES_TAG)
    parts = [f"continues server run {continues}" if continues else "",
             f"{len(run.data.params)} params" if run.data.params else "",
             f"{len([t for t in run.data.tags if not t.startswith('mlflow.')])} tags",
             f"{len(inputs)} dataset inputs ({', '.join(inputs)})" if inputs else "",
             f"{sum(points.values())} metric values ("
             + ", ".join(f"{key} x{count}" for key, count in points.items()) + ")"
             if points else "",
             f"{len(files)} artifact files ({', '.join(files[:10])}"
             + (", ..." if len(files) > 10 else "") + ")" if files else "",
             f"logged model {', '.join(models)}" if models else "",
             f"status {run.info.status}"]
    return "; ".join(part for part in parts if part)


def _send(local, server, target_uri: str, run) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import RestException

    tags = dict(run.data.tags)
    experiment = local.get_experiment(run.info.experiment_id).name
    experiment_id = set_experiment(experiment, target_uri)
    target = tags.get(CONTINUES_TAG) or _server_run_of_model(server, experiment_id,
                                                             tags.get(MODEL_SHA_TAG))
    existing = None
    if target:
        try:
            existing = server.get_run(target)
        except RestException:  # deleted on the server meanwhile: the records become a new run
            existing = None
    if existing is None:
        parent = _sent_parent(local, tags.get("mlflow.parentRunId"))
        created = server.create_run(experiment_id, start_time=run.info.start_time,
                                    run_name=run.info.run_name,
                                    tags={"mlflow.parentRunId": parent} if parent else None)
        target, known_params = created.info.run_id, {}
    else:
        known_params = existing.data.params
        if "stages" in tags:
            done = existing.data.tags.get("stages", "").split(",")
            tags["stages"] = ",".join([s for s in done if s]
                                      + [s for s in tags["stages"].split(",") if s not in done])
    skip = {CONTINUES_TAG, SYNCED_TO_TAG, "mlflow.parentRunId", "mlflow.runName"}
    tag_list = [RunTag(k, v) for k, v in tags.items() if k not in skip]
    tag_list.append(RunTag(SYNCED_FROM_TAG, run.info.run_id))
    params = [Param(k, v) for k, v in run.data.params.items() if k not in known_params]
    different = [k for k, v in run.data.params.items() if k in known_params
                 and known_params[k] != v]
    if different:
        logger.info("run %s: params already on server run %s with other values kept there: %s",
                    run.info.run_id, target, ", ".join(different))
    for chunk in range(0, max(len(tag_list), len(params)), _BATCH_TAGS):
        server.log_batch(target, params=params[chunk:chunk + _BATCH_TAGS],
                         tags=tag_list[chunk:chunk + _BATCH_TAGS])
    metrics = [Metric(m.key, m.value, m.timestamp, m.step)
               for key in run.data.metrics for m in local.get_metric_history(run.info.run_id, key)]
    for chunk in range(0, len(metrics), _BATCH_METRICS):
        server.log_batch(target, metrics=metrics[chunk:chunk + _BATCH_METRICS])
    if run.inputs and run.inputs.dataset_inputs:
        server.log_inputs(target, datasets=run.inputs.dataset_inputs)
    folder = _artifact_dir(run.info.artifact_uri)
    if folder.is_dir() and any(folder.iterdir()):
        server.log_artifacts(target, str(folder))
    for model in _models(local, run):
        _send_model(server, experiment_id, target, model)
    status = run.info.status if run.info.status != "RUNNING" else "KILLED"
    server.set_terminated(target, status,
                          end_time=run.info.end_time or last_sign_of_life(local, run))
    return target


def _send_model(server, experiment_id: str, target: str, model) -> None:
    """A logged model of a pending run, as a logged model of ``target`` (what ``runs:/<target>/
    <name>`` loads), its MLmodel file naming the server's model and run."""
    import yaml
    from mlflow.entities import LoggedModelOutput

    made = server.create_logged_model(
        experiment_id, name=model.name, source_run_id=target, model_type=model.model_type,
        params=model.params or None,
        tags={k: v for k, v in model.tags.items() if not k.startswith("mlflow.")} or None)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "model"
        shutil.copytree(_artifact_dir(model.artifact_location), copy)
        card = copy / "MLmodel"
        if card.is_file():
            spec = yaml.safe_load(card.read_text())
            spec.update(artifact_path=made.artifact_location, model_id=made.model_id,
                        model_uuid=made.model_id, run_id=target)
            card.write_text(yaml.safe_dump(spec, sort_keys=False))
        server.log_model_artifacts(made.model_id, str(copy))
    server.finalize_logged_model(made.model_id, "READY")
    server.log_outputs(target, [LoggedModelOutput(made.model_id, step=0)])


def _context(dataset_input) -> str:
    """``<dataset name>/<context>``: how :func:`describe` names a dataset input."""
    context = next((t.value for t in dataset_input.tags if t.key == "mlflow.data.context"), "")
    return f"{dataset_input.dataset.name}/{context}" if context else dataset_input.dataset.name


def _server_run_of_model(server, experiment_id: str, model_sha: Optional[str]) -> Optional[str]:
    if not model_sha:
        return None
    runs = server.search_runs([experiment_id],
                              filter_string=f"tags.{MODEL_SHA_TAG} = '{model_sha}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _sent_parent(local, parent: Optional[str]) -> Optional[str]:
    """The server id of a run's parent: itself if it lives on the server, the run it was sent
    as if it was pending too."""
    if not parent:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return local.get_run(parent).data.tags.get(SYNCED_TO_TAG)
    except MlflowException:
        return parent


def _models(client, run) -> list[Any]:
    return list(client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"))


def _forget(local, run) -> None:
    """Delete a sent run from the pending store, its files and models' files included."""
    for model in _models(local, run):
        shutil.rmtree(_artifact_dir(model.artifact_location), ignore_errors=True)
    shutil.rmtree(_artifact_dir(run.info.artifact_uri), ignore_errors=True)
    local.delete_run(run.info.run_id)


def _artifact_dir(uri: str) -> Path:
    from mlflow.utils.file_utils import local_file_uri_to_path

    return Path(local_file_uri_to_path(uri))
