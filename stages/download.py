"""DVC stage `download`: snapshot `dataset` into paths.raw_dir and `model` into
paths.pretrained_dir."""

import shutil

from pipeline.config import PipelineConfig
from pipeline.preparation import prepare_and_save
from pipeline.pretrained import snapshot_pretrained
from stages.entrypoint import run_stage

# What the snapshots depend on (dvc.yaml lists the same): not the metrics or submission keys,
# nor the model card's metadata.
PARAMS = ["seed", "dataset.name", "dataset.source", "dataset.path", "dataset.subset",
          "dataset.revision", "dataset.format", "dataset.text_column", "dataset.text_pair_column",
          "dataset.label_column", "dataset.label_names", "dataset.task", "dataset.id_column",
          "dataset.validation_size", "dataset.test_size", "dataset.deduplicate",
          "dataset.on_leakage", "dataset.encoding", "dataset.min_class_rows", "model.name",
          "model.source", "model.path", "model.revision"]


def download(cfg: PipelineConfig) -> None:
    prepare_and_save(cfg.dataset, cfg.seed, cfg.paths.raw_dir)
    try:
        snapshot_pretrained(cfg.model, cfg.paths.pretrained_dir)
    except BaseException:
        # The two snapshots are one output: never leave the data behind without its model.
        shutil.rmtree(cfg.paths.raw_dir, ignore_errors=True)
        raise


if __name__ == "__main__":
    run_stage("download", download, PARAMS)
