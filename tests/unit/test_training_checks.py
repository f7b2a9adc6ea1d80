"""Pure parts of training: which checkpoint a run may resume from (its files complete, pickled
or not), and the class weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.checkpoints import save_optimizer, save_rng_state
from pipeline.errors import ConfigError
from pipeline.training import (
    balanced_class_weights,
    checkpoint_problem,
    last_complete_checkpoint,
    layer_rate_scales,
    weighted_cross_entropy,
)


def _checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint as the train stage's Trainer leaves it after a complete save (the files
    resuming reads)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    weights = {"classifier.weight": torch.randn(2, 32), "classifier.bias": torch.zeros(2)}
    save_file(weights, str(folder / "model.safetensors"))
    parameters = [torch.nn.Parameter(w) for w in weights.values()]
    optimizer = torch.optim.AdamW(parameters)
    sum(p.sum() for p in parameters).backward()
    optimizer.step()
    save_optimizer(optimizer.state_dict(), {"last_epoch": step}, folder)
    save_rng_state(folder, None)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step,
                                                           "log_history": []}))
    return folder


def test_a_complete_checkpoint_has_no_problem(tmp_path):
    assert checkpoint_problem(_checkpoint(tmp_path / "checkpoint-6", 6)) is None


def test_missing_or_broken_trainer_state_is_named(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoint-6", 6)
    (folder / "trainer_state.json").write_text('{"global_step": 6, "log_hi')
    assert checkpoint_problem(folder).startswith("trainer_state.json does not parse")
    (folder / "trainer_state.json").unlink()
    assert checkpoint_problem(folder) == "trainer_state.json is missing"


def test_truncated_or_missing_weights_are_named(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoint-6", 6)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    assert checkpoint_problem(folder) == (f"model.safetensors is {len(data) - 100} bytes, its "
                                          f"tensors need {len(data)} (truncated)")
    weights.write_bytes(data[:5])
    assert "too short for its header" in checkpoint_problem(folder)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert checkpoint_problem(folder).startswith("model.safetensors is unreadable")
    weights.unlink()
    assert checkpoint_problem(folder) == "model.safetensors is missing"


def test_missing_or_broken_optimizer_scheduler_or_random_state_is_named(tmp_path):
    # Before: only the weights and trainer_state.json were checked, so a truncated optimizer
    # state made every resume fail (or, missing, resume with a fresh optimizer).
    folder = _checkpoint(tmp_path / "checkpoint-6", 6)
    optimizer = folder / "optimizer.safetensors"
    data = optimizer.read_bytes()
    optimizer.write_bytes(data[:-8])
    assert checkpoint_problem(folder) == (f"optimizer.safetensors is {len(data) - 8} bytes, its "
                                          f"tensors need {len(data)} (truncated)")
    optimizer.unlink()
    assert checkpoint_problem(folder) == "optimizer.safetensors is missing"
    folder = _checkpoint(tmp_path / "checkpoint-12", 12)
    (folder / "scheduler.json").write_text('{"last_ep')
    assert checkpoint_problem(folder).startswith("scheduler.json does not parse")
    (folder / "scheduler.json").unlink()
    assert checkpoint_problem(folder) == "scheduler.json is missing"
    folder = _checkpoint(tmp_path / "checkpoint-18", 18)
    (folder / "rng_state.safetensors").write_bytes(b"\x00" * 4)
    assert "rng_state.safetensors is 4 bytes" in checkpoint_problem(folder)


def test_a_checkpoint_pickled_by_an_older_version_is_still_resumable(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoint-6", 6)
    for name in ("optimizer.safetensors", "scheduler.json", "rng_state.safetensors"):
        (folder / name).unlink()
    (folder / "optimizer.pt").write_bytes(b"Trainer reads it with weights_only=True")
    assert checkpoint_problem(folder) is None


def test_every_shard_of_sharded_weights_is_checked(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoint-6", 6)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "classifier.weight": "model-00001-of-00002.safetensors",
        "classifier.bias": "model-00002-of-00002.safetensors"}}))
    assert checkpoint_problem(folder) == "model-00002-of-00002.safetensors is missing"


def test_resume_point_is_the_newest_complete_checkpoint_and_broken_ones_go(tmp_path, caplog):
    _checkpoint(tmp_path / "checkpoint-6", 6)
    _checkpoint(tmp_path / "checkpoint-12", 12)
    (tmp_path / "checkpoint-18").mkdir()  # the crash hit before trainer_state.json was written
    (tmp_path / "checkpoint-18" / "model.safetensors").write_bytes(b"\x00" * 10)
    # Numeric order: checkpoint-6 sorts after checkpoint-18 as text.
    with caplog.at_level(logging.WARNING, logger="pipeline.training"):
        assert last_complete_checkpoint(tmp_path, discard=False) == str(tmp_path / "checkpoint-12")
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-18" in caplog.text
    assert "trainer_state.json is missing" in caplog.text
    assert (tmp_path / "checkpoint-18").is_dir(), "only the process that discards deletes"
    assert last_complete_checkpoint(tmp_path, discard=True) == str(tmp_path / "checkpoint-12")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-6"]
    assert last_complete_checkpoint(tmp_path / "absent", discard=True) is None


def test_balanced_weights_give_each_class_the_same_total_weight():
    labels = [0] * 57 + [1] * 3
    weights = balanced_class_weights(labels, 2)
    assert weights == pytest.approx([60 / (2 * 57), 60 / (2 * 3)])
    assert weights[0] * 57 == pytest.approx(weights[1] * 3)
    # A class absent from the training split is never a target: its weight is never used.
    assert balanced_class_weights([0, 0, 2], 3) == pytest.approx([0.5, 0.0, 1.0])


def test_weighted_cross_entropy_weights_each_example_by_its_gold_class():
    import torch

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 1.5]])
    labels = torch.tensor([0, 1, 1])
    weights = torch.tensor([0.5, 3.0])
    per_example = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (per_example * weights[labels]).sum() / weights[labels].sum()
    assert weighted_cross_entropy(logits, labels, weights).item() == pytest.approx(
        expected.item())
    assert weighted_cross_entropy(logits, labels, torch.ones(2)).item() == pytest.approx(
        per_example.mean().item())


@pytest.mark.parametrize("family", ["bert", "distilbert", "pooled"])
def test_layer_rate_decay_slows_each_layer_below_the_head_by_one_factor(family):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    from pipeline.heads import PooledClassifier, PooledClassifierConfig

    bert = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=32)
    if family == "bert":
        model = BertForSequenceClassification(bert)
    elif family == "pooled":  # our head around a BERT body: body.encoder.layer.N
        model = PooledClassifier(PooledClassifierConfig(
            body=bert.to_dict(), pooling="mean", hidden_sizes=[8], num_labels=2))
    else:
        model = DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=50, dim=16, n_layers=3, n_heads=2, hidden_dim=32))
    model.get_input_embeddings().weight.requires_grad_(False)
    scales = layer_rate_scales(model, 0.5)
    assert set(scales) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, scale in scales.items():
        if ".layer.2." in name:
            assert scale == 0.5, name  # the top of 3 layers
        elif ".layer.0." in name:
            assert scale == 0.125, name
        elif ".embeddings." in name:
            assert scale == 0.0625, name
        elif name.startswith(("classifier.", "pre_classifier.", "bert.pooler.", "head.",
                              "body.pooler.")):
            assert scale == 1, name
        else:
            assert ".layer.1." in name and scale == 0.25, name


def test_layer_rate_decay_leaves_a_frozen_body_out_and_names_a_model_without_layers():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32))
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("classifier."))
    # The head phase of two_phase: only the head trains, at the full rate.
    assert layer_rate_scales(model, 0.5) == {"classifier.weight": 1, "classifier.bias": 1}
    with pytest.raises(ConfigError, match=r"train.layer_lr_decay=0.9 needs an encoder of "
                                          r"numbered layers .* Linear has none"):
        layer_rate_scales(torch.nn.Linear(4, 2), 0.9)
