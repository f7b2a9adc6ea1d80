"""Run a finished Hydra sweep's best job again as a DVC experiment, so that it appears in
`dvc exp show` and `dvc plots diff` beside the others.

    hf-text-pipeline exp-from-sweep multirun/2026-01-31/12-00-00-4242
    hf-text-pipeline exp-from-sweep multirun/... -S experiment=mrpc_minilm --queue -n best-lr

The best job is the finished one with the highest validation main metric (each job leaves it in
its `job.json`). The command runs `dvc exp run -S <the job's overrides>`, which trains it again
(on a CPU, bit for bit the same model) and re-runs the stages after training. A job trained on
params.yaml plus its overrides, but `dvc exp run -S` composes conf/ plus its overrides: the two
agree only when params.yaml was what conf/ composes with the same `-S` values. So the command
first composes conf/ as DVC will, and stops, naming the keys that differ, when the result is not
the job's config (pass here the `-S` values params.yaml was made with).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, PipelineError

# Sections that change no output (no stage lists them): they may differ.
_IGNORED_SECTIONS = ("tracking", "runtime")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-text-pipeline exp-from-sweep",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("sweep_dir", type=Path, help="the sweep's folder, multirun/<date>/<time>")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                        help="a `dvc exp run -S` value params.yaml was composed with (repeat); "
                             "the job's own overrides come after")
    parser.add_argument("-n", "--name", help="the experiment's name (default: "
                        "sweep-<its time>-job<number>)")
    parser.add_argument("--queue", action="store_true",
                        help="queue the experiment (`dvc queue start` runs it)")
    return parser


def best_job(sweep_dir: Path) -> dict[str, Any]:
    """The finished job of ``sweep_dir`` with the highest validation main metric."""
    from hydra_plugins.mlflow_sweep.callback import JOB_RECORD, read_job_records

    if not sweep_dir.is_dir():
        raise ConfigError(f"{sweep_dir}: no such sweep folder")
    scored = [job for job in read_job_records(sweep_dir)
              if job.get("main_metric") in job.get("validation", {}) and "config" in job]
    if not scored:
        raise ConfigError(f"{sweep_dir}: no finished job with validation metrics (their "
                          f"<job>/{JOB_RECORD}); is the sweep finished?")
    return max(scored, key=lambda job: job["validation"][job["main_metric"]])


def compose_as_dvc(root: Path, overrides: list[str]) -> dict[str, Any]:
    """What `dvc exp run -S <overrides>` writes to params.yaml, composed by DVC's own function."""
    import yaml
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        try:
            compose_and_dump(out, str(root / "conf"), None, "config", str(root), overrides)
        except HydraException as error:
            raise ConfigError(f"-S {' '.join(overrides)}: {str(error).splitlines()[0]}") from None
        return yaml.safe_load(out.read_text())


def differences(job: dict[str, Any], composed: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: <job's value> in the job, <composed value> from conf/`` for each leaf that differs,
    outside the sections that change no output."""
    found = []
    for key in sorted(set(job) | set(composed)):
        name = f"{prefix}{key}"
        if not prefix and key in _IGNORED_SECTIONS:
            continue
        ours, theirs = job.get(key), composed.get(key)
        if isinstance(ours, dict) and isinstance(theirs, dict):
            found += differences(ours, theirs, f"{name}.")
        elif ours != theirs:
            found.append(f"{name}: {json.dumps(ours)} in the job, {json.dumps(theirs)} from conf/")
    return found


def experiment_command(sweep_dir: Path, root: Path, overrides: list[str], name: str | None,
                       queue: bool) -> list[str]:
    """The `dvc exp run` that reproduces ``sweep_dir``'s best job, checked against conf/."""
    job = best_job(sweep_dir)
    settings = [*overrides, *job["overrides"]]
    differing = differences(job["config"], compose_as_dvc(root, settings))
    if differing:
        shown = "; ".join(differing[:5]) + (f"; and {len(differing) - 5} more"
                                            if len(differing) > 5 else "")
        raise ConfigError(
            f"{sweep_dir}: job {job['num']} ran on a params.yaml that conf/ does not compose "
            f"with -S {' '.join(settings) or '(nothing)'} ({shown}): add the -S values "
            "params.yaml was made with (e.g. -S experiment=<name>)")
    # The sweep's time of day, without the pid its folder name ends in: names are columns wide.
    when = re.sub(r"^(\d\d-\d\d-\d\d)-\d+$", r"\1", sweep_dir.resolve().name)
    return ["dvc", "exp", "run", "-n", name or f"sweep-{when}-job{job['num']}",
            *(["--queue"] if queue else []),
            *[part for setting in settings for part in ("-S", setting)]]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file():
        print(f"exp-from-sweep: error: {root} has no dvc.yaml: run this from the project root",
              file=sys.stderr)
        return 1
    try:
        command = experiment_command(args.sweep_dir, root, args.overrides, args.name, args.queue)
    except PipelineError as error:
        print(f"exp-from-sweep: error: {error}", file=sys.stderr)
        return 1
    print(shlex.join(command), file=sys.stderr)
    # The dvc of this environment, also when its bin folder is not on PATH.
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    return subprocess.call([dvc, *command[1:]])
