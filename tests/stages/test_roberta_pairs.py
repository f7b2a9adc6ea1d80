"""A RoBERTa-style checkpoint (byte-level BPE, no token_type_ids) on sentence pairs, both heads."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf

from pipeline.config import load_config
from pipeline.inference import Classifier
from support import (
    assert_same_predictions,
    compose_params,
    run_stages,
    tiny_overrides,
    write_glue_fixture,
)


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide RoBERTa with a byte-level BPE tokenizer trained on the fixture words."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_roberta")
    words = ["the", "film", "plot", "cast", "story", "was", "is", "really", "quite", "very", "and",
             "with", "a", "great", "dull", "charming", "awful", "superb", "boring", "train",
             "validation", "test"] + [str(i) for i in range(30)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(words)] * 10, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizerFast(vocab_file=str(folder / "vocab.json"),
                                     merges_file=str(folder / "merges.txt"), model_max_length=64)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id)
    RobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("head", ["auto", "pooled"])
def test_roberta_pairs_train_without_token_type_ids(head, tmp_path, tiny_roberta, tiny_corpus,
                                                     tiny_checkpoint):
    dataset = compose_params(["dataset=glue_rte"])["dataset"]
    fixture = write_glue_fixture(tmp_path / "source", dataset)
    overrides = [o for o in tiny_overrides(tiny_corpus, tiny_checkpoint)
                 if not o.startswith(("dataset", "model", "train.num_train_epochs"))]
    overrides += ["dataset=glue_rte", "dataset.source=local", f"dataset.path={fixture}",
                  "dataset.revision=null", "model.name=tiny_roberta", "model.source=local",
                  f"model.path={tiny_roberta}", "model.revision=null", f"head={head}",
                  "tracking.log_model=false"]
    params = compose_params(overrides)
    for key, value in params["paths"].items():
        params["paths"][key] = str(tmp_path / value)
    cfg = load_config(OmegaConf.create(params))
    run_stages(cfg, "download", "tokenize", "train", "evaluate")

    tokenized = datasets.load_from_disk(cfg.paths.tokenized_dir)["train"]
    assert set(tokenized.column_names) == {"input_ids", "attention_mask", "labels"}
    config = json.loads((Path(cfg.paths.model_dir) / "config.json").read_text())
    assert config["model_type"] == ("pooled_classifier" if head == "pooled" else "roberta")
    metrics = json.loads(Path(cfg.paths.metrics_path).read_text())
    assert set(metrics["validation"]) == {"accuracy", "examples"}
    written = [json.loads(line) for line in
               (Path(cfg.paths.predictions_dir) / "validation.jsonl").read_text().splitlines()]
    inputs = [{"text": row["text"], "text_pair": row["text_pair"]} for row in written]
    assert_same_predictions(list(Classifier(cfg.paths.model_dir).predict(inputs)), written)
