"""Training behaviour the stage relies on: resuming, device choice."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from pipeline.config import DatasetConfig, TrainConfig
from pipeline.data import prepare_and_save
from pipeline.errors import ConfigError
from pipeline.tokenization import tokenize_dataset
from pipeline.training import resolve_precision, train_model


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.fixture
def tokenized(tmp_path, tiny_corpus, tiny_checkpoint):
    cfg = DatasetConfig(name="tiny", source="local", path=str(tiny_corpus), format="jsonl",
                        text_column="sentence")
    prepare_and_save(cfg, 0, str(tmp_path / "raw"))
    tokenize_dataset(str(tmp_path / "raw"), str(tiny_checkpoint), str(tmp_path / "tok"), 32)
    return tmp_path / "tok"


def _train(tmp_path, tokenized, checkpoint, epochs, keep, counter):
    cfg = TrainConfig(num_train_epochs=epochs, per_device_train_batch_size=8, logging_steps=1,
                      learning_rate=1e-3, keep_checkpoints=keep)
    return train_model(cfg, seed=0, main_metric="accuracy", checkpoint_dir=str(checkpoint),
                       tokenized_dir=str(tokenized), output_dir=str(tmp_path / f"model{epochs}"),
                       history_path=str(tmp_path / "history.json"),
                       work_dir=str(tmp_path / "work"), callbacks=[counter])


def test_interrupted_training_resumes_from_its_last_checkpoint(tmp_path, tokenized, tiny_checkpoint):
    first, second = CountSteps(), CountSteps()
    _train(tmp_path, tokenized, tiny_checkpoint, epochs=1, keep=True, counter=first)
    assert first.steps == 6  # 48 rows / batch 8
    assert list((tmp_path / "work").glob("checkpoint-*"))
    _train(tmp_path, tokenized, tiny_checkpoint, epochs=2, keep=False, counter=second)
    assert second.steps == 6, "the second run should only train the epoch it had not done"
    assert not (tmp_path / "work").exists(), "checkpoints are removed after success"
    assert (tmp_path / "model2" / "model.safetensors").is_file()


def test_precision_follows_the_hardware():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    assert resolve_precision("auto") == ("cpu", "fp32")
    with pytest.raises(ConfigError, match="train.precision=bf16 needs a CUDA GPU"):
        resolve_precision("bf16")
