"""DVC stage `train`: fine-tune paths.checkpoint_dir on paths.tokenized_dir; writes paths.model_dir.

Under Hydra multirun (`-m`) each job writes its model to its own job folder instead, and its
MLflow run is a child of the sweep's parent run. Under torchrun every process trains its share
of each batch (DistributedDataParallel) and rank 0 alone saves the model and logs the MLflow run.
"""

import dataclasses
import functools
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from pipeline import tracking
from pipeline.artifacts import hash_path, log_inputs, read_json
from pipeline.config import PipelineConfig
from pipeline.data import MANIFEST, load_snapshot, validation_split_name
from pipeline.training import run_fingerprint, train_model
from stages.entrypoint import SWEEP_PARENT_ENV, in_multirun, job_dir, run_stage


def train(cfg: PipelineConfig) -> dict:
    paths = cfg.paths
    log_inputs(paths.checkpoint_dir, paths.tokenized_dir)
    if in_multirun():
        model_dir, history_path = job_dir() / "model", job_dir() / "train_history.json"
        work_dir = job_dir() / "checkpoints"
    else:
        model_dir, history_path = Path(paths.model_dir), Path(paths.history_path)
        work_dir = Path(paths.checkpoints_root) / run_fingerprint(
            cfg, paths.tokenized_dir, paths.checkpoint_dir)
    lineage = {
        "dataset_sha256": hash_path(paths.raw_dir),
        "tokenized_sha256": hash_path(paths.tokenized_dir),
        "checkpoint_sha256": read_json(Path(paths.checkpoint_dir) / "checkpoint_manifest.json")["sha256"],
        "dataset_revision": str(read_json(Path(paths.raw_dir) / MANIFEST)["provenance"]["revision"]),
    }
    fit = functools.partial(train_model, cfg.train, cfg.head, seed=cfg.seed,
                            main_metric=cfg.dataset.main_metric, metrics=cfg.dataset.metrics,
                            checkpoint_dir=paths.checkpoint_dir, tokenized_dir=paths.tokenized_dir,
                            output_dir=str(model_dir), history_path=str(history_path),
                            work_dir=str(work_dir))
    if int(os.environ.get("RANK", "0")) != 0:
        return fit(log_to_mlflow=False).eval_metrics  # a torchrun worker: rank 0 logs the run
    lineage["world_size"] = os.environ.get("WORLD_SIZE", "1")
    run_name = f"{cfg.model.name}-{cfg.dataset.name}"
    if in_multirun():
        hydra_cfg = HydraConfig.get()
        lineage.update(sweep_job=str(hydra_cfg.job.num),
                       sweep_overrides=" ".join(hydra_cfg.overrides.task))
        run_name += f"-job{hydra_cfg.job.num}"
    with tracking.stage_run("train", cfg, parent_run_id=os.environ.get(SWEEP_PARENT_ENV),
                            run_name=run_name, log_params=True):
        import mlflow

        mlflow.set_tags(lineage)
        # The whole resolved config, loadable as a params.yaml to reproduce this run.
        mlflow.log_dict(dataclasses.asdict(cfg), "config/params.yaml")
        result = fit(log_to_mlflow=True)
        mlflow.set_tags({tracking.MODEL_SHA_TAG: hash_path(model_dir), "device": result.device,
                         "precision": result.precision})
        mlflow.log_metrics({f"validation_{k}": v for k, v in result.eval_metrics.items()
                            if isinstance(v, (int, float))})
        if cfg.tracking.log_model:
            raw = load_snapshot(paths.raw_dir)
            rows = raw[validation_split_name(list(raw))].select(range(2))
            columns = [c for c in ("text", "text_pair") if c in rows.column_names]
            tracking.log_model(str(model_dir), [{c: row[c][:500] for c in columns} for row in rows])
    return result.eval_metrics


if __name__ == "__main__":
    run_stage("train", train)
