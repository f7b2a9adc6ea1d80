"""The Hub code paths, on local material: no network is touched."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest

from pipeline.errors import CheckpointError, ConfigError
from pipeline.preparation import prepare_dataset
from pipeline.pretrained import snapshot_pretrained
from support import config_section

REVISION = "0123456789abcdef0123456789abcdef01234567"


def test_hub_source_goes_through_load_dataset(tmp_path):
    # load_dataset takes a local folder of parquet files the way it takes a Hub id.
    features = datasets.Features({"question": datasets.Value("string"),
                                  "answer": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["no", "yes"])})
    for split, offset in (("train", 0), ("validation", 100)):
        datasets.Dataset.from_dict(
            {"question": [f"q {offset + i}" for i in range(8)],
             "answer": [f"a {offset + i}" for i in range(8)], "label": [i % 2 for i in range(8)]},
            features=features).to_parquet(str(tmp_path / f"{split}.parquet"))
    cfg = config_section("dataset", name="qa", source="hub", path=str(tmp_path),
                         text_column="question", text_pair_column="answer", test_size=0.25)
    dataset, manifest = prepare_dataset(cfg, seed=0)
    assert manifest["provenance"]["source"] == "hub"
    assert manifest["label_names"] == ["no", "yes"]
    assert manifest["carved_splits"] == ["test"]
    assert len(dataset["validation"]) == 8 and len(dataset["train"]) + len(dataset["test"]) == 8


def test_hub_label_names_must_agree_with_the_config(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=features) \
        .to_parquet(str(tmp_path / "train.parquet"))
    cfg = config_section("dataset", name="x", source="hub", path=str(tmp_path),
                         label_names=["pos", "neg"])
    with pytest.raises(ConfigError, match=r"differ from the label names the source declares"):
        prepare_dataset(cfg, seed=0)


def _hub_cache(tmp_path, tiny_checkpoint, repo="acme/tiny-bert"):
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / REVISION
    shutil.copytree(tiny_checkpoint, snapshot)
    return cache


def test_hub_model_is_snapshotted_from_the_cache_at_its_revision(tmp_path, tiny_checkpoint,
                                                                 monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE",
                        str(_hub_cache(tmp_path, tiny_checkpoint)))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    manifest = snapshot_pretrained(config_section("model", name="tiny", source="hub",
                                                  path="acme/tiny-bert", revision=REVISION),
                                   str(tmp_path / "checkpoint"))
    assert manifest["revision"] == REVISION and manifest["model_type"] == "bert"
    files = {p.name for p in (tmp_path / "checkpoint").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    saved = json.loads((tmp_path / "checkpoint" / "checkpoint_manifest.json").read_text())
    assert saved["sha256"] == manifest["sha256"]


def test_unreachable_hub_model_fails_with_its_id_and_revision(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=rf"could not download model 'acme/missing' at "
                                              rf"revision {REVISION}"):
        snapshot_pretrained(config_section("model", name="m", source="hub", path="acme/missing",
                                           revision=REVISION), str(tmp_path / "checkpoint"))
    assert not (tmp_path / "checkpoint").exists()


def test_checkpoint_without_safetensors_is_refused(tmp_path, tiny_checkpoint):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights"):
        snapshot_pretrained(config_section("model", name="m", source="local", path=str(folder),
                                           revision=None), str(tmp_path / "checkpoint"))
