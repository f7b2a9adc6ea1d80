"""DVC stage `evaluate`: paths.model_dir on the held-out splits -> metrics, predictions,
submissions."""

from pipeline import tracking
from pipeline.artifacts import hash_path, log_inputs
from pipeline.config import PipelineConfig
from pipeline.evaluation import evaluate_model
from stages.entrypoint import run_stage

PARAMS = ["eval", "dataset.main_metric", "dataset.metrics", "dataset.submission_name",
          "dataset.submission_labels"]


def evaluate(cfg: PipelineConfig) -> None:
    paths = cfg.paths
    log_inputs(paths.model_dir, paths.raw_dir, paths.tokenized_dir)
    with tracking.model_run("evaluate", cfg, hash_path(paths.model_dir)) as run:
        data = cfg.dataset
        metrics = evaluate_model(paths.model_dir, paths.raw_dir, paths.tokenized_dir,
                                 paths.metrics_path, paths.predictions_dir, paths.confusion_path,
                                 cfg.eval.primary_split, cfg.runtime.eval_batch_size,
                                 metrics=data.metrics, main_metric=data.main_metric,
                                 submission_name=data.submission_name,
                                 submission_labels=data.submission_labels,
                                 quantize=cfg.eval.quantize, precision=cfg.eval.precision)
        step = tracking.last_train_step(run)
        tracking.log_metrics_by_split(metrics, step)
        primary = metrics["primary_split"]
        if "quantization" in metrics[primary]:
            tracking.log_metrics_by_split({f"{primary}_quantization":
                                           metrics[primary]["quantization"]}, step)
        tracking.log_artifact(paths.metrics_path)
        tracking.log_artifact(paths.predictions_dir, artifact_path="predictions")


if __name__ == "__main__":
    run_stage("evaluate", evaluate, PARAMS)
