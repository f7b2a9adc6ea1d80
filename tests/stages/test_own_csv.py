"""Bring your own data: `dataset=csv` plus a path and a text column train on a CSV file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import sentiment_rows
from omegaconf import OmegaConf

from pipeline.config import load_config
from pipeline.contracts import load_snapshot
from support import compose_params, paths_under, run_stages, tiny_overrides


def test_a_csv_file_trains_with_three_overrides(tmp_path, tiny_checkpoint):
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as handle:  # quoted fields with commas, quotes, newlines
        writer = csv.writer(handle)
        writer.writerow(["id", "review", "label", "stars"])
        for i, row in enumerate(sentiment_rows(60, 5)):
            writer.writerow([i, f'{row["sentence"]}, "really"\nthe end', row["label"], i % 5])
    overrides = ["dataset=csv", f"dataset.path={path}", "dataset.text_column=review"]
    model = [o for o in tiny_overrides(path, tiny_checkpoint) if not o.startswith("dataset")]
    cfg = load_config(OmegaConf.create(compose_params(overrides + model
                                                      + paths_under(tmp_path / "project"))))
    run_stages(cfg, "download", "tokenize", "train", "evaluate", "report")

    manifest = json.loads((Path(cfg.paths.raw_dir) / "manifest.json").read_text())
    assert manifest["label_names"] == ["negative", "positive"]  # read from the data
    assert (manifest["task"], manifest["carved_splits"]) == ("classification",
                                                              ["test", "validation"])
    assert {name: split["rows"] for name, split in manifest["splits"].items()} == \
        {"train": 48, "validation": 6, "test": 6}
    raw = load_snapshot(cfg.paths.raw_dir)
    assert all(text.endswith(', "really"\nthe end') for text in raw["train"]["text"])
    metrics = json.loads(Path(cfg.paths.metrics_path).read_text())
    assert set(metrics["test"]) == {"accuracy", "f1", "macro_f1", "mcc", "examples"}
    assert (Path(cfg.paths.report_dir) / "report.md").read_text().startswith(
        "# my_csv / tiny_bert")
