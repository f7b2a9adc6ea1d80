"""MLflow tracking: where runs go, and the one run that follows a trained model through stages.

The train stage opens a run and tags it with the SHA-256 of the model it saved. The evaluate and
report stages hash the model they read and attach to the run with that tag, so train, evaluate
and report of one model land in one run without a run id ever being written into a DVC output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from pipeline.artifacts import hash_path
from pipeline.config import PipelineConfig, to_flat_dict, to_nested_dict, unguarded
from pipeline.contracts import (
    TEXT,
    TEXT_PAIR,
    load_pretrained_manifest,
    load_raw_manifest,
    load_snapshot,
    validation_split_name,
)

logger = logging.getLogger(__name__)

MODEL_SHA_TAG = "model_sha256"
DEFAULT_DB = "mlflow.db"
# Set by the sweep callback (hydra_plugins/mlflow_sweep) in the launching process; launcher
# workers inherit it, and each job's train run becomes a child of the sweep's parent run.
SWEEP_PARENT_ENV = "PIPELINE_SWEEP_PARENT_RUN_ID"


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


def set_experiment(name: str) -> str:
    """Select (creating if needed) the experiment; artifacts of the default store stay in the
    project."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _database_lock(uri):
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
    resolved config as params. An exception ends the run FAILED; Ctrl-C or SIGTERM ends it
    KILLED; either way the exception propagates.
    """
    import mlflow

    cfg = unguarded(cfg)  # records hold every value, also those the stage does not read
    experiment_id = set_experiment(cfg.tracking.experiment_name)
    previous = signal.signal(signal.SIGTERM, _raise_terminated) \
        if _in_main_thread() else None
    run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, parent_run_id=parent_run_id,
                           run_name=None if run_id else (run_name or stage))
    status = "FINISHED"
    try:
        tags = {"stages": _append_stage(run, stage)}
        if run_id is None:
            tags.update(git_state())
            tags["dataset"] = cfg.dataset.name
            tags["model"] = cfg.model.name
            if os.environ.get("DVC_EXP_NAME"):
                tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        mlflow.set_tags(tags)
        if log_params:
            mlflow.log_params({k: "None" if v is None else v for k, v in to_flat_dict(cfg).items()})
        logger.info("MLflow run %s (%s) in %s", run.info.run_id, stage, tracking_uri())
        yield run
    except (KeyboardInterrupt, _Terminated):
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        mlflow.end_run(status=status)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _append_stage(run, stage: str) -> str:
    done = run.data.tags.get("stages", "")
    return ",".join([s for s in done.split(",") if s and s != stage] + [stage])


def run_name(cfg: PipelineConfig) -> str:
    """``<model>-<dataset>``: the name of the run that follows one trained model."""
    cfg = unguarded(cfg)
    return f"{cfg.model.name}-{cfg.dataset.name}"


@contextlib.contextmanager
def model_run(stage: str, cfg: PipelineConfig, model_sha: str) -> Iterator[Any]:
    """Reopen the run that trained the model with ``model_sha``, or start one if none is found
    (a wiped database, or a model trained with tracking elsewhere)."""
    cfg = unguarded(cfg)
    experiment_id = set_experiment(cfg.tracking.experiment_name)
    run_id = find_model_run(experiment_id, model_sha)
    if run_id is None:
        logger.warning("no MLflow run trained model %s; starting a new run", model_sha[:12])
    with stage_run(stage, cfg, run_id=run_id, run_name=run_name(cfg),
                   log_params=run_id is None) as run:
        if run_id is None:
            import mlflow

            mlflow.set_tag(MODEL_SHA_TAG, model_sha)
        yield run


def log_metrics_by_split(metrics: dict[str, Any]) -> None:
    """``{"test": {"accuracy": .9}}`` -> MLflow metrics ``test_accuracy`` and so on."""
    import mlflow

    flat = {f"{split}_{name}": value
            for split, values in metrics.items() if isinstance(values, dict)
            for name, value in values.items() if isinstance(value, (int, float))}
    mlflow.log_metrics(flat)


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

    mlflow.log_dict(to_nested_dict(cfg), "config/params.yaml")


def input_example(raw_dir: str, rows: int = 2) -> list[dict[str, str]]:
    """A few validation rows (texts cut to 500 characters) to log with the MLflow model."""
    raw = load_snapshot(raw_dir)
    split = raw[validation_split_name(list(raw))].select(range(rows))
    columns = [c for c in (TEXT, TEXT_PAIR) if c in split.column_names]
    return [{c: row[c][:500] for c in columns} for row in split]


def log_model(model_dir: str, input_example: list[dict[str, str]]) -> None:
    """Log the trained model as an MLflow python model (``pipeline/serving.py``) that
    ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` load with this package."""
    import importlib.metadata

    import mlflow
    import pandas as pd

    package = Path(__file__).resolve().parent
    # Explicit requirements: MLflow's guesses assume torchvision, which this stack never uses.
    requirements = [f"{name}=={importlib.metadata.version(name)}"
                    for name in ("mlflow", "transformers", "torch", "tokenizers", "safetensors",
                                 "numpy", "pandas")]
    mlflow.pyfunc.log_model(
        name="model",
        python_model=str(package / "serving.py"),
        artifacts={"model": str(Path(model_dir).resolve())},
        code_paths=[str(package)],
        input_example=pd.DataFrame(input_example),
        pip_requirements=requirements,
    )
