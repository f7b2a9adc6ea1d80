"""The shipped GLUE dataset configs on the real local copies in ../shared/data/glue."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from pipeline.config import DatasetConfig, load_section
from pipeline.preparation import prepare_dataset
from support import SHARED_GLUE, compose_params

pytestmark = pytest.mark.skipif(not SHARED_GLUE.is_dir(),
                                reason=f"GLUE local copies not found at {SHARED_GLUE}")


def glue_config(task: str) -> DatasetConfig:
    params = OmegaConf.create(compose_params([f"dataset=glue_{task}"]))
    cfg = load_section(params, "dataset", DatasetConfig)
    return dataclasses.replace(cfg, source="local", path=str(SHARED_GLUE / task))


def test_mrpc_local_copy_keeps_its_splits_pairs_and_label_names():
    dataset, manifest = prepare_dataset(glue_config("mrpc"), seed=42)
    assert {k: len(v) for k, v in dataset.items()} == {"train": 3668, "validation": 408,
                                                       "test": 1725}
    assert manifest["label_names"] == ["not_equivalent", "equivalent"]
    assert sum(dataset["validation"]["label"]) == 279
    assert set(dataset["train"].column_names) == {"text", "text_pair", "label", "idx"}
    assert manifest["carved_splits"] == [] and manifest["leakage"]["dropped_from_train"] == 0


def test_sst2_local_copy_is_deduplicated_and_its_test_split_is_unlabelled():
    dataset, manifest = prepare_dataset(glue_config("sst2"), seed=42)
    train = manifest["splits"]["train"]
    # 371 sentences occur twice in train, 5 of them with conflicting labels; two test sentences
    # also occur in train and are dropped from it.
    assert train["duplicates_removed"] == 371
    assert train["duplicates_with_conflicting_labels"] == 5
    assert manifest["leakage"]["shared_with_train"] == {"test": 2}
    assert len(dataset["train"]) == 67349 - 371 - 2
    assert len(dataset["validation"]) == 872
    assert manifest["splits"]["test"]["labeled"] is False
    # An unlabelled split keeps every row (a submission needs them all), with GLUE's ids.
    assert list(dataset["test"]["idx"]) == list(range(1821))
