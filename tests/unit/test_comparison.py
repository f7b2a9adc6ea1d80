"""The comparison of a sweep's runs: which params count as swept, the ranking, the files."""

from __future__ import annotations

import csv
from types import SimpleNamespace

from pipeline.comparison import swept_params, tick_label, write_comparison


def _run(name: str, status: str, params: dict, metrics: dict, tags: dict | None = None):
    return SimpleNamespace(info=SimpleNamespace(run_name=name, run_id=f"id-{name}", status=status),
                           data=SimpleNamespace(params=params, metrics=metrics, tags=tags or {}))


def _sweep():
    # output_dir differs too, but it is what transformers logs of TrainingArguments (undotted).
    return [
        _run("job0", "FINISHED", {"model.name": "minilm", "train.learning_rate": "1e-05",
                                  "output_dir": "/a"},
             {"validation_accuracy": 0.70, "validation_loss": 0.9, "loss": 0.5},
             {"sweep_job": "0"}),
        _run("job1", "FINISHED", {"model.name": "minilm", "train.learning_rate": "0.0001",
                                  "output_dir": "/b"},
             {"validation_accuracy": 0.90, "validation_loss": 0.4}, {"sweep_job": "1"}),
        # Failed before its stage opened a run: only its overrides, no metrics.
        _run("job2", "FAILED", {"train.learning_rate": "-1"}, {}, {"sweep_job": "2"}),
    ]


def test_swept_params_are_the_config_keys_that_differ():
    assert swept_params(_sweep()) == ["train.learning_rate"]


def test_table_ranks_best_first_failed_last_without_step_curves(tmp_path):
    paths = write_comparison(_sweep(), "validation_accuracy", tmp_path)
    assert [p.name for p in paths] == ["runs.csv", "runs.md", "metric_vs_params.png"]
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert [r["run"] for r in rows] == ["job1", "job0", "job2"]
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "FAILED"]
    assert list(rows[0]) == ["run", "status", "sweep_job", "train.learning_rate",
                             "validation_accuracy", "validation_loss", "run_id"]
    assert rows[2]["validation_accuracy"] == ""
    assert (tmp_path / "metric_vs_params.png").read_bytes()[:4] == b"\x89PNG"


def test_long_categorical_values_keep_their_distinguishing_end():
    assert tick_label("minilm_l6") == "minilm_l6"
    short = tick_label("/tmp/pytest-of-root/pytest-1/test_queue0/one_layer")
    assert len(short) == 24 and short.endswith("/one_layer") and short.startswith("…")
