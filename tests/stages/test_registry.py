"""The model registry (pipeline/registry.py): each registered version carries its run's
lineage, and the alias `champion` moves only to a strictly better validation main metric.

Runs here log a trivial MLflow model instead of training one; the train stage's own
registration is checked on the stage chain (tests/stages/test_stage_chain.py)."""

from __future__ import annotations

import mlflow
import pytest

from pipeline.registry import CHAMPION, LINEAGE_TAGS, champion, register_model
from pipeline.tracking import set_experiment

MODEL_CODE = """
import mlflow
from mlflow.pyfunc import PythonModel


class Constant(PythonModel):
    def predict(self, context, model_input, params=None):
        return [0] * len(model_input)


mlflow.models.set_model(Constant())
"""


@pytest.fixture
def log_run(tmp_path):
    """A run with lineage tags, a validation accuracy and a logged model: (run id, model uri)."""
    code = tmp_path / "constant_model.py"
    code.write_text(MODEL_CODE)
    mlflow.set_experiment(experiment_id=set_experiment("registry"))  # artifacts beside the db

    def log(accuracy: float, number: int) -> tuple[str, str]:
        tags = {key: f"{key}-{number}" for key in LINEAGE_TAGS}
        with mlflow.start_run(tags={**tags, "unrelated": "x"}) as run:
            mlflow.log_metric("validation_accuracy", accuracy)
            info = mlflow.pyfunc.log_model(name="model", python_model=str(code))
        return run.info.run_id, info.model_uri

    yield log
    mlflow.set_tracking_uri(None)


def test_versions_carry_their_lineage_and_champion_moves_only_to_a_better_metric(log_run):
    client = mlflow.MlflowClient()
    # (validation accuracy, competes, the champion after it registers)
    for number, (accuracy, compete, holder) in enumerate(
            [(0.8, True, "1"), (0.9, True, "2"), (0.85, True, "2"), (0.9, True, "2"),
             (0.99, False, "2"), (0.95, True, "6")], start=1):
        run_id, model_uri = log_run(accuracy, number)
        version = register_model(run_id, model_uri, "news", "accuracy", compete=compete)
        # Versions are numbers on a SQLite store and strings through a server: compare as text.
        assert (str(version.version), version.run_id) == (str(number), run_id)
        assert str(champion(client, "news").version) == holder, (number, accuracy)
    first = client.get_model_version("news", "1")
    assert first.tags == {**{key: f"{key}-1" for key in LINEAGE_TAGS},
                          "validation_accuracy": "0.8"}
    aliases = client.get_registered_model("news").aliases
    assert {alias: str(version) for alias, version in aliases.items()} == {CHAMPION: "6"}
