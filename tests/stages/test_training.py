"""Training behaviour the stage relies on: resuming, strategies and heads, device choice,
stopping on a diverged loss, class weights."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import pytest
from conftest import sentiment_rows, write_jsonl
from transformers import TrainerCallback

from pipeline.errors import ConfigError
from pipeline.preparation import prepare_and_save
from pipeline.tokenization import tokenize_dataset
from pipeline.training import (
    NonFiniteLossError,
    checkpoint_problem,
    resolve_precision,
    train_model,
)
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
           log_to_mlflow=False, strategy="finetune", callbacks=(), runtime=None, **settings):
    cfg = config_section("train", [f"strategy={strategy}"], **{
        "num_train_epochs": epochs, "per_device_train_batch_size": 8, "logging_steps": 1,
        "learning_rate": 1e-3, **settings})
    runtime = config_section("runtime", keep_checkpoints=keep, **(runtime or {}))
    return train_model(cfg, head or config_section("head"), runtime, seed=0,
                       main_metric="accuracy", metrics=None,
                       pretrained_dir=str(checkpoint), tokenized_dir=str(tokenized),
                       output_dir=str(tmp_path / f"model{epochs}"),
                       history_path=str(tmp_path / "history.json"),
                       work_dir=str(tmp_path / "work"), callbacks=[counter, *callbacks],
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


@pytest.mark.parametrize("native", [True, False])
def test_precision_follows_the_hardware(monkeypatch, caplog, native):
    """auto picks bf16 only on a CPU that computes it natively; elsewhere oneDNN would emulate
    it, slower than fp32. The decision comes from the CPU found, and says why."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    device, precision, why = resolve_precision("auto")
    assert (device, precision) == ("cpu", "bf16" if native else "fp32")
    assert ("has native bf16" if native else "no native bf16") in why
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA GPU"):
        resolve_precision("fp16")
    with caplog.at_level("WARNING"):
        assert resolve_precision("bf16")[1] == "bf16"
    assert ("emulated" in caplog.text) is not native


@pytest.mark.parametrize("bf16", [True, False])
def test_precision_on_a_gpu_prefers_bf16_then_fp16(monkeypatch, bf16):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto")[:2] == ("cuda", "bf16" if bf16 else "fp16")
    if not bf16:
        with pytest.raises(ConfigError, match="this GPU has no bf16 support"):
            resolve_precision("bf16")


class Snapshots(TrainerCallback):
    """The weights at the start and end of each ``Trainer.train`` call (each phase)."""

    def __init__(self):
        self.phases: list[tuple[dict, dict]] = []
        self.steps = 0

    @staticmethod
    def _copy(model):
        # On the CPU, where a saved model loads, also when training ran on a GPU.
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

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


