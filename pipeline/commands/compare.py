"""Compare MLflow runs: a sweep's children, or the runs of DVC experiments.

    hf-text-pipeline compare --parent <sweep parent run id>
    hf-text-pipeline compare --experiment bbc_news --dvc-experiments --output comparison/exps

Writes a table of each run's swept params and summary metrics (``runs.csv``, ``runs.md``, best
first) and a plot of the metric against each swept value (``metric_vs_params.png``); with
``--parent`` the files are also logged to the parent run under ``comparison/``. A sweep writes
the same files itself when it ends; this command redoes them, for DVC experiments too.

Not a DVC stage: it reads the tracking database, which DVC does not track.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.comparison import main_metric_of, write_comparison


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-text-pipeline compare",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--parent", help="run id of a sweep's parent run: compare its children")
    which.add_argument("--experiment", help="MLflow experiment name: compare its runs")
    parser.add_argument("--dvc-experiments", action="store_true",
                        help="with --experiment: only runs of DVC experiments (dvc_exp_name tag)")
    parser.add_argument("--metric", help="metric to rank and plot (default: validation_<the "
                        "runs' dataset.main_metric>)")
    parser.add_argument("--output", "-o", type=Path, default=Path("comparison"),
                        help="folder for the table and plot (default: comparison)")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or the project's "
                        "mlflow.db")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import tracking_uri

    client = mlflow.MlflowClient(args.tracking_uri or tracking_uri())
    try:
        if args.parent:
            parent = client.get_run(args.parent)
            experiment_ids = [parent.info.experiment_id]
            query = f"tags.mlflow.parentRunId = '{args.parent}'"
        else:
            experiment = client.get_experiment_by_name(args.experiment)
            if experiment is None:
                raise ValueError(f"no MLflow experiment named {args.experiment!r}")
            experiment_ids = [experiment.experiment_id]
            query = "tags.dvc_exp_name LIKE '%'" if args.dvc_experiments else ""
        runs = client.search_runs(experiment_ids, filter_string=query, max_results=10_000)
        if args.experiment and not args.dvc_experiments:
            runs = [r for r in runs if r.data.tags.get("sweep") != "true"]  # parents summarise
        if not runs:
            raise ValueError("no runs to compare" + (f" under parent run {args.parent}"
                                                     if args.parent else ""))
        metric = args.metric or main_metric_of(runs)
        paths = write_comparison(runs, metric, args.output)
        if args.parent:
            for path in paths:
                client.log_artifact(args.parent, str(path), "comparison")
    except (MlflowException, ValueError) as exc:
        print(f"compare: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
