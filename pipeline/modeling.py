"""The pretrained checkpoint: snapshotting it, and building the tokenizer and model from it.

Tokenizer and model are always loaded from the same snapshot folder, so they cannot drift apart.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_dir, hash_path, write_json
from pipeline.config import HeadConfig, ModelConfig
from pipeline.data import resolve_package_path
from pipeline.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

MANIFEST = "checkpoint_manifest.json"
# What a sequence classifier needs from a checkpoint: config, safetensors weights, tokenizer.
# Pickled *.bin weights are deliberately absent: checkpoints are safetensors only.
CHECKPOINT_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
]


def _wanted(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in CHECKPOINT_FILES)


def _copy_checkpoint_files(source: Path, dest: Path) -> list[str]:
    copied = []
    for file in sorted(source.iterdir()):
        if file.is_file() and _wanted(file.name):
            shutil.copy2(file, dest / file.name)
            copied.append(file.name)
    return copied


def _download_hub(cfg: ModelConfig, dest: Path) -> list[str]:
    """Fetch the checkpoint files at the pinned revision through the user's Hub cache
    (``HF_HUB_CACHE``; works offline once cached) and copy them into the snapshot."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(cfg.path, revision=cfg.revision, allow_patterns=CHECKPOINT_FILES)
    except Exception as exc:  # network, auth, missing revision: the message says which
        raise CheckpointError(f"could not download model '{cfg.path}' at revision "
                              f"{cfg.revision} from the Hub: {exc}") from None
    return _copy_checkpoint_files(Path(folder), dest)


def check_checkpoint(folder: Path, origin: str) -> dict[str, Any]:
    """Fail early, naming the source, if a snapshot cannot build a tokenizer and a model."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{origin}: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{origin}/config.json: invalid JSON: {exc.msg}") from None
    if "model_type" not in config:
        raise CheckpointError(f"{origin}/config.json: no model_type")
    if not list(folder.glob("*.safetensors")):
        raise CheckpointError(f"{origin}: no *.safetensors weights (pickled .bin weights are "
                              "not accepted)")
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # tokenizers raise OSError, ValueError, ...
        raise CheckpointError(f"{origin}: the tokenizer files do not load: {exc}") from None
    return {"model_type": config["model_type"], "architectures": config.get("architectures")}


def snapshot_checkpoint(cfg: ModelConfig, out_dir: str) -> dict[str, Any]:
    """Download stage, model half: copy config, weights and tokenizer of ``cfg`` to ``out_dir``.

    Returns the manifest (source, revision, files, content hash) also written into the snapshot.
    """
    revision = cfg.revision
    with atomic_dir(out_dir) as tmp:
        if cfg.source == "hub":
            origin = f"hf://{cfg.path}@{cfg.revision}"
            files = _download_hub(cfg, tmp)
        else:
            if cfg.source == "package":
                source, revision = resolve_package_path(cfg.path, cfg.revision)
            else:
                source = Path(cfg.path)
                if not source.is_dir():
                    raise ConfigError(f"model.path '{cfg.path}' is not a folder")
            origin = str(source)
            files = _copy_checkpoint_files(source, tmp)
        details = check_checkpoint(tmp, origin)
        # No absolute paths in the manifest: the snapshot's hash must not depend on where a
        # machine installed the package.
        manifest = {"name": cfg.name, "source": cfg.source, "path": cfg.path,
                    "revision": revision, "files": files, "sha256": hash_path(tmp), **details}
        write_json(tmp / MANIFEST, manifest)
    logger.info("checkpoint %s (%s) from %s: %s", cfg.name, details["model_type"], origin,
                ", ".join(files))
    return manifest


def load_tokenizer(checkpoint_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_dir)


def build_model(checkpoint_dir: str, label_names: list[str], head: HeadConfig,
                regression: bool = False) -> tuple[Any, list[str]]:
    """The pretrained body plus a new head: one output per label, or one score for regression.

    Returns the model and the names of the parameters that are new (the head): everything a
    ``head_only`` run trains. For the checkpoint's own head those are the parameters the
    checkpoint did not provide, so a head-less checkpoint's pooler counts as head.
    """
    from transformers import AutoModelForSequenceClassification

    if regression:
        id2label, extra = {0: "score"}, {"problem_type": "regression"}
    else:
        id2label = dict(enumerate(label_names))
        extra = {"problem_type": "single_label_classification"}
    settings = {"num_labels": len(id2label), "id2label": id2label,
                "label2id": {name: i for i, name in id2label.items()}, **extra}
    if head.type == "pooled":
        from pipeline.heads import PooledClassifier

        model = PooledClassifier.from_body(checkpoint_dir, pooling=head.pooling,
                                           hidden_sizes=list(head.hidden_sizes),
                                           dropout=head.dropout, **settings)
        prefix = f"{model.base_model_prefix}."
        return model, [n for n, _ in model.named_parameters() if not n.startswith(prefix)]
    model, info = AutoModelForSequenceClassification.from_pretrained(
        checkpoint_dir, output_loading_info=True,
        # A checkpoint that already has a classifier head of another size gets a new one.
        ignore_mismatched_sizes=True, **settings)
    fresh = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    prefix = f"{model.base_model_prefix}."
    return model, [n for n, _ in model.named_parameters() if n in fresh or not n.startswith(prefix)]
