"""DVC stage `download`: snapshot `dataset` into paths.raw_dir and `model` into paths.checkpoint_dir."""

import shutil

from pipeline.config import PipelineConfig
from pipeline.data import prepare_and_save
from pipeline.modeling import snapshot_checkpoint
from stages.entrypoint import run_stage


def download(cfg: PipelineConfig) -> None:
    prepare_and_save(cfg.dataset, cfg.seed, cfg.paths.raw_dir)
    try:
        snapshot_checkpoint(cfg.model, cfg.paths.checkpoint_dir)
    except BaseException:
        # The two snapshots are one output: never leave the data behind without its model.
        shutil.rmtree(cfg.paths.raw_dir, ignore_errors=True)
        raise


if __name__ == "__main__":
    run_stage("download", download)
