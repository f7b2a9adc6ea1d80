"""Hydra callback that gives every multirun sweep one MLflow parent run (see conf/stage.yaml).

It works with any launcher (basic, joblib, submitit) and sweeper (basic, optuna_search): the
``on_job_*`` hooks run in the job's own process, so each job gets the parent's run id and
tracking URI there, and leaves a ``job.json`` in its job folder that the launching process reads
at the end, whatever machine the job ran on.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.tracking import SWEEP_PARENT_ENV

logger = logging.getLogger(__name__)

JOB_RECORD = "job.json"
COMPARISON_DIR = "comparison"


class MlflowSweepCallback(Callback):
    """Opens one MLflow parent run per Hydra multirun; each job's run is its child.

    The parent, named after the search space, records it, the number of jobs, the failed ones,
    the best child and its metric, and a comparison of all children (table and plot); the best
    child gets its model logged (``tracking.log_model``), which the other children log only
    with ``tracking.log_sweep_models``. It ends FAILED if any job failed. Hydra skips
    ``on_multirun_end`` when a job failed (the sweeper raises its error), so the parent is also
    finished at interpreter exit. The parent is tagged with the launching process, so a killed
    sweep's parent is ended KILLED like any run (see ``pipeline.tracking.reconcile_dead_runs``).
    With the tracking server unreachable the sweep goes on without a parent (each job keeps its
    own run until it can be sent, see ``pipeline/pending.py``), and the summary comes from the
    jobs' ``job.json`` records.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self.sweep_dir: Path | None = None
        self.main_metric = "accuracy"
        self.log_best_model = False
        self.raw_dir = ""

    # -- launching process -------------------------------------------------------------------

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        from pipeline.config import TrackingConfig, load_section
        from pipeline.errors import PipelineError
        from pipeline.tracking import (
            bound_requests,
            git_state,
            is_outage,
            is_remote,
            loggable,
            outage_reason,
            process_tags,
            set_experiment,
            tracking_uri,
        )

        self.tracking_uri = tracking_uri()
        if is_remote(self.tracking_uri):
            bound_requests(load_section(config, "tracking", TrackingConfig), self.tracking_uri)
        self.sweep_dir = Path(config.hydra.sweep.dir).resolve()
        self.main_metric = config.dataset.main_metric
        self.log_best_model = bool(config.tracking.log_model)
        self.raw_dir = str(config.paths.raw_dir)
        tags = {"sweep": "true", "sweep_dir": str(self.sweep_dir),
                "sweeper": _target(config.hydra.sweeper),
                "launcher": _target(config.hydra.launcher),
                **git_state(), **process_tags()}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        try:
            experiment_id = set_experiment(config.tracking.experiment_name)
            run = mlflow.MlflowClient().create_run(
                experiment_id, run_name=sweep_name(config, self.sweep_dir), tags=tags)
        except PipelineError as error:
            # Wrong credentials: every job would meet them. Hydra turns a callback's exception
            # into a warning and launches the jobs anyway, so stop here, in one line.
            print(f"sweep: error: {error}", file=sys.stderr)
            sys.exit(1)
        except Exception as error:
            if not (is_remote(self.tracking_uri) and is_outage(error)):
                raise
            # The jobs still run and record their own runs (kept locally until sent).
            logger.warning("MLflow server %s unreachable (%s): the sweep goes on without a "
                           "parent run", self.tracking_uri, outage_reason(error))
            self.run_id = None
            atexit.register(self._finish)
            return
        self.run_id = run.info.run_id
        values, _ = loggable({"search_space": search_space(config)})
        mlflow.MlflowClient().log_param(self.run_id, "search_space", values["search_space"])
        os.environ[SWEEP_PARENT_ENV] = self.run_id
        atexit.register(self._finish)
        logger.info("sweep parent MLflow run %s, jobs in %s", self.run_id, self.sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish()

    def _finish(self) -> None:
        """Record jobs, failures, the best child and the comparison; end the parent run. With
        the server unreachable, the summary comes from the jobs' own records."""
        if self.sweep_dir is None:
            return
        run_id, self.run_id, sweep_dir, self.sweep_dir = self.run_id, None, self.sweep_dir, None
        atexit.unregister(self._finish)
        os.environ.pop(SWEEP_PARENT_ENV, None)
        from pipeline.tracking import is_outage, outage_reason

        jobs = read_job_records(sweep_dir)
        by_num = {j["num"]: j for j in jobs}
        failed = {j["num"] for j in jobs if j.get("status") != JobStatus.COMPLETED.name}
        summary = f"sweep: {len(jobs) - len(failed)} of {len(jobs)} jobs finished"
        if run_id is not None:
            try:
                failed, summary = self._record(run_id, jobs, by_num, sweep_dir)
            except Exception as error:
                if not is_outage(error):
                    raise
                logger.warning("MLflow server %s unreachable (%s): the sweep's summary is not "
                               "on parent run %s", self.tracking_uri, outage_reason(error),
                               run_id)
        print(summary, file=sys.stderr)
        for num in sorted(failed):
            record = by_num.get(num, {})
            print(f"sweep: job {num} failed ({' '.join(record.get('overrides', []))}): "
                  f"{record.get('error', 'no record')}", file=sys.stderr)

    def _record(self, run_id: str, jobs: list[dict[str, Any]], by_num: dict[int, Any],
                sweep_dir: Path) -> tuple[set[int], str]:
        import mlflow

        from pipeline import comparison
        from pipeline.tracking import loggable_tags

        client = mlflow.MlflowClient(self.tracking_uri)
        children = child_runs(client, run_id)
        finished = [c for c in children if c.info.status == "FINISHED"]
        failed = ({j["num"] for j in jobs if j.get("status") != JobStatus.COMPLETED.name}
                  | {int(c.data.tags["sweep_job"]) for c in children
                     if c.info.status != "FINISHED" and "sweep_job" in c.data.tags})
        client.set_tag(run_id, "jobs", str(max(len(jobs), len(children))))
        client.set_tag(run_id, "failed_jobs", loggable_tags({"v": "; ".join(
            f"{num}: {' '.join(by_num.get(num, {}).get('overrides', []))}"
            for num in sorted(failed)) or "none"})["v"])
        metric = f"validation_{self.main_metric}"
        scored = [c for c in finished if metric in c.data.metrics]
        if scored:
            best = max(scored, key=lambda c: c.data.metrics[metric])
            client.set_tag(run_id, "best_run_id", best.info.run_id)
            client.set_tag(run_id, "best_run_name", best.info.run_name)
            client.set_tag(run_id, "best_job", best.data.tags.get("sweep_overrides", ""))
            client.log_metric(run_id, f"best_{metric}", best.data.metrics[metric])
            if self.log_best_model:
                try:
                    self._log_model(client, best, by_num)
                except Exception:  # the sweep's outcome matters more than a copy of a model
                    logger.exception("could not log the best job's model to MLflow")
        if children:
            try:
                out_dir = sweep_dir / COMPARISON_DIR
                for path in comparison.write_comparison(children, metric, out_dir):
                    client.log_artifact(run_id, str(path), COMPARISON_DIR)
            except Exception:  # the sweep's outcome matters more than its summary
                logger.exception("could not write the sweep comparison")
        client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
        summary = (f"sweep: {len(finished)} of {max(len(jobs), len(children))} jobs finished"
                   + (f", best {best.info.run_name} {metric}={best.data.metrics[metric]:.4f}"
                      if scored else "") + f" (MLflow parent run {run_id})")
        return failed, summary

    def _log_model(self, client, best, by_num: dict[int, Any]) -> None:
        """The best job's model, from its job folder, as its run's MLflow model (unless the job
        logged it already)."""
        import mlflow

        from pipeline.tracking import input_example, log_model

        if client.search_logged_models([best.info.experiment_id],
                                       filter_string=f"source_run_id = '{best.info.run_id}'"):
            return
        record = by_num.get(int(best.data.tags.get("sweep_job", -1)), {})
        model_dir = Path(record.get("output_dir", "")) / "model"
        if not record.get("output_dir") or not model_dir.is_dir():
            logger.warning("the best job's model folder %s is not here: its model is not logged "
                           "to MLflow", model_dir)
            return
        mlflow.set_tracking_uri(self.tracking_uri)
        log_model(str(model_dir), input_example(self.raw_dir), run_id=best.info.run_id)
        logger.info("logged the best job's model: runs:/%s/model", best.info.run_id)

    # -- job process (any launcher) ------------------------------------------------------------

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        os.environ[SWEEP_PARENT_ENV] = self.run_id
        if self.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Leave the job's record (overrides, status, error or validation metrics, and the
        config it ran with, which ``hf-text-pipeline exp-from-sweep`` checks) in its folder;
        record a failure in MLflow."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        num = int(config.hydra.job.num)
        overrides = list(config.hydra.overrides.task)
        record: dict[str, Any] = {"num": num, "overrides": overrides,
                                  "status": job_return.status.name,
                                  "output_dir": str(config.hydra.runtime.output_dir)}
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # the exception; .return_value would raise it
            record["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            try:
                if self.run_id is not None:
                    self._record_failure(num, overrides, record["error"])
            except Exception:  # a tracking outage must not hide the job's own error
                logger.exception("could not record the failed job %d in MLflow", num)
        elif isinstance(job_return.return_value, dict):
            record["main_metric"] = config.dataset.main_metric
            record["validation"] = {key: value for key, value in job_return.return_value.items()
                                    if isinstance(value, (int, float))}
        record["config"] = OmegaConf.to_container(
            OmegaConf.masked_copy(config, [key for key in config if key != "hydra"]),
            resolve=True)
        out = Path(config.hydra.runtime.output_dir) / JOB_RECORD
        out.write_text(json.dumps(record, indent=1))

    def _record_failure(self, num: int, overrides: list[str], error: str) -> None:
        """Tag the failed job's child run with its error, or create one FAILED child when the
        job failed before its stage opened a run (a bad config value, say)."""
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        runs = child_runs(client, self.run_id, f" AND tags.sweep_job = '{num}'")
        if runs:
            client.set_tag(runs[0].info.run_id, "error", error)
            return
        parent = client.get_run(self.run_id)
        run = client.create_run(parent.info.experiment_id, run_name=f"job-{num}", tags={
            "mlflow.parentRunId": self.run_id, "sweep_job": str(num), "error": error})
        for override in overrides:
            key, _, value = override.partition("=")
            client.log_param(run.info.run_id, key.lstrip("+~"), value)
        client.set_terminated(run.info.run_id, status="FAILED")


def sweep_name(config: DictConfig, sweep_dir: Path) -> str:
    """The parent run's name: ``sweep`` and its search space, or its folder when the search
    space is empty."""
    from pipeline.tracking import shorten

    space = search_space(config)
    return shorten(f"sweep {space}" if space else f"sweep {sweep_dir.parent.name}/{sweep_dir.name}")


def _target(node: Any) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1] if node is not None else ""


def search_space(config: DictConfig) -> str:
    """The command line's overrides plus a search sweeper's ``params``, as one line."""
    parts = [str(o) for o in config.hydra.overrides.task]
    params = OmegaConf.select(config, "hydra.sweeper.params")
    if params:
        parts += [f"{key}={value}" for key, value in OmegaConf.to_container(params).items()]
    return " ".join(parts)


def read_job_records(sweep_dir: Path | None) -> list[dict[str, Any]]:
    if sweep_dir is None or not sweep_dir.is_dir():
        return []
    records = [json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{JOB_RECORD}")]
    return sorted(records, key=lambda r: r["num"])


def child_runs(client, parent_run_id: str, also: str = "") -> list[Any]:
    """The parent's child runs (``also``: more of an MLflow filter, ``" AND ..."``)."""
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'{also}",
                              max_results=10_000)
