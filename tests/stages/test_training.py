"""Training behaviour the stage relies on: resuming, strategies and heads, device choice."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from pipeline.errors import ConfigError
from pipeline.preparation import prepare_and_save
from pipeline.tokenization import tokenize_dataset
from pipeline.training import resolve_precision, train_model
from support import config_section


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.fixture
def tokenized(tmp_path, tiny_corpus, tiny_checkpoint):
    cfg = config_section("dataset", name="tiny", source="local", path=str(tiny_corpus),
                         format="jsonl", text_column="sentence")
    prepare_and_save(cfg, 0, str(tmp_path / "raw"))
    tokenize_dataset(str(tmp_path / "raw"), str(tiny_checkpoint), str(tmp_path / "tok"), 32)
    return tmp_path / "tok"


def _train(tmp_path, tokenized, checkpoint, epochs, keep, counter, head=None,
           log_to_mlflow=False, strategy="finetune", **settings):
    cfg = config_section("train", [f"strategy={strategy}"], num_train_epochs=epochs,
                         per_device_train_batch_size=8, logging_steps=1, learning_rate=1e-3,
                         **settings)
    runtime = config_section("runtime", keep_checkpoints=keep)
    return train_model(cfg, head or config_section("head"), runtime, seed=0,
                       main_metric="accuracy", metrics=None,
                       pretrained_dir=str(checkpoint), tokenized_dir=str(tokenized),
                       output_dir=str(tmp_path / f"model{epochs}"),
                       history_path=str(tmp_path / "history.json"),
                       work_dir=str(tmp_path / "work"), callbacks=[counter],
                       log_to_mlflow=log_to_mlflow)


def test_interrupted_training_resumes_from_its_last_checkpoint(tmp_path, tokenized,
                                                               tiny_checkpoint):
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


class Snapshots(TrainerCallback):
    """The weights at the start and end of each ``Trainer.train`` call (each phase)."""

    def __init__(self):
        self.phases: list[tuple[dict, dict]] = []
        self.steps = 0

    @staticmethod
    def _copy(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._begin = self._copy(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.phases.append((self._begin, self._copy(model)))


def _changed(before: dict, after: dict, keys) -> list[str]:
    import torch

    return [k for k in keys if not torch.equal(before[k], after[k])]


def _body_and_head(snapshot: dict, head: list[str]) -> tuple[list[str], list[str]]:
    body = [k for k in snapshot if k not in head and "position_ids" not in k]
    return body, list(head)


def test_head_only_leaves_every_body_weight_bit_identical(tmp_path, tokenized, tiny_checkpoint):
    from safetensors.torch import load_file

    snapshots = Snapshots()
    result = _train(tmp_path, tokenized, tiny_checkpoint, epochs=2, keep=False,
                    counter=snapshots, strategy="head_only")
    assert result.head_parameters == ["classifier.weight", "classifier.bias"]
    (begin, end), = snapshots.phases
    body, head = _body_and_head(begin, result.head_parameters)
    assert not _changed(begin, end, body)
    assert _changed(begin, end, head) == head
    # The saved model's body is the pretrained checkpoint's, tensor for tensor.
    saved = load_file(str(tmp_path / "model2" / "model.safetensors"))
    pretrained = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert len(pretrained) > 10
    for key, tensor in pretrained.items():
        assert (saved[f"bert.{key}"] == tensor).all(), key


def test_two_phase_changes_the_body_only_in_phase_two(tmp_path, tokenized, tiny_checkpoint):
    snapshots = Snapshots()
    result = _train(tmp_path, tokenized, tiny_checkpoint, epochs=1, keep=False,
                    counter=snapshots, strategy="two_phase", head_epochs=1,
                    head_learning_rate=1e-2)
    (begin1, end1), (begin2, end2) = snapshots.phases
    body, head = _body_and_head(begin1, result.head_parameters)
    assert not _changed(begin1, end1, body), "phase 1 trains the head only"
    assert _changed(begin1, end1, head) == head
    assert not _changed(end1, begin2, list(begin1)), "phase 2 starts where phase 1 ended"
    assert len(_changed(begin2, end2, body)) > len(body) // 2, "phase 2 trains the body too"
    assert snapshots.steps == 12  # 6 steps a phase
    phases = [entry["phase"] for entry in result.history]
    assert phases[0] == "head" and phases[-1] == "full"
    steps = [entry["step"] for entry in result.history if "loss" in entry]
    assert steps == sorted(steps) and steps[-1] == 12, "phase 2 continues phase 1's steps"


def test_two_phase_interrupted_in_phase_two_resumes_there(tmp_path, tokenized, tiny_checkpoint):
    first, second = CountSteps(), CountSteps()
    _train(tmp_path, tokenized, tiny_checkpoint, epochs=1, keep=True, counter=first,
           strategy="two_phase", head_epochs=1)
    assert first.steps == 12
    result = _train(tmp_path, tokenized, tiny_checkpoint, epochs=2, keep=False, counter=second,
                    strategy="two_phase", head_epochs=1)
    assert second.steps == 6, "phase 1 is done and phase 2 had one of its two epochs"
    assert {entry["phase"] for entry in result.history} == {"head", "full"}
    assert max(entry["step"] for entry in result.history) == 18


def test_two_phase_logs_both_phases_in_one_mlflow_run(tmp_path, tokenized, tiny_checkpoint):
    import mlflow

    with mlflow.start_run() as run:
        _train(tmp_path, tokenized, tiny_checkpoint, epochs=1, keep=False, counter=CountSteps(),
               strategy="two_phase", head_epochs=1, log_to_mlflow=True)
    client = mlflow.MlflowClient()
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 13))
    epochs = client.get_metric_history(run.info.run_id, "eval_loss")
    assert sorted(m.step for m in epochs) == [6, 12]
    assert max(m.value for m in client.get_metric_history(run.info.run_id, "epoch")) == 2.0
    assert client.get_run(run.info.run_id).data.params["learning_rate"]  # logged once, no clash


def test_pooled_head_trains_saves_and_loads_like_any_model(tmp_path, tokenized, tiny_checkpoint):
    import datasets
    import torch
    from transformers import DataCollatorWithPadding

    from pipeline.inference import load_classifier

    snapshots = Snapshots()
    head = config_section("head", ["head=pooled"], pooling="mean", hidden_sizes=[16],
                          dropout=0.1)
    result = _train(tmp_path, tokenized, tiny_checkpoint, epochs=1, keep=False,
                    counter=snapshots, head=head, strategy="head_only")
    assert result.head_parameters == ["head.1.weight", "head.1.bias", "head.4.weight",
                                      "head.4.bias"]
    (begin, end), = snapshots.phases
    body, _ = _body_and_head(begin, result.head_parameters)
    assert not _changed(begin, end, body)
    model, tokenizer = load_classifier(str(tmp_path / "model1"))
    assert type(model).__name__ == "PooledClassifier"
    assert model.config.pooling == "mean" and model.config.hidden_sizes == [16]
    for key, tensor in end.items():
        assert torch.equal(model.state_dict()[key], tensor), key
    rows = datasets.load_from_disk(str(tokenized))["validation"].remove_columns("labels")
    batch = DataCollatorWithPadding(tokenizer)([rows[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (4, 2)
