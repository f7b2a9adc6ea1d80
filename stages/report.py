"""DVC stage `report`: paths.report_dir (Markdown + figures) and
paths.release_dir (model + model card)."""

from pipeline import tracking
from pipeline.artifacts import hash_path, log_inputs
from pipeline.config import PipelineConfig
from pipeline.reporting import write_report
from stages.entrypoint import run_stage

# What the report and the model card print.
PARAMS = ["seed", "dataset.name", "dataset.source", "dataset.path", "dataset.subset",
          "dataset.revision", "dataset.main_metric", "model", "head", "tokenize", "train",
          "paths.release_dir"]


def report(cfg: PipelineConfig) -> None:
    paths = cfg.paths
    log_inputs(paths.model_dir, paths.history_path, paths.metrics_path, paths.confusion_path)
    with tracking.model_run("report", cfg, hash_path(paths.model_dir)):
        for file in write_report(cfg):
            tracking.log_artifact(str(file), artifact_path="report")


if __name__ == "__main__":
    run_stage("report", report, PARAMS)
