"""What the stages agree on to read each other's outputs: column and file names, loading the
dataset and pretrained snapshots, which split is validation, whether labels are scores.

Every stage imports this module, so it stays small and imports nothing heavy at module level:
an edit here re-runs the whole DAG (dvc.yaml lists it as a code dep of every stage).

The dataset snapshot (``paths.raw_dir``) holds one parquet file per split with columns ``text``,
optionally ``text_pair``, ``label`` (a ``ClassLabel`` with the label names, or a float32 score for
regression; -1 marks a split without labels, like GLUE's hidden test sets) and, where configured,
``idx`` (the source's row ids), plus ``manifest.json``. The pretrained snapshot
(``paths.pretrained_dir``) holds config, tokenizer and safetensors weights of one checkpoint and
``checkpoint_manifest.json``. The tokenized data (``paths.tokenized_dir``) is an Arrow
``DatasetDict`` whose label column is ``labels`` (the name models take), and
``tokenize_stats.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pipeline.artifacts import read_json
from pipeline.errors import CheckpointError, DataValidationError

TEXT, TEXT_PAIR, LABEL, IDX = "text", "text_pair", "label", "idx"
LABELS = "labels"  # the label column of the tokenized data
UNLABELED = -1
RAW_MANIFEST = "manifest.json"
PRETRAINED_MANIFEST = "checkpoint_manifest.json"
TOKENIZE_STATS = "tokenize_stats.json"


def load_snapshot(raw_dir: str):
    """The dataset snapshot as a ``DatasetDict``, with its ClassLabel restored."""
    import datasets
    import pyarrow.parquet as pq

    files = sorted(Path(raw_dir).glob("*.parquet"))
    if not files:
        raise DataValidationError(f"{raw_dir}: no dataset snapshot; run the download stage first")
    return datasets.DatasetDict({f.stem: datasets.Dataset(pq.read_table(f)) for f in files})


def load_raw_manifest(raw_dir: str) -> dict[str, Any]:
    """What the download stage read, removed and carved (``manifest.json``)."""
    return read_json(Path(raw_dir) / RAW_MANIFEST)


def load_pretrained_manifest(pretrained_dir: str) -> dict[str, Any]:
    """Source, revision, files and SHA-256 of the pretrained snapshot."""
    return read_json(Path(pretrained_dir) / PRETRAINED_MANIFEST)


def load_tokenize_stats(tokenized_dir: str) -> dict[str, Any]:
    """``max_length`` and per-split length statistics of the tokenized data."""
    return read_json(Path(tokenized_dir) / TOKENIZE_STATS)


def load_pretrained_tokenizer(pretrained_dir: str):
    """The tokenizer of the pretrained snapshot: the only tokenizer any stage uses with it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pretrained_dir)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def check_model_folder(folder: Path, origin: str) -> dict[str, Any]:
    """The folder's config, after refusing what would run code while loading: pickled weights
    (unpickling can execute anything) and configs that ask for the folder's own code
    (``auto_map``, which ``trust_remote_code`` would run). Weights must be safetensors.

    Raises:
        CheckpointError: naming the folder, what was refused and why.
    """
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{origin}: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{origin}/config.json: invalid JSON: {exc.msg}") from None
    if "auto_map" in config:
        raise CheckpointError(f"{origin}/config.json: refused: it asks for custom code from the "
                              "model folder (auto_map), and no model code is ever run from a "
                              "folder or the Hub")
    if not list(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        refused = (f"; refused {', '.join(pickled)}: pickled weights can run code when loaded"
                   if pickled else "")
        raise CheckpointError(f"{origin}: no *.safetensors weights{refused}")
    return config


def is_labeled(split) -> bool:
    """False for a split without labels (every label is -1, like GLUE's hidden test sets)."""
    return len(split) > 0 and any(label != UNLABELED for label in split[LABEL])


def is_regression(split, column: str = LABEL) -> bool:
    """True when the split's labels are scores rather than a ``ClassLabel``."""
    import datasets

    return not isinstance(split.features[column], datasets.ClassLabel)


def validation_split_name(names: list[str]) -> Optional[str]:
    """The split that selects checkpoints: ``validation``, else the first ``validation*``
    (MNLI's ``validation_matched``)."""
    if "validation" in names:
        return "validation"
    candidates = sorted(n for n in names if n.startswith("validation"))
    return candidates[0] if candidates else None
