"""DVC stage `train`: fine-tune paths.pretrained_dir on paths.tokenized_dir; writes paths.model_dir.

The training history goes to paths.history_path, and as the curves `dvc plots` draws (a file of
training steps, one of evaluations) to paths.curves_dir.

Under Hydra multirun (`-m`) each job writes its model to its own job folder instead, its MLflow
run is a child of the sweep's parent run (with its model only if tracking.log_sweep_models: the
sweep logs its best job's), and it registers no model version. Under torchrun every process
trains its share of each batch (DistributedDataParallel) and rank 0 alone saves the model and
logs the MLflow run.
"""

from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from pipeline import tracking
from pipeline.artifacts import log_inputs
from pipeline.config import PipelineConfig
from pipeline.training import run_fingerprint, train_and_record
from stages.entrypoint import command_line_overrides, in_multirun, job_dir, run_stage

PARAMS = ["seed", "dataset.main_metric", "dataset.metrics", "head", "train"]


def train(cfg: PipelineConfig) -> dict:
    paths = cfg.paths
    log_inputs(paths.pretrained_dir, paths.tokenized_dir)
    overrides = command_line_overrides()
    if in_multirun():
        job = HydraConfig.get().job
        # The sweep callback logs the best job's model at the end of the sweep.
        return train_and_record(
            cfg, model_dir=str(job_dir() / "model"),
            history_path=str(job_dir() / "train_history.json"),
            curves_dir=str(job_dir() / "curves"),
            work_dir=str(job_dir() / "checkpoints"),
            run_name=tracking.run_name(cfg, overrides, job=job.num),
            log_model=cfg.tracking.log_model and cfg.tracking.log_sweep_models,
            tags={"sweep_job": str(job.num), "sweep_overrides": " ".join(overrides)},
            register=False)
    work_dir = Path(paths.trainer_checkpoints_dir) / run_fingerprint(
        cfg, paths.tokenized_dir, paths.pretrained_dir)
    return train_and_record(cfg, model_dir=paths.model_dir, history_path=paths.history_path,
                            curves_dir=paths.curves_dir, work_dir=str(work_dir),
                            run_name=tracking.run_name(cfg, overrides),
                            log_model=cfg.tracking.log_model)


if __name__ == "__main__":
    run_stage("train", train, PARAMS)
