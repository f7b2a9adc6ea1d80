"""The MLflow model registry: each trained model becomes a version of ``tracking.registered_model``
tagged with what it came from, and the alias ``champion`` follows the best of them.

The version's tags are its run's lineage (git commit, dataset, tokenized data, pretrained
checkpoint and model hashes, DVC experiment) and its validation main metric. The alias moves to
the new version when that metric beats the champion's, so ``models:/<name>@champion`` (for
``mlflow models serve`` and ``hf-text-pipeline predict``) is always the best model trained on
the dataset. A run that records into the pending store (the tracking server did not answer)
registers nothing: the registry lives on the server, and the warning says how to register it
once the run is sent.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from pipeline import tracking

logger = logging.getLogger(__name__)

CHAMPION = "champion"
# The run tags a version carries: the code, data and weights it came from.
LINEAGE_TAGS = ("git_commit", "git_dirty", "dvc_exp_name", "dataset_sha256", "dataset_revision",
                "tokenized_sha256", "checkpoint_sha256", tracking.MODEL_SHA_TAG)
# What MLflow answers for an alias no version holds (SQLite and REST stores alike).
_NO_SUCH_ALIAS = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")


def register_model(run_id: str, model_uri: str, name: str, main_metric: str, *,
                   compete: bool = True) -> Any:
    """Register the model run ``run_id`` logged (``model_uri``, ``models:/<model id>``) as a new
    version of ``name`` with the run's lineage tags and ``validation_<main_metric>``; with
    ``compete``, give it the alias ``champion`` if that metric is higher than the champion's
    (or no version holds the alias). Returns the version, or None when the stage records into
    the pending store or the server stops answering (one warning; the stage goes on)."""
    metric = f"validation_{main_metric}"
    if tracking.recording_locally():
        logger.warning(
            "model not registered as '%s': the registry is on the tracking server and this run "
            "is kept in the pending store; once it is sent, register it with "
            "mlflow.register_model('runs:/<its run id>/model', '%s')", name, name)
        return None
    try:
        return _register(run_id, model_uri, name, metric, compete)
    except Exception as error:
        if not tracking.is_outage(error):
            raise
        logger.warning("model of run %s not registered as '%s': the tracking server stopped "
                       "answering (%s); register it with mlflow.register_model('runs:/%s/model', "
                       "'%s')", run_id, name, tracking.outage_reason(error), run_id, name)
        return None


def _register(run_id: str, model_uri: str, name: str, metric: str, compete: bool) -> Any:
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    value = run.data.metrics.get(metric)
    tags = {key: run.data.tags[key] for key in LINEAGE_TAGS if key in run.data.tags}
    if value is not None:
        tags[metric] = repr(float(value))
    version = mlflow.register_model(model_uri, name, tags=tags)
    if not compete:
        logger.info("registered %s version %s; not compared for %s: validated on a capped "
                    "split (train.max_eval_samples)", name, version.version, CHAMPION)
        return version
    if value is None:
        logger.warning("registered %s version %s without %s: no %s to compare", name,
                       version.version, CHAMPION, metric)
        return version
    # Compare, then move: serialised on one machine's SQLite store; on a server two runs
    # finishing in the same instant could both move it (the later one wins).
    with tracking._database_lock(mlflow.get_tracking_uri()):
        holder = champion(client, name)
        held = None if holder is None else holder.tags.get(metric)
        if holder is not None and held is None:
            logger.warning("%s stays %s version %s, which has no %s tag to compare with",
                           CHAMPION, name, holder.version, metric)
        elif holder is None or value > float(held):
            client.set_registered_model_alias(name, CHAMPION, version.version)
            logger.info("%s version %s is the %s (%s %s%s)", name, version.version, CHAMPION,
                        metric, value, "" if holder is None
                        else f", version {holder.version} had {held}")
        else:
            logger.info("registered %s version %s (%s %s); %s stays version %s (%s)", name,
                        version.version, metric, value, CHAMPION, holder.version, held)
    return version


def champion(client: Any, name: str) -> Optional[Any]:
    """The version of ``name`` that holds the alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:
        if error.error_code in _NO_SUCH_ALIAS:
            return None
        raise