class OptimizerGroups(TrainerCallback):
    """Each parameter's starting rate and weight decay in the optimizer Trainer built."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.first_rate = optimizer.param_groups[0]["initial_lr"]
        self.rates = {names[id(p)]: (group["initial_lr"], group["weight_decay"])
                      for group in optimizer.param_groups for p in group["params"]}


def test_layer_lr_decay_trains_lower_layers_slower_and_resumes(tmp_path, tokenized,
                                                               tiny_checkpoint):
    groups, resumed = OptimizerGroups(), CountSteps()
    _train(tmp_path, tokenized, tiny_checkpoint, epochs=1, keep=True, counter=CountSteps(),
           callbacks=[groups], layer_lr_decay=0.5, weight_decay=0.01)
    expected = {"classifier.": 1e-3, "bert.pooler.": 1e-3, "bert.encoder.layer.1.": 5e-4,
                "bert.encoder.layer.0.": 2.5e-4, "bert.embeddings.": 1.25e-4}
    assert set(groups.rates) == groups.trainable, "each trainable weight in one group"
    for name, (rate, decay) in groups.rates.items():
        prefix, = [p for p in expected if name.startswith(p)]
        assert rate == pytest.approx(expected[prefix]), name
        assert decay == (0.0 if name.endswith("bias") or "LayerNorm" in name else 0.01), name
    assert groups.first_rate == 1e-3, "the logged learning_rate is the head's"
    # The checkpoint's optimizer state has the same groups, so the run continues from it.
    _train(tmp_path, tokenized, tiny_checkpoint, epochs=2, keep=False, counter=resumed,
           layer_lr_decay=0.5, weight_decay=0.01)
    assert resumed.steps == 6


def test_two_phase_logs_both_phases_in_one_mlflow_run(tmp_path, tokenized, tiny_checkpoint):
    import mlflow

    with mlflow.start_run() as run:
        _train(tmp_path, tokenized, tiny_checkpoint, epochs=1, keep=False, counter=CountSteps(),
               strategy="two_phase", head_epochs=1, log_to_mlflow=True)
    client = mlflow.MlflowClient()
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 13))
    epochs = client.get_metric_history(run.info.run_id, "validation_loss")
    assert sorted(m.step for m in epochs) == [6, 12]
    assert max(m.value for m in client.get_metric_history(run.info.run_id, "epoch")) == 2.0
    params = client.get_run(run.info.run_id).data.params  # logged once, no clash
    assert params["trainer.effective_batch_size"] == "8" and "learning_rate" not in params


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


def test_a_diverging_loss_stops_training_at_its_first_non_finite_step(tmp_path, tokenized,
                                                                      tiny_checkpoint):
    counter = CountSteps()
    # Adam moves every weight by about the learning rate: 1e30 overflows within a step or two.
    with pytest.raises(NonFiniteLossError, match=r"^training loss is (nan|inf|-inf) at step \d+ "
                                                 r"of 18: training diverged and stopped there; "
                                                 r"lower train.learning_rate") as error:
        _train(tmp_path, tokenized, tiny_checkpoint, epochs=3, keep=True, counter=counter,
               learning_rate=1e30)
    step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert step == counter.steps + 1, "names the step whose loss was not finite"
    assert step < 6, "stopped at once, not after the first epoch, let alone all 18 steps"
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "work").glob("checkpoint-*")), "no NaN weights were saved"


def test_two_phase_names_the_phase_and_its_learning_rate_key(tmp_path, tokenized,
                                                             tiny_checkpoint):
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ of 6 \(phase head\): .*lower "
                                                 r"train.head_learning_rate"):
        _train(tmp_path, tokenized, tiny_checkpoint, epochs=1, keep=False, counter=CountSteps(),
               strategy="two_phase", head_epochs=1, head_learning_rate=1e30)


class InfiniteGradient(TrainerCallback):
    """Makes the classifier's gradient infinite: the first step's loss is still finite but its
    gradient norm is not; the weights it updates become NaN, so the second step's loss is."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.classifier.weight.register_hook(lambda grad: grad * math.inf)


def test_non_finite_values_never_reach_mlflow(tmp_path, tokenized, tiny_checkpoint):
    import mlflow

    with mlflow.start_run() as run, pytest.raises(NonFiniteLossError, match="at step 2 "):
        _train(tmp_path, tokenized, tiny_checkpoint, epochs=1, keep=False, counter=CountSteps(),
               callbacks=[InfiniteGradient()], log_to_mlflow=True)
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]
    assert client.get_metric_history(run.info.run_id, "grad_norm") == [], \
        "the infinite gradient norm of step 1 is left out"
    for name, value in client.get_run(run.info.run_id).data.metrics.items():
        assert math.isfinite(value) and abs(value) < 1e300, name


