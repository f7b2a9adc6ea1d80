"""Hydra callback that gives every multirun sweep one MLflow parent run (see conf/stage.yaml)."""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from stages.entrypoint import SWEEP_PARENT_ENV

logger = logging.getLogger(__name__)


class MlflowSweepCallback(Callback):
    """Opens one MLflow parent run per Hydra multirun; each job's run is its child.

    The parent records the swept overrides and the number of jobs, and ends FAILED if any
    child failed.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        from pipeline.tracking import git_state, set_experiment

        experiment_id = set_experiment(config.tracking.experiment_name)
        overrides = list(config.hydra.overrides.task)
        client = mlflow.MlflowClient()
        run = client.create_run(experiment_id, run_name=f"sweep-{config.hydra.job.name}",
                                tags={"sweep": "true", "sweep_dir": str(config.hydra.sweep.dir),
                                      **git_state()})
        client.log_param(run.info.run_id, "search_space", " ".join(overrides))
        self.run_id = run.info.run_id
        os.environ[SWEEP_PARENT_ENV] = self.run_id
        logger.info("sweep parent MLflow run %s", self.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        if self.run_id is None:
            return
        client = mlflow.MlflowClient()
        parent = client.get_run(self.run_id)
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'")
        failed = [c.info.run_name for c in children if c.info.status != "FINISHED"]
        client.set_tag(self.run_id, "jobs", str(len(children)))
        client.set_tag(self.run_id, "failed_jobs", ",".join(failed) or "none")
        client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        os.environ.pop(SWEEP_PARENT_ENV, None)
