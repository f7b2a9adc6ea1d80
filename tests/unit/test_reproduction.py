"""`hf-text-pipeline reproduce`: the metric comparison, the input check, the stages' environment."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.commands.reproduce import (
    Record,
    compare_metrics,
    input_difference,
    is_timing,
    stage_env,
)

HISTORY = {"loss": [(1, 0.69), (2, 0.6931471805599453)], "test_accuracy": [(0, 0.5)],
           "train_runtime": [(2, 4.888)], "eval_samples_per_second": [(1, 277.5)],
           "system/cpu_utilization_percentage": [(0, 12.5)]}
PARAMS = {"paths": {"raw_dir": "data/raw", "pretrained_dir": "data/pretrained",
                    "tokenized_dir": "data/tokenized"},
          "dataset": {"source": "local", "path": "/data/reviews", "revision": None},
          "model": {"source": "hub", "path": "org/bert", "revision": "abc123"}}
TAGS = {"dataset_sha256": "a" * 64, "checkpoint_sha256": "b" * 64, "tokenized_sha256": "c" * 64}


def _record(tags: dict[str, str]) -> Record:
    return Record("run1", "tiny", "0", "f" * 40, False, Path("params.yaml"), None, tags)


def test_identical_histories_have_no_difference_and_timings_are_never_compared():
    reproduced = {**HISTORY, "train_runtime": [(2, 8.05)], "eval_samples_per_second": [(1, 64.5)],
                  "system/cpu_utilization_percentage": [(0, 99.0)]}
    rows = compare_metrics(HISTORY, reproduced)
    assert [row.name for row in rows] == sorted(HISTORY)
    assert all(row.difference is None for row in rows)
    timing = next(row for row in rows if row.name == "train_runtime")
    assert (timing.original, timing.reproduced) == (4.888, 8.05)


def test_a_value_off_in_its_last_digit_is_a_difference_naming_the_step_and_both_values():
    reproduced = {**HISTORY, "loss": [(1, 0.69), (2, 0.6931471805599454)]}
    rows = {row.name: row for row in compare_metrics(HISTORY, reproduced)}
    assert rows["loss"].difference == ("0.6931471805599453 in the run, 0.6931471805599454 "
                                       "reproduced (first at step 2)")
    assert [name for name, row in rows.items() if row.difference] == ["loss"]


def test_a_metric_logged_by_one_run_only_or_at_other_steps_is_a_difference():
    reproduced = {**HISTORY, "loss": [(1, 0.69)], "validation_f1": [(0, 0.7)]}
    del reproduced["test_accuracy"]
    rows = {row.name: row.difference for row in compare_metrics(HISTORY, reproduced)}
    assert rows["test_accuracy"] == "not logged by the reproduction"
    assert rows["validation_f1"] == "not logged by the run"
    assert rows["loss"] == "logged at steps 1,2 in the run, 1 in the reproduction"


def test_timings_are_the_trainers_runtimes_rates_and_system_metrics():
    assert is_timing("train_runtime") and is_timing("train_tokens_per_second")
    assert is_timing("system/memory_usage_megabytes")
    assert not is_timing("train_loss") and not is_timing("total_flos")


def test_inputs_as_recorded_pass():
    assert input_difference(_record(TAGS), dict(TAGS), PARAMS) is None
    assert input_difference(_record({}), dict(TAGS), PARAMS) is None, "nothing recorded"


def test_a_changed_dataset_is_named_first_with_its_source_and_what_followed():
    found = {**TAGS, "dataset_sha256": "d" * 64, "tokenized_sha256": "e" * 64}
    line = input_difference(_record(TAGS), found, PARAMS)
    assert line == ("the dataset snapshot (data/raw) is not the one run run1 trained on: "
                    "dataset_sha256 dddddddddddd now, aaaaaaaaaaaa recorded; its source "
                    "(local /data/reviews) changed since the run (and so the tokenized data); "
                    "nothing was trained")
    assert "\n" not in line


def test_a_changed_checkpoint_or_tokenized_data_is_named():
    line = input_difference(_record(TAGS), {**TAGS, "checkpoint_sha256": "0" * 64}, PARAMS)
    assert line.startswith("the pretrained checkpoint (data/pretrained) is not the one")
    assert "checkpoint_sha256 000000000000 now, bbbbbbbbbbbb recorded" in line
    assert "(hub org/bert)" in line
    line = input_difference(_record(TAGS), {**TAGS, "tokenized_sha256": "0" * 64}, PARAMS)
    assert line.startswith("the tokenized data (data/tokenized) is not the one")


def test_stages_log_into_the_runs_store_tagged_with_the_run_they_reproduce(monkeypatch):
    """From the worktree, the default store would be a database of its own: the store is
    named explicitly, and MLflow's run context tags every run the stages start."""
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    monkeypatch.setenv("MLFLOW_RUN_CONTEXT", json.dumps({"team": "nlp"}))
    env = stage_env("sqlite:////project/mlflow.db", "run1")
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:////project/mlflow.db"
    assert json.loads(env["MLFLOW_RUN_CONTEXT"]) == {"team": "nlp", "reproduces": "run1"}
    assert "DVC_EXP_NAME" not in env