@pytest.mark.parametrize("damage", ["truncate_weights", "delete_trainer_state"])
def test_resume_skips_a_checkpoint_a_crash_left_incomplete(tmp_path, tokenized, tiny_checkpoint,
                                                           damage, caplog):
    _train(tmp_path, tokenized, tiny_checkpoint, epochs=2, keep=True, counter=CountSteps())
    newest = tmp_path / "work" / "checkpoint-12"
    if damage == "truncate_weights":  # the process died while writing the weights
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    else:  # ... or before Trainer wrote trainer_state.json, its last file
        (newest / "trainer_state.json").unlink()
    second = CountSteps()
    with caplog.at_level(logging.WARNING, logger="pipeline.training"):
        _train(tmp_path, tokenized, tiny_checkpoint, epochs=2, keep=True, counter=second)
    assert second.steps == 6, "resumed from checkpoint-6: only the second epoch trains again"
    assert f"skipping incomplete checkpoint {newest}: " in caplog.text
    assert ("(truncated)" if damage == "truncate_weights" else "trainer_state.json is missing") \
        in caplog.text
    assert checkpoint_problem(newest) is None, "the broken one was deleted, then saved anew"
    assert (tmp_path / "model2" / "model.safetensors").is_file()


@pytest.mark.parametrize("phase", ["head", "full"])
def test_two_phase_resume_skips_an_incomplete_checkpoint_in_either_phase(
        tmp_path, tokenized, tiny_checkpoint, phase):
    _train(tmp_path, tokenized, tiny_checkpoint, epochs=1, keep=True, counter=CountSteps(),
           strategy="two_phase", head_epochs=2)
    work = tmp_path / "work"
    if phase == "head":  # died saving phase 1's last checkpoint, before phase 2 began
        import shutil

        shutil.rmtree(work / "full")
        broken, expected_steps = work / "head" / "checkpoint-12", 12
    else:  # died saving phase 2's first checkpoint
        broken, expected_steps = work / "full" / "checkpoint-6", 6
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    second = CountSteps()
    result = _train(tmp_path, tokenized, tiny_checkpoint, epochs=1, keep=False, counter=second,
                    strategy="two_phase", head_epochs=2)
    assert second.steps == expected_steps
    assert {entry["phase"] for entry in result.history} == {"head", "full"}
    assert max(entry["step"] for entry in result.history) == 18


