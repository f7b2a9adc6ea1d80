"""Tokenize stage: texts (and pairs) to input ids, truncated but not padded.

Padding happens per batch at train time (DataCollatorWithPadding), so short batches stay short.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any

import datasets
import numpy as np

from pipeline.artifacts import atomic_dir, hash_path, write_json
from pipeline.contracts import (
    LABEL,
    LABELS,
    TEXT,
    TEXT_PAIR,
    TOKENIZE_STATS,
    load_pretrained_tokenizer,
    load_snapshot,
)

logger = logging.getLogger(__name__)

_UNTRUNCATED = "untruncated_length"


def encode_batch(batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
    """Truncated encodings plus each row's untruncated length (for the truncation statistics)."""
    pairs = batch.get(TEXT_PAIR)
    encoded = tokenizer(batch[TEXT], pairs, truncation=True, max_length=max_length)
    full = tokenizer(batch[TEXT], pairs, truncation=False, verbose=False)["input_ids"]
    encoded[_UNTRUNCATED] = [len(ids) for ids in full]
    return encoded


def length_stats(untruncated: list[int], max_length: int) -> dict[str, Any]:
    lengths = np.asarray(untruncated)
    if lengths.size == 0:
        return {"examples": 0}
    kept = np.minimum(lengths, max_length)
    return {
        "examples": int(lengths.size),
        "tokens": int(kept.sum()),
        "tokens_before_truncation": int(lengths.sum()),
        "truncated_examples": int((lengths > max_length).sum()),
        "truncation_rate": round(float((lengths > max_length).mean()), 4),
        "length_mean": round(float(lengths.mean()), 1),
        **{f"length_p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 95, 99)},
        "length_max": int(lengths.max()),
    }


def tokenize_dataset(raw_dir: str, pretrained_dir: str, out_dir: str, max_length: int,
                     num_proc: int = 1) -> dict[str, Any]:
    """Tokenize every split of the snapshot in ``raw_dir`` with the checkpoint's tokenizer.

    Writes an Arrow ``DatasetDict`` (input_ids, attention_mask, token_type_ids where the model
    uses them, labels) and per-split length statistics to ``out_dir``; returns the statistics.
    """
    dataset = load_snapshot(raw_dir)
    tokenizer = load_pretrained_tokenizer(pretrained_dir)
    # Fingerprints normally come from the cache; DVC is our cache, so derive them from the
    # inputs instead and keep the saved dataset byte-identical across identical runs.
    base = hashlib.sha256(f"{hash_path(raw_dir)}|{hash_path(pretrained_dir)}|{max_length}"
                          .encode()).hexdigest()
    stats: dict[str, Any] = {"max_length": max_length, "splits": {}}
    encoded = {}
    for name, split in dataset.items():
        tokenized = split.map(
            functools.partial(encode_batch, tokenizer=tokenizer, max_length=max_length),
            batched=True,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=[c for c in split.column_names if c != LABEL],
            new_fingerprint=hashlib.sha256(f"{base}|{name}".encode()).hexdigest()[:16],
            desc=f"tokenize {name}",
        )
        stats["splits"][name] = length_stats(tokenized[_UNTRUNCATED], max_length)
        encoded[name] = tokenized.remove_columns(_UNTRUNCATED).rename_column(LABEL, LABELS)
    result = datasets.DatasetDict(encoded)
    stats["columns"] = result["train"].column_names
    for row in range(min(3, len(result["train"]))):
        ids = result["train"][row]["input_ids"]
        logger.info("sample %d (%d tokens): %s", row, len(ids),
                    tokenizer.decode(ids)[:200].replace("\n", " "))
    for name, split_stats in stats["splits"].items():
        logger.info("split %-22s %s", name, ", ".join(
            f"{k}={v}" for k, v in split_stats.items() if k in (
                "examples", "tokens", "truncation_rate", "length_p50", "length_p95")))
    with atomic_dir(out_dir) as tmp:
        result.save_to_disk(str(tmp))
        write_json(tmp / TOKENIZE_STATS, stats)
    return stats
