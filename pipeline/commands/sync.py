"""Send the MLflow runs that stages kept locally while the tracking server was unreachable.

    hf-text-pipeline sync                   # to MLFLOW_TRACKING_URI, from tracking.pending_dir
    hf-text-pipeline sync --list            # what is waiting, exactly; sends nothing
    hf-text-pipeline sync --tracking-uri http://mlflow.internal:5000 --pending-dir mlruns-pending

A run that took over midway goes into the server run it continues, one that found no run of its
model (evaluate or report) into the server's run of that model, any other as a new run; each
keeps its params, tags, every metric value with its step and time, artifacts, logged model and
status. Sent runs leave the pending store. Stages do the same at their start when the server
answers; this command is for when none runs next.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-text-pipeline sync",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", help="the server to send to (default: "
                        "MLFLOW_TRACKING_URI)")
    parser.add_argument("--pending-dir", type=Path, help="the pending store (default: "
                        "params.yaml's tracking.pending_dir in the project)")
    parser.add_argument("--list", action="store_true", help="list what waits; send nothing")
    return parser


def _tracking_section() -> Optional[Any]:
    """params.yaml's tracking section, when run in the project."""
    import yaml
    from omegaconf import OmegaConf

    from pipeline.config import TrackingConfig, load_section
    from pipeline.tracking import project_root

    params = project_root() / "params.yaml"
    if not params.is_file():
        return None
    values = yaml.safe_load(params.read_text()) or {}
    if "tracking" not in values:
        return None
    return load_section(OmegaConf.create(values), "tracking", TrackingConfig)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from pipeline import pending
    from pipeline.errors import PipelineError
    from pipeline.tracking import bound_requests, is_remote, project_root

    try:
        section = _tracking_section()
    except PipelineError as error:
        print(f"sync: error: {error}", file=sys.stderr)
        return 1
    folder = args.pending_dir or Path(section.pending_dir if section else "mlruns-pending")
    folder = folder if folder.is_absolute() else project_root() / folder
    runs = pending.pending_runs(folder)
    if args.list or not runs:
        import mlflow

        client = mlflow.MlflowClient(pending.store_uri(folder)) if runs else None
        for run in runs:
            print(f"{run.info.run_id}  {run.info.run_name}: {pending.describe(client, run)}")
        print(f"{len(runs)} runs wait in {folder}" if runs else f"nothing waits in {folder}")
        return 0
    target = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not target:
        print("sync: error: no server to send to: set MLFLOW_TRACKING_URI or --tracking-uri",
              file=sys.stderr)
        return 1
    if section is not None and is_remote(target):
        bound_requests(section, target)

    def report(sent: pending.Sent) -> None:
        print(f"{sent.pending_run_id} -> {sent.server_run_id}  {sent.name}: {sent.what}")

    try:
        sent = pending.sync(folder, target, report=report)
    except Exception as error:
        print(f"sync: error: {target}: {str(error).splitlines()[0][:300]}; "
              f"the runs not sent stay in {folder}", file=sys.stderr)
        return 1
    left = len(runs) - len(sent)
    print(f"sent {len(sent)} runs to {target}"
          + (f"; {left} still running stay in {folder}" if left else ""))
    return 0