class BestAtFirstEpoch(TrainerCallback):
    """Makes epoch 1 the best evaluation, so the best checkpoint is never the latest."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_accuracy"] = 1.0 if state.global_step == 6 else 0.0


class CheckpointsAtSave(TrainerCallback):
    def __init__(self):
        self.seen: list[tuple[int, list[str]]] = []

    def on_save(self, args, state, control, **kwargs):
        names = sorted(p.name for p in Path(args.output_dir).glob("checkpoint-*"))
        self.seen.append((state.global_step, names))


def test_save_total_limit_one_keeps_the_best_and_the_latest_checkpoint(tmp_path, tokenized,
                                                                       tiny_checkpoint):
    saves = CheckpointsAtSave()
    _train(tmp_path, tokenized, tiny_checkpoint, epochs=3, keep=True, counter=CountSteps(),
           callbacks=[BestAtFirstEpoch(), saves], runtime={"save_total_limit": 1})
    # While training, the latest (to resume from) and the best (to end on) both stay.
    assert saves.seen == [(6, ["checkpoint-6"]), (12, ["checkpoint-12", "checkpoint-6"]),
                          (18, ["checkpoint-18", "checkpoint-6"])]
    # Once training ended, nothing needs resuming: transformers keeps the best alone.
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["checkpoint-6"]


@pytest.fixture
def skewed(tmp_path, tiny_checkpoint):
    """Tokenized 95/5 data: 57 negative and 3 positive training rows."""
    rows = sentiment_rows(120, 7)
    negative = [r for r in rows if r["label"] == "negative"][:57]
    positive = [r for r in rows if r["label"] == "positive"][:3]
    write_jsonl(tmp_path / "corpus" / "train.jsonl", negative + positive)
    for split in ("validation", "test"):
        write_jsonl(tmp_path / "corpus" / f"{split}.jsonl",
                    [{**r, "sentence": f"{split} {r['sentence']}"} for r in rows[:16]])
    cfg = config_section("dataset", name="skewed", source="local",
                         path=str(tmp_path / "corpus"), format="jsonl", text_column="sentence")
    prepare_and_save(cfg, 0, str(tmp_path / "raw"))
    tokenize_dataset(str(tmp_path / "raw"), str(tiny_checkpoint), str(tmp_path / "tok"), 32)
    return tmp_path / "tok"


def test_balanced_class_weights_weight_the_loss_of_a_skewed_split(tmp_path, skewed,
                                                                  tiny_checkpoint):
    import datasets
    import torch
    from transformers import DataCollatorWithPadding

    from pipeline.inference import load_classifier
    from pipeline.training import Phase, _trainer, weighted_cross_entropy

    unweighted = _train(tmp_path / "a", skewed, tiny_checkpoint, epochs=1, keep=False,
                        counter=CountSteps())
    weighted = _train(tmp_path / "b", skewed, tiny_checkpoint, epochs=1, keep=False,
                      counter=CountSteps(), class_weights="balanced")
    assert unweighted.class_weights is None
    assert weighted.class_weights == pytest.approx({"negative": 60 / (2 * 57),
                                                    "positive": 60 / (2 * 3)})
    # One batch of both classes through one model (trained on the skewed data, so it misses
    # positives): Trainer's loss without weights, and with the balanced weights.
    model, tokenizer = load_classifier(str(tmp_path / "a" / "model1"))
    model.eval()
    train = datasets.load_from_disk(str(skewed))["train"]
    labels = train["labels"]
    rows = [labels.index(0), labels.index(1), len(labels) - 1 - labels[::-1].index(0)]
    batch = dict(DataCollatorWithPadding(tokenizer)([train[i] for i in rows]))
    losses = {}
    for name, weights in (("none", None), ("balanced", list(weighted.class_weights.values()))):
        trainer = _trainer(config_section("train"), config_section("runtime"),
                           Phase("finetune", False, 1e-3, 1.0), model, tokenizer, train, train,
                           str(tmp_path / "w"), "cpu", "fp32", 0, "accuracy", str(tmp_path / "m"),
                           None, [], class_weights=weights)
        with torch.no_grad():
            losses[name] = trainer.compute_loss(model, dict(batch)).item()
    with torch.no_grad():
        outputs = model(**batch)
        expected = weighted_cross_entropy(outputs.logits, batch["labels"],
                                          torch.tensor(list(weighted.class_weights.values())))
    assert losses["none"] == pytest.approx(outputs.loss.item()), "no weights: the model's loss"
    assert losses["balanced"] == pytest.approx(expected.item())
    assert losses["balanced"] != pytest.approx(losses["none"], rel=0.05)


def test_balanced_class_weights_are_refused_for_regression(tmp_path, tiny_checkpoint):
    rows = [{"sentence": f"the film was {i}", "label": i / 10} for i in range(24)]
    for split in ("train", "validation"):
        write_jsonl(tmp_path / "corpus" / f"{split}.jsonl",
                    [{**r, "sentence": f"{split} {r['sentence']}"} for r in rows])
    cfg = config_section("dataset", name="scores", source="local", path=str(tmp_path / "corpus"),
                         format="jsonl", text_column="sentence", task="regression",
                         main_metric="pearson")
    prepare_and_save(cfg, 0, str(tmp_path / "raw"))
    tokenize_dataset(str(tmp_path / "raw"), str(tiny_checkpoint), str(tmp_path / "tok"), 32)
    train = config_section("train", class_weights="balanced")
    with pytest.raises(ConfigError, match=r"^train.class_weights=balanced weights the classes of "
                                          r"a classification task; .* holds regression scores"):
        train_model(train, config_section("head"), config_section("runtime"), seed=0,
                    main_metric="pearson", metrics=None, pretrained_dir=str(tiny_checkpoint),
                    tokenized_dir=str(tmp_path / "tok"), output_dir=str(tmp_path / "model"),
                    history_path=str(tmp_path / "history.json"), work_dir=str(tmp_path / "w"))


def test_two_phase_resumed_in_phase_two_keeps_phase_one_whole_with_one_checkpoint_kept(
        tmp_path, tokenized, tiny_checkpoint):
    # save_total_limit=1 leaves each phase its best checkpoint alone once it ends, here epoch 1
    # of 2: phase 1's log and step count must still be those of its end, not of that epoch.
    settings = dict(strategy="two_phase", head_epochs=2, callbacks=[BestAtFirstEpoch()],
                    runtime={"save_total_limit": 1})
    full = _train(tmp_path, tokenized, tiny_checkpoint, epochs=2, keep=True,
                  counter=CountSteps(), **settings)
    assert sorted(p.name for p in (tmp_path / "work" / "full").glob("checkpoint-*")) == \
        ["checkpoint-6"], "phase 2 looks interrupted after its first epoch"
    second = CountSteps()
    resumed = _train(tmp_path, tokenized, tiny_checkpoint, epochs=2, keep=False, counter=second,
                     **settings)
    assert second.steps == 6
    steps = [(entry["phase"], entry["step"]) for entry in resumed.history if "loss" in entry]
    assert steps == [(entry["phase"], entry["step"]) for entry in full.history
                     if "loss" in entry]
    assert steps[-1] == ("full", 24)


def test_length_grouped_batches_pad_less_and_keep_validation_metrics_true(tmp_path, tokenized,
                                                                          tiny_checkpoint):
    """train.sampling=group_by_length batches rows of similar length: the logged padding share
    drops below random batching's, every training row is still seen once per epoch, and the
    validation metrics (computed on rows sorted by length) match a plain pass in row order."""
    import datasets
    import numpy as np
    import torch

    from pipeline.inference import load_classifier

    shares, results = {}, {}
    for sampling in ("random", "group_by_length"):
        results[sampling] = _train(tmp_path / sampling, tokenized, tiny_checkpoint, epochs=1,
                                   keep=False, counter=CountSteps(), sampling=sampling,
                                   # 48 rows: Trainer groups within 4 mega-batches at least
                                   per_device_train_batch_size=2)
        end = results[sampling].history[-1]
        shares[sampling] = end["train_padding_share"]
        train = datasets.load_from_disk(str(tokenized))["train"]
        real_tokens = sum(len(ids) for ids in train["input_ids"])
        assert end["train_tokens_per_second"] * end["train_runtime"] == \
            pytest.approx(real_tokens, rel=0.02)
    assert 0 <= shares["group_by_length"] < shares["random"], shares

    model, _ = load_classifier(str(tmp_path / "group_by_length" / "model1"))
    validation = datasets.load_from_disk(str(tokenized))["validation"]
    with torch.inference_mode():
        predicted = [int(model(input_ids=torch.tensor([row["input_ids"]]),
                               attention_mask=torch.tensor([row["attention_mask"]]))
                         .logits.argmax()) for row in validation]
    accuracy = float(np.mean(np.asarray(predicted) == np.asarray(validation["labels"])))
    assert results["group_by_length"].eval_metrics["accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize("capability, tf32", [((9, 0), True), ((8, 0), True), ((7, 5), False)])
def test_a_gpu_gets_tf32_on_ampere_and_newer_and_collating_workers(monkeypatch, capability,
                                                                   tf32):
    """Only the capability check is mocked (CI has no GPU); the CPU keeps one process, no pinned
    memory, no TF32."""
    import torch

    from pipeline.training import hardware_arguments

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    gpu = hardware_arguments("cuda", "bf16")
    assert gpu["tf32"] is tf32 and gpu["bf16"] and not gpu["use_cpu"]
    assert gpu["dataloader_pin_memory"] and gpu["dataloader_num_workers"] >= 1 or \
        (os.cpu_count() or 1) < 2
    assert hardware_arguments("cuda", "fp32")["tf32"] is False, "fp32 asked for: full fp32"
    cpu = hardware_arguments("cpu", "bf16")
    assert cpu["use_cpu"] and cpu["bf16"] and not cpu["tf32"]
    assert cpu["dataloader_num_workers"] == 0 and not cpu["dataloader_pin_memory"]
