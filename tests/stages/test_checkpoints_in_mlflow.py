"""Checkpoints in MLflow: which ones the train stage logs (tracking.log_checkpoints), that none
of their files is a pickle, and train.resume_from=runs:/<id>/checkpoints/<name> continuing a run
in another copy of the project (its own folders, the same tracking store) to the very weights
of the run that was never interrupted."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf
from transformers import TrainerCallback

from pipeline import training
from pipeline.checkpoints import FINGERPRINT_TAG
from pipeline.config import load_config
from pipeline.errors import ConfigError
from support import compose_params, paths_under, run_stages, tiny_overrides

PICKLES = (".pt", ".pth", ".bin", ".pkl", ".pickle")
# What a checkpoint must hold to resume (the tokenizer files come along).
RESUMABLE = {"config.json", "model.safetensors", "optimizer.safetensors", "scheduler.json",
             "rng_state.safetensors", "trainer_state.json", "tokenizer.json"}


class BestAtFirstEpoch(TrainerCallback):
    """Epoch 1's evaluation is the best, so the best checkpoint is not the latest."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_accuracy"] = 1.0 if state.global_step == 6 else 0.0


class BestAtLastEpoch(TrainerCallback):
    """Every evaluation beats the one before, so the model is what the last epoch trained."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_accuracy"] = state.global_step / 100


def _config(root: Path, corpus: Path, checkpoint: Path, *overrides: str):
    return load_config(OmegaConf.create(compose_params(
        [*tiny_overrides(corpus, checkpoint), *paths_under(root), *overrides])))


def _with_callbacks(monkeypatch, *callbacks) -> None:
    monkeypatch.setattr(training, "train_model",
                        functools.partial(training.train_model, callbacks=list(callbacks)))


def _latest_run(cfg):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    return client.search_runs([experiment.experiment_id], order_by=["attribute.start_time DESC"],
                              max_results=1)[0]


def _artifacts(run_id: str, path: str) -> list[str]:
    """Every file under ``path`` in the run's artifacts, relative to the run."""
    client, files, folders = mlflow.MlflowClient(), [], [path]
    while folders:
        for item in client.list_artifacts(run_id, folders.pop()):
            (folders if item.is_dir else files).append(item.path)
    return sorted(files)


@pytest.mark.parametrize("mode, logged", [("none", []), ("best", ["checkpoint-6"]),
                                          ("all", ["checkpoint-12", "checkpoint-6"])])
def test_log_checkpoints_logs_none_the_best_or_every_checkpoint_and_no_pickle(
        tmp_path, tiny_corpus, tiny_checkpoint, monkeypatch, mode, logged):
    cfg = _config(tmp_path, tiny_corpus, tiny_checkpoint, f"tracking.log_checkpoints={mode}",
                  "runtime.keep_checkpoints=true")
    _with_callbacks(monkeypatch, BestAtFirstEpoch())
    run_stages(cfg, "download", "tokenize", "train")
    files = _artifacts(_latest_run(cfg).info.run_id, "checkpoints")
    assert sorted({f.split("/")[1] for f in files}) == logged
    for name in logged:
        assert {Path(f).name for f in files if f.split("/")[1] == name} >= RESUMABLE, name
    assert not [f for f in files if f.endswith(PICKLES)]
    on_disk = [p for p in Path(cfg.paths.trainer_checkpoints_dir).rglob("*") if p.is_file()]
    assert {p.parent.name for p in on_disk} == {"checkpoint-6", "checkpoint-12"}
    assert not [p for p in on_disk if p.suffix in PICKLES], "no pickle on disk either"


@pytest.mark.parametrize("strategy, epochs, name, best", [
    ("finetune", 2, "checkpoint-6", BestAtLastEpoch),
    # The run ends on its best checkpoint, an earlier one than the checkpoint resumed from.
    ("finetune", 3, "checkpoint-12", BestAtFirstEpoch),
    # Phase 2 resumed: phase 1's final state comes along, its weights are in the checkpoint.
    ("two_phase", 2, "full/checkpoint-6", BestAtLastEpoch),
])
def test_resume_from_a_logged_checkpoint_in_another_copy_gives_the_same_weights(
        tmp_path, tiny_corpus, tiny_checkpoint, monkeypatch, strategy, epochs, name, best):
    settings = [f"strategy={strategy}", f"train.num_train_epochs={epochs}",
                "tracking.log_checkpoints=all"]
    if strategy == "two_phase":
        settings += ["train.head_epochs=1", "train.head_learning_rate=1e-3"]
    _with_callbacks(monkeypatch, best())
    here = _config(tmp_path / "here", tiny_corpus, tiny_checkpoint, *settings)
    run_stages(here, "download", "tokenize", "train")
    uninterrupted = _latest_run(here)

    uri = f"runs:/{uninterrupted.info.run_id}/checkpoints/{name}"
    there = _config(tmp_path / "there", tiny_corpus, tiny_checkpoint, *settings,
                    f"train.resume_from='{uri}'")
    run_stages(there, "download", "tokenize", "train")
    resumed = _latest_run(there)
    assert resumed.info.run_id != uninterrupted.info.run_id
    assert resumed.data.params["train.resume_from"] == uri
    assert resumed.data.tags[FINGERPRINT_TAG] == uninterrupted.data.tags[FINGERPRINT_TAG]
    steps = mlflow.MlflowClient().get_metric_history(resumed.info.run_id, "loss")
    assert len(steps) == 6, "only the epoch after the checkpoint trained again"
    weights = "model.safetensors"
    assert (Path(there.paths.model_dir) / weights).read_bytes() == \
        (Path(here.paths.model_dir) / weights).read_bytes()
    assert not list(Path(there.paths.trainer_checkpoints_dir).iterdir()), "removed after success"


def test_resume_from_is_refused_for_another_training_or_a_wrong_name(tmp_path, tiny_corpus,
                                                                     tiny_checkpoint):
    cfg = _config(tmp_path, tiny_corpus, tiny_checkpoint)
    run_stages(cfg, "download", "tokenize")
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    other = client.create_run(client.create_experiment("elsewhere"),
                              tags={FINGERPRINT_TAG: "0123456789abcdef"})
    uri = f"runs:/{other.info.run_id}/checkpoints/checkpoint-6"
    with pytest.raises(ConfigError, match=rf"^train.resume_from={uri}: run "
                                          rf"{other.info.run_id} trained other data or settings "
                                          rf"\({FINGERPRINT_TAG} 0123456789abcdef, this "):
        run_stages(_config(tmp_path, tiny_corpus, tiny_checkpoint,
                           f"train.resume_from='{uri}'"), "train")
    uri = f"runs:/{other.info.run_id}/checkpoints/full/checkpoint-6"
    with pytest.raises(ConfigError, match=r"expected runs:/<run id>/checkpoints/"
                                          r"checkpoint-<step> for train.strategy's phases$"):
        run_stages(_config(tmp_path, tiny_corpus, tiny_checkpoint,
                           f"train.resume_from='{uri}'"), "train")
    assert not Path(cfg.paths.model_dir).exists()
