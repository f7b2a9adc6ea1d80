"""The train stage as DVC runs it (its checkpoint folder per run fingerprint, its MLflow run)
when a run resumes, diverges or trains on skewed labels, and what the report then shows."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import mlflow
import pytest
from conftest import sentiment_rows, write_jsonl
from omegaconf import OmegaConf

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.training import NonFiniteLossError, run_fingerprint
from support import compose_params, paths_under, run_stages, tiny_overrides


def _config(root: Path, corpus: Path, checkpoint: Path, *overrides: str):
    composed = compose_params([*tiny_overrides(corpus, checkpoint), *paths_under(root),
                               *overrides])
    return load_config(OmegaConf.create(composed))


def _fingerprint(cfg) -> str:
    return run_fingerprint(cfg, cfg.paths.tokenized_dir, cfg.paths.pretrained_dir)


def _latest_run(cfg):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    return client.search_runs([experiment.experiment_id], order_by=["attribute.start_time DESC"],
                              max_results=1)[0]


def _steps_trained(cfg) -> int:
    """Optimizer steps of the latest train run: one `loss` a step (logging_steps=1)."""
    run = _latest_run(cfg)
    return len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss"))


def test_changed_batch_size_or_data_trains_from_scratch_never_from_other_checkpoints(
        tmp_path, tiny_corpus, tiny_checkpoint):
    base = _config(tmp_path, tiny_corpus, tiny_checkpoint, "runtime.keep_checkpoints=true")
    run_stages(base, "download", "tokenize", "train")
    assert _steps_trained(base) == 12  # 48 rows, batch 8, 2 epochs
    base_fingerprint = _fingerprint(base)
    folder = Path(base.paths.trainer_checkpoints_dir) / base_fingerprint
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-12", "checkpoint-6"]

    shutil.rmtree(folder / "checkpoint-12")  # as if interrupted during epoch 2
    run_stages(base, "train")
    assert _steps_trained(base) == 6, "the same run resumes from its checkpoint"

    shutil.rmtree(folder / "checkpoint-12")
    smaller = _config(tmp_path, tiny_corpus, tiny_checkpoint, "runtime.keep_checkpoints=true",
                      "train.per_device_train_batch_size=4")
    assert _fingerprint(smaller) != base_fingerprint
    run_stages(smaller, "train")
    assert _steps_trained(smaller) == 24, "batch 4 trains both epochs from scratch"

    shorter = _config(tmp_path, tiny_corpus, tiny_checkpoint, "runtime.keep_checkpoints=true",
                      "tokenize.max_length=8")
    run_stages(shorter, "tokenize")  # the same training settings, other (truncated) data
    assert _fingerprint(shorter) != base_fingerprint
    run_stages(shorter, "train")
    assert _steps_trained(shorter) == 12, "other data trains both epochs from scratch"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-6"], \
        "the interrupted run's checkpoints are left as they were, for that run to resume"


def test_a_diverged_loss_fails_the_stage_and_its_mlflow_run(tmp_path, tiny_corpus,
                                                            tiny_checkpoint):
    cfg = _config(tmp_path, tiny_corpus, tiny_checkpoint, "train.learning_rate=1e30")
    run_stages(cfg, "download", "tokenize")
    with pytest.raises(NonFiniteLossError, match=r"^training loss is \S+ at step \d+ of 12: "):
        run_stages(cfg, "train")
    assert issubclass(NonFiniteLossError, PipelineError), "the stage prints it as one line"
    run = _latest_run(cfg)
    assert run.info.status == "FAILED"
    assert all(math.isfinite(value) for value in run.data.metrics.values())
    assert not Path(cfg.paths.model_dir).exists()


@pytest.fixture
def skewed_corpus(tmp_path) -> Path:
    """95/5: 57 negative and 3 positive training rows; the test split 19 and 1."""
    rows = sentiment_rows(200, 11)
    negative = [r for r in rows if r["label"] == "negative"]
    positive = [r for r in rows if r["label"] == "positive"]
    splits = {"train": negative[:57] + positive[:3],
              "validation": negative[57:73] + positive[3:7],
              "test": negative[73:92] + positive[7:8]}
    for split, split_rows in splits.items():
        write_jsonl(tmp_path / "skewed" / f"{split}.jsonl",
                    [{**r, "sentence": f"{split} {r['sentence']}"} for r in split_rows])
    return tmp_path / "skewed"


def test_skewed_labels_train_balanced_and_the_report_shows_each_class(
        tmp_path, skewed_corpus, tiny_checkpoint, caplog):
    cfg = _config(tmp_path, skewed_corpus, tiny_checkpoint, "train.class_weights=balanced")
    with caplog.at_level(logging.INFO, logger="pipeline.training"):
        run_stages(cfg, "download", "tokenize", "train", "evaluate", "report")
    assert ("class weights (balanced, from 60 training examples): negative 0.5263, positive 10"
            in caplog.text)
    metrics = json.loads(Path(cfg.paths.metrics_path).read_text())
    assert set(metrics["test"]) == {"accuracy", "f1", "macro_f1", "mcc", "examples"}
    report = (Path(cfg.paths.report_dir) / "report.md").read_text()
    assert "| class weights | balanced |" in report
    assert "Per class on **test**:" in report
    assert "| class | examples | predicted | precision | recall | F1 |" in report
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:3] for line in
            report.splitlines() if line.startswith(("| negative |", "| positive |"))}
    predictions = [json.loads(line) for line in
                   (Path(cfg.paths.predictions_dir) / "test.jsonl").read_text().splitlines()]
    for name in ("negative", "positive"):
        assert rows[name] == [str(sum(p["gold"] == name for p in predictions)),
                              str(sum(p["label"] == name for p in predictions))], name
    assert rows["positive"][0] == "1"
    card = (Path(cfg.paths.release_dir) / "README.md").read_text()
    assert "| class | examples | predicted | precision | recall | F1 |" in card
