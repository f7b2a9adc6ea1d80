"""Tokenize stage: texts (and pairs) to input ids, truncated but not padded.

Padding happens per batch at train time (DataCollatorWithPadding), so short batches stay short.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
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
    """Truncated encodings plus each row's untruncated length (for the truncation statistics).

    The encodings are exactly ``tokenizer(texts, pairs, truncation=True, max_length=...)``, and
    the text is tokenized once. Truncation cuts a row to exactly ``max_length`` tokens (pairs
    too: longest_first removes just what is over), so a shorter row was not cut. Of a cut single
    text, a fast tokenizer keeps the rest as overflowing pieces (not overlapping: no stride),
    each with the special tokens the row has: their other tokens are what was cut. Cut pairs
    (whose pieces combine both texts' rests) and slow tokenizers' rows are tokenized again,
    untruncated, for their length.
    """
    texts, pairs = batch[TEXT], batch.get(TEXT_PAIR)
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    cut = [row for row, length in enumerate(lengths) if length >= max_length]
    if cut and pairs is None and encoded.encodings is not None:
        specials = tokenizer.num_special_tokens_to_add(pair=False)
        for row in cut:
            lengths[row] += sum(len(piece) - specials
                                for piece in encoded.encodings[row].overflowing)
    elif cut:
        untruncated = tokenizer([texts[row] for row in cut],
                                None if pairs is None else [pairs[row] for row in cut],
                                truncation=False, return_attention_mask=False,
                                return_token_type_ids=False, verbose=False)["input_ids"]
        for row, ids in zip(cut, untruncated):
            lengths[row] = len(ids)
    encoded[_UNTRUNCATED] = lengths
    return encoded


# Rows one tokenize process must carry for it to pay, measured on 2 cores (AMD EPYC, SST-2): a
# second process costs ~0.5 s to start and ~10% more CPU to ship shards and encodings. With both
# cores free, two processes break even near 20k rows and gave 1.2x (wall) to 1.6x (CPU time) on
# 67k; with the other core busy (another job) they never paid, up to 1M rows (0.3x on 5k rows,
# 0.9x on 1M): hence at most one process per idle core.
ROWS_PER_PROCESS = 30_000


def tokenize_processes(num_proc: int | str, rows: int, cores: int | None = None,
                       load: float | None = None) -> int:
    """How many processes tokenize a split of ``rows`` rows: ``num_proc`` when it is a number;
    for ``auto``, one per :data:`ROWS_PER_PROCESS` rows, at most one per idle core (the cores
    less the last minute's load average), and at least one. The output is the same either way.
    """
    if num_proc != "auto":
        return int(num_proc)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    idle = cores - round(load)
    return max(1, min(idle, rows // ROWS_PER_PROCESS))


def length_stats(untruncated: Sequence[int] | np.ndarray, max_length: int) -> dict[str, Any]:
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
                     num_proc: int | str = 1) -> dict[str, Any]:
    """Tokenize every split of the snapshot in ``raw_dir`` with the checkpoint's tokenizer.

    Writes an Arrow ``DatasetDict`` (input_ids, attention_mask, token_type_ids where the model
    uses them, labels) and per-split length statistics to ``out_dir``; returns the statistics.
    ``num_proc`` (a number, or ``auto``: :func:`tokenize_processes`) changes only the speed.
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
        processes = tokenize_processes(num_proc, len(split))
        if num_proc == "auto":
            logger.info("tokenize %s: %d rows, %d process%s (runtime.num_proc=auto)", name,
                        len(split), processes, "" if processes == 1 else "es")
        tokenized = split.map(
            functools.partial(encode_batch, tokenizer=tokenizer, max_length=max_length),
            batched=True,
            # One process is None: num_proc=1 would turn the tokenizer's own threads off.
            num_proc=processes if processes > 1 else None,
            remove_columns=[c for c in split.column_names if c != LABEL],
            new_fingerprint=hashlib.sha256(f"{base}|{name}".encode()).hexdigest()[:16],
            desc=f"tokenize {name}",
        )
        # The Arrow column as one array: a column read as Python values decodes row by row
        # (0.4 s more than the 2.6 s it takes to tokenize SST-2's 70k sentences here).
        untruncated = tokenized.with_format("arrow")[_UNTRUNCATED].to_numpy()
        stats["splits"][name] = length_stats(untruncated, max_length)
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
