"""`make clean-runs` (`hf-text-pipeline clean-runs`): deleted runs give their disk space back,
their logged models included; live runs and their models are untouched."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from pipeline.commands import main
from pipeline.tracking import set_experiment


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def _run_with_a_model(experiment_id: str, weights: Path) -> tuple[str, str]:
    with mlflow.start_run(experiment_id=experiment_id) as run:
        model = mlflow.pyfunc.log_model(name="model", python_model=_Echo(),
                                        artifacts={"weights": str(weights)}, pip_requirements=[])
        mlflow.log_artifact(str(weights), "report")
    return run.info.run_id, model.model_id


def test_deleted_runs_and_their_models_are_purged_and_live_ones_kept(tmp_path, capsys):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    artifacts = tmp_path / "mlartifacts"
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(2_000_000))
    experiment_id = set_experiment("bbc_news", uri)
    kept_run, kept_model = _run_with_a_model(experiment_id, weights)
    gone_run, gone_model = _run_with_a_model(experiment_id, weights)
    client = mlflow.MlflowClient(uri)
    client.delete_run(gone_run)
    assert (artifacts / "models" / gone_model).is_dir()

    assert main(["clean-runs"]) == 0

    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith(f"purged 1 deleted runs and 1 models of deleted runs from {uri}; "
                          "mlflow.db "), out
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_run(gone_run)
    assert not (artifacts / gone_run).exists() and not (artifacts / "models" / gone_model).exists()
    assert client.get_run(kept_run).info.lifecycle_stage == "active"
    assert client.get_logged_model(kept_model).status.name == "READY"
    kept = artifacts / "models" / kept_model / "artifacts" / "artifacts" / "model.safetensors"
    assert kept.read_bytes() == weights.read_bytes()
    assert (artifacts / kept_run / "artifacts" / "report" / "model.safetensors").is_file()
