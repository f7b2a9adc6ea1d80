"""Reclaim the disk space of deleted MLflow runs (``make clean-runs``).

    hf-text-pipeline clean-runs      # the project's mlflow.db, or MLFLOW_TRACKING_URI's database

Deleting a run (the MLflow UI's Delete, ``mlflow runs delete``) only marks it; ``mlflow gc``
purges marked runs with their artifacts. In MLflow 3 a run's model is a logged model of its own,
which neither the run's deletion nor ``mlflow gc`` touches: each would keep its copy of the
weights (87 MB for MiniLM-L6) for good. So this command first marks deleted the logged models
whose run is deleted (unless a registered model version uses them), then runs ``mlflow gc`` on
the store, and, for SQLite, compacts the database file (``VACUUM``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="hf-text-pipeline clean-runs",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def delete_models_of_deleted_runs(client) -> list[str]:
    """Mark deleted each logged model whose source run (or experiment) is deleted and which no
    registered model version uses; returns their ids."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    registered = {version.model_id for version in client.search_model_versions()}
    experiments = client.search_experiments(view_type=ViewType.ALL)
    deleted_experiments = {e.experiment_id for e in experiments if e.lifecycle_stage == "deleted"}
    marked = []
    for experiment in experiments:
        for model in client.search_logged_models([experiment.experiment_id]):
            if model.model_id in registered or not model.source_run_id:
                continue
            try:
                run = client.get_run(model.source_run_id)
            except MlflowException:  # purged earlier, the model left behind
                gone = True
            else:
                gone = (run.info.lifecycle_stage == "deleted"
                        or run.info.experiment_id in deleted_experiments)
            if gone:
                client.delete_logged_model(model.model_id)
                marked.append(model.model_id)
    return marked


def main(argv: list[str] | None = None) -> int:
    _parser().parse_args(argv)
    import mlflow

    from pipeline.artifacts import human_size
    from pipeline.tracking import is_remote, tracking_uri

    uri = tracking_uri()
    if is_remote(uri):
        print(f"clean-runs: error: {uri} is a tracking server: run `mlflow gc "
              "--backend-store-uri <its database>` where the server runs", file=sys.stderr)
        return 1
    database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    artifacts = database.parent / "mlartifacts" if database else None
    before = {path: _size(path) for path in (database, artifacts) if path}
    marked = delete_models_of_deleted_runs(mlflow.MlflowClient(uri))
    gc = [str(Path(sys.executable).parent / "mlflow"), "gc", "--backend-store-uri", uri,
          "--tracking-uri", uri]
    done = subprocess.run(gc, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"clean-runs: error: `mlflow gc` failed: {done.stderr.strip()[-2000:]}",
              file=sys.stderr)
        return 1
    # "Run with ID <id> has been permanently deleted.", "Logged model with ID <id> ..."
    purged = [line.split(" with ID ")[1].split()[0] for line in done.stdout.splitlines()
              if " with ID " in line]
    if database:
        for folder in [artifacts / name for name in purged] + \
                [artifacts / "models" / name for name in purged]:
            with contextlib.suppress(OSError):  # absent, or not empty: not ours to remove
                folder.rmdir()
        connection = sqlite3.connect(database)
        try:
            connection.execute("VACUUM")  # SQLite keeps freed pages in the file otherwise
        finally:
            connection.close()
    sizes = ", ".join(f"{path.name} {human_size(size)} -> {human_size(_size(path))}"
                      for path, size in before.items())
    runs = len(purged) - sum(name.startswith("m-") for name in purged)
    print(f"purged {runs} deleted runs and {len(marked)} models of deleted runs from {uri}"
          + (f"; {sizes}" if sizes else ""))
    return 0
