"""The default SQLite tracking database under concurrent processes."""

from __future__ import annotations

import subprocess
import sys

import mlflow

from support import PROJECT, subprocess_env

WRITER = """
import sys
import mlflow
from pipeline.tracking import set_experiment
experiment_id = set_experiment("concurrent")
with mlflow.start_run(experiment_id=experiment_id, run_name=f"writer-{sys.argv[1]}"):
    mlflow.log_params({f"p{i}": i for i in range(20)})
    for step in range(20):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
"""


def test_parallel_processes_on_a_new_database_lose_no_run(tmp_path):
    """Four processes that create the database at once: MLflow alone fails here with alembic
    and "table already exists" errors; the pipeline serialises the schema creation."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = subprocess_env(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(PROJECT))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(i)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(4)]
    outputs = [w.communicate(timeout=300)[0] for w in writers]
    assert [w.returncode for w in writers] == [0] * 4, "\n".join(outputs)[-4000:]
    assert not any("database is locked" in out for out in outputs)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"writer-{i}" for i in range(4)]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(len(client.get_metric_history(r.info.run_id, "loss")) == 20 for r in runs)
