"""Fixtures that need no download: a tiny BERT checkpoint, tiny corpora, isolated tracking."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

POSITIVE = ["great", "wonderful", "moving", "brilliant", "charming", "superb", "delightful"]
NEGATIVE = ["dull", "awful", "boring", "clumsy", "tedious", "dreadful", "lifeless"]
SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the script", "the ending"]
EXTRA = ["and", "with", "a", "very", "really", "quite", "story", "cast", "was", "is"]


def sentiment_rows(count: int, seed: int) -> list[dict]:
    """Short two-class sentences, deterministic for a seed (a stand-in for SST-2)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        filler = " ".join(rng.choice(EXTRA) for _ in range(rng.randint(0, 6)))
        rows.append({"sentence": f"{rng.choice(SUBJECTS)} was {word} {filler} {i}".strip(),
                     "label": ["negative", "positive"][label]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A folder with train/validation/test jsonl splits of labelled sentences."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    for split, count, seed in (("train", 48, 1), ("validation", 16, 2), ("test", 16, 3)):
        rows = sentiment_rows(count, seed)
        for row in rows:
            row["sentence"] = f"{split} {row['sentence']}"  # no text shared between splits
        write_jsonl(root / f"{split}.jsonl", rows)
    return root


def _vocabulary() -> list[str]:
    words = set(POSITIVE + NEGATIVE + EXTRA + ["train", "validation", "test", "was"])
    for subject in SUBJECTS:
        words.update(subject.split())
    words.update(str(i) for i in range(100))
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)


def build_tiny_checkpoint(folder: Path, layers: int = 2, seed: int = 0) -> Path:
    """A ``layers``-layer, 32-wide BERT with a word-level tokenizer, saved like a Hub checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                        mask_token="[MASK]", model_max_length=64,
                                        model_input_names=["input_ids", "token_type_ids",
                                                           "attention_mask"])
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))


UNIT_DIR = Path(__file__).parent / "unit"


def pytest_collection_modifyitems(config, items):
    """Everything under tests/unit/ is the `unit` tier (`make unit`): no subprocess, no training."""
    for item in items:
        if UNIT_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def isolated_tracking(tmp_path, monkeypatch):
    """Every test gets its own MLflow database and datasets cache, and no Hub access."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.delenv("PIPELINE_SWEEP_PARENT_RUN_ID", raising=False)
