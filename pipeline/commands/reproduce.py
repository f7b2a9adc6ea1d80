"""Run a recorded MLflow run again from its own record, and compare every metric.

    hf-text-pipeline reproduce <run id>
    hf-text-pipeline reproduce <run id> --keep      # keep the worktree to look into

The run's record holds what it needs: the git commit (tag ``git_commit``), the resolved config
(artifact ``config/params.yaml``), DVC's lock when it trained (``config/dvc.lock``) and the
SHA-256 of its inputs (tags ``dataset_sha256``, ``checkpoint_sha256``, ``tokenized_sha256``).
The command checks that commit out in a temporary git worktree (under ``.dvc/tmp/reproduce/``),
writes the run's params.yaml there, gets the inputs (``dvc pull`` from the project's default DVC
remote, else by running download and tokenize again) and stops before training, in one line, if
one of them is not what the run recorded. It then runs train and every stage after it, which
log into the same tracking store as a new run tagged ``reproduces=<run id>``, and compares
every metric of the two runs, step by step, to the last digit (timings excepted); the
comparison goes to the new run (``reproduction/comparison.md`` and ``.json``). Exit status 0
when everything is identical (what a CPU gives), 1 with the list of what differs otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import PipelineError

PROG = "reproduce"
REPRODUCES_TAG = "reproduces"
CONFIG_ARTIFACT = "config/params.yaml"
LOCK_ARTIFACT = "config/dvc.lock"
# The stages that make the inputs of training; their outputs are pulled or made again.
INPUT_STAGES = ("download", "tokenize")
# (tag, what it is, the paths key of the folder it hashes), upstream first.
INPUTS = (("dataset_sha256", "the dataset snapshot", "raw_dir"),
          ("checkpoint_sha256", "the pretrained checkpoint", "pretrained_dir"),
          ("tokenized_sha256", "the tokenized data", "tokenized_dir"))


class ReproductionError(PipelineError):
    """The run cannot be reproduced here as recorded (no such run, its commit missing, its
    inputs changed)."""


@dataclass(frozen=True)
class Record:
    """What a run's MLflow record says it was made from."""

    run_id: str
    name: str
    experiment_id: str
    commit: str
    dirty: bool
    params_path: Path
    lock_path: Optional[Path]
    tags: dict[str, str]

    @property
    def params(self) -> dict[str, Any]:
        import yaml

        return yaml.safe_load(self.params_path.read_text())


@dataclass(frozen=True)
class MetricComparison:
    """One metric of the two runs: its last values, and what differs (None: identical)."""

    name: str
    original: Optional[float]
    reproduced: Optional[float]
    difference: Optional[str]


def is_timing(name: str) -> bool:
    """Metrics that measure time or the machine (Trainer's ``*_runtime``, ``*_per_second``,
    MLflow's ``system/*``): they differ on every run, so they are shown, never compared."""
    return name.startswith("system/") or name.endswith(("_runtime", "_per_second"))


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def compare_metrics(original: dict[str, list[tuple[int, float]]],
                    reproduced: dict[str, list[tuple[int, float]]]) -> list[MetricComparison]:
    """Compare every metric's history (``(step, value)`` in logging order) exactly: the same
    steps, the same values to the last bit. Timings (:func:`is_timing`) are listed with no
    difference; a metric one run lacks is a difference."""
    rows = []
    for name in sorted(set(original) | set(reproduced)):
        ours, theirs = original.get(name, []), reproduced.get(name, [])
        last = (ours[-1][1] if ours else None), (theirs[-1][1] if theirs else None)
        difference = None
        if is_timing(name):
            pass
        elif not theirs:
            difference = "not logged by the reproduction"
        elif not ours:
            difference = "not logged by the run"
        elif [s for s, _ in ours] != [s for s, _ in theirs]:
            difference = (f"logged at steps {_steps(ours)} in the run, {_steps(theirs)} in the "
                          "reproduction")
        else:
            for (step, a), (_, b) in zip(ours, theirs):
                if not _same(a, b):
                    difference = f"{a!r} in the run, {b!r} reproduced" + \
                        (f" (first at step {step})" if len(ours) > 1 else "")
                    break
        rows.append(MetricComparison(name, *last, difference))
    return rows


def _steps(history: list[tuple[int, float]]) -> str:
    steps = [str(s) for s, _ in history]
    return ",".join(steps) if len(steps) <= 8 else ",".join(steps[:8]) + f",... ({len(steps)})"


def input_difference(record: Record, found: dict[str, str], params: dict[str, Any]) -> \
        Optional[str]:
    """The one line saying which input is not what ``record`` says (upstream first), or None.
    ``found`` maps each of :data:`INPUTS`' tags to the SHA-256 of what was pulled or made."""
    differing = [(tag, what, key) for tag, what, key in INPUTS
                 if tag in record.tags and tag in found and record.tags[tag] != found[tag]]
    if not differing:
        return None
    tag, what, key = differing[0]
    line = (f"{what} ({params['paths'][key]}) is not the one run {record.run_id} trained on: "
            f"{tag} {found[tag][:12]} now, {record.tags[tag][:12]} recorded")
    if tag == "dataset_sha256":
        source = params["dataset"]
        line += (f"; its source ({source['source']} {source['path']}"
                 + (f" at {source['revision']}" if source.get("revision") else "")
                 + ") changed since the run")
    elif tag == "checkpoint_sha256":
        source = params["model"]
        line += f"; its source ({source['source']} {source['path']}) changed since the run"
    later = [w for _, w, _ in differing[1:]]
    if later:
        line += f" (and so {' and '.join(later)})"
    return line + "; nothing was trained"


def comparison_table(record: Record, reproduction_id: str,
                     rows: Sequence[MetricComparison]) -> str:
    """The comparison as a Markdown table, a row per metric."""
    lines = [f"| metric | run {record.run_id} | reproduction {reproduction_id} | |",
             "|---|---|---|---|"]
    for row in rows:
        verdict = ("timing, not compared" if is_timing(row.name)
                   else "identical" if row.difference is None else f"**{row.difference}**")
        lines.append(f"| {row.name} | {_value(row.original)} | {_value(row.reproduced)} | "
                     f"{verdict} |")
    return "\n".join(lines) + "\n"


def _value(value: Optional[float]) -> str:
    return "" if value is None else repr(value)


# -- the record -------------------------------------------------------------------------------


def read_record(client, run_id: str, into: Path) -> Record:
    """The run's record, its artifacts downloaded into ``into``.

    Raises:
        ReproductionError: no such run, or not a train run of this pipeline.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if getattr(error, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST",
                                                 "INVALID_PARAMETER_VALUE"):
            raise ReproductionError(f"no MLflow run {run_id} in {client.tracking_uri}") from None
        raise
    tags = run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run_id, "config")}
    if CONFIG_ARTIFACT not in artifacts:
        raise ReproductionError(f"run {run_id} ({run.info.run_name}) has no {CONFIG_ARTIFACT}: "
                                "only a train stage's run can be reproduced")
    commit = tags.get("git_commit", "unknown")
    if commit == "unknown":
        raise ReproductionError(f"run {run_id} records no git commit (tag git_commit): it did "
                                "not run from a git checkout")
    params = Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, str(into)))
    lock = (Path(client.download_artifacts(run_id, LOCK_ARTIFACT, str(into)))
            if LOCK_ARTIFACT in artifacts else None)
    return Record(run_id, run.info.run_name, run.info.experiment_id, commit,
                  tags.get("git_dirty") == "true", params, lock, dict(tags))


def metric_histories(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run as ``(step, value)`` in logging order."""
    run = client.get_run(run_id)
    return {name: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, name),
                                                     key=lambda m: (m.step, m.timestamp))]
            for name in run.data.metrics}


# -- the worktree -----------------------------------------------------------------------------


def _git(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=check)


def add_worktree(root: Path, record: Record) -> tuple[Path, Path]:
    """A git worktree of ``record.commit`` under ``.dvc/tmp/reproduce/`` (ignored, and where
    the stages find the project as they do in DVC's own temporary copies); returns it and the
    project folder inside it (the project may sit in a subfolder of its repository).

    Raises:
        ReproductionError: not a git repository, or the commit is not in it.
    """
    prefix = _git(["rev-parse", "--show-prefix"], root, check=False)
    if prefix.returncode != 0:
        raise ReproductionError(f"{root} is not in a git repository: run this from the project")
    if _git(["cat-file", "-e", f"{record.commit}^{{commit}}"], root, check=False).returncode:
        raise ReproductionError(f"commit {record.commit} (run {record.run_id}'s git_commit) is "
                                f"not in this repository: fetch it first (git fetch)")
    parent = root / ".dvc" / "tmp" / "reproduce"
    parent.mkdir(parents=True, exist_ok=True)
    worktree = Path(tempfile.mkdtemp(prefix=f"{record.run_id[:12]}-", dir=parent))
    _git(["worktree", "add", "--detach", str(worktree), record.commit], root)
    return worktree, worktree / prefix.stdout.strip()


def remove_worktree(root: Path, worktree: Path) -> None:
    if _git(["worktree", "remove", "--force", str(worktree)], root, check=False).returncode:
        shutil.rmtree(worktree, ignore_errors=True)
        _git(["worktree", "prune"], root, check=False)


def prepare_project(root: Path, project: Path, record: Record) -> Optional[str]:
    """Write the run's params.yaml (and its DVC lock) into ``project``, and the DVC remotes of
    ``root`` as they resolve there (a relative path would resolve elsewhere from the worktree);
    returns the default remote's name, if any."""
    from dvc.repo import Repo

    shutil.copyfile(record.params_path, project / "params.yaml")
    if record.lock_path is not None:
        shutil.copyfile(record.lock_path, project / "dvc.lock")
    local = root / ".dvc" / "config.local"
    if local.is_file():
        shutil.copyfile(local, project / ".dvc" / "config.local")
    with Repo(str(root)) as repo:
        remotes = {name: {key: str(value) if isinstance(value, str) else value
                          for key, value in section.items()}
                   for name, section in repo.config["remote"].items()}
        default = repo.config["core"].get("remote")
    if remotes:
        with Repo(str(project)) as repo, repo.config.edit("local") as conf:
            conf["remote"] = {**conf.get("remote", {}), **remotes}
            if default:
                conf["core"]["remote"] = default
    return default


def found_inputs(project: Path, params: dict[str, Any]) -> dict[str, str]:
    """The SHA-256 of each input in ``project``, as the train stage records them."""
    from pipeline.artifacts import hash_path
    from pipeline.contracts import load_pretrained_manifest

    paths = {key: project / value for key, value in params["paths"].items()}
    found = {}
    if paths["raw_dir"].is_dir():
        found["dataset_sha256"] = hash_path(paths["raw_dir"])
    if paths["pretrained_dir"].is_dir():
        found["checkpoint_sha256"] = load_pretrained_manifest(
            str(paths["pretrained_dir"]))["sha256"]
    if paths["tokenized_dir"].is_dir():
        found["tokenized_sha256"] = hash_path(paths["tokenized_dir"])
    return found


# -- the command ------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


class _Dvc:
    """``dvc`` of this environment in the worktree's project, its output passed through."""

    def __init__(self, project: Path, env: dict[str, str]) -> None:
        self.project = project
        self.env = env
        self.executable = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"

    def __call__(self, *args: str) -> None:
        _say("dvc " + " ".join(args))
        code = subprocess.call([self.executable, *args], cwd=self.project, env=self.env)
        if code:
            raise ReproductionError(f"`dvc {' '.join(args)}` failed (exit status {code}) in "
                                    f"{self.project}; its output is above")

    def quietly(self, *args: str) -> Optional[str]:
        """Run ``dvc <args>`` with its output kept; None if it succeeded, else why not."""
        done = subprocess.run([self.executable, *args], cwd=self.project, env=self.env,
                              capture_output=True, text=True)
        if done.returncode == 0:
            return None
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
        return (errors or done.stderr.strip().splitlines() or ["no output"])[0][:300]


def stage_env(uri: str, run_id: str) -> dict[str, str]:
    """The stages' environment: the original run's tracking store, named explicitly (from the
    worktree the default store would be another file), and MLflow's run context tag
    ``reproduces=<run id>``, which MLflow puts on every run the stages start."""
    env = dict(os.environ)
    for name in ("DVC_EXP_NAME", "DVC_ROOT", "DVC_STAGE", "PIPELINE_SWEEP_PARENT_RUN_ID"):
        env.pop(name, None)
    context = json.loads(env.get("MLFLOW_RUN_CONTEXT") or "{}")
    env["MLFLOW_RUN_CONTEXT"] = json.dumps({**context, REPRODUCES_TAG: run_id})
    env["MLFLOW_TRACKING_URI"] = uri
    # The stages' `python` is this environment's, also when its bin folder is not on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def get_inputs(dvc: _Dvc, project: Path, record: Record, remote: Optional[str]) -> None:
    """Pull the run's inputs from the default remote, or make them again; check them against
    the record before anything trains.

    Raises:
        ReproductionError: an input is not what the run recorded.
    """
    params = record.params
    pulled = False
    if remote is None:
        _say("no default DVC remote: downloading the inputs again")
    else:
        failure = dvc.quietly("pull", *INPUT_STAGES)
        pulled = failure is None
        _say(f"pulled the inputs from the DVC remote '{remote}'" if pulled else
             f"could not pull run {record.run_id}'s inputs from the DVC remote '{remote}' "
             f"({failure}): downloading them again")
    dvc("repro", INPUT_STAGES[-1])
    difference = input_difference(record, found_inputs(project, params), params)
    if difference and pulled:
        _say(f"pulled inputs differ from the record ({difference.split(':')[0]}): "
             "downloading them again")
        dvc("repro", "--force", INPUT_STAGES[-1])
        difference = input_difference(record, found_inputs(project, params), params)
    if difference:
        raise ReproductionError(difference)
    checked = [tag for tag, _, _ in INPUTS if tag in record.tags]
    _say(f"inputs as recorded ({', '.join(checked) or 'no input hashes recorded'})")


def find_reproduction(client, record: Record, started_ms: int) -> Any:
    """The run the stages started for this reproduction (tagged ``reproduces``)."""
    experiment = client.get_experiment_by_name(record.params["tracking"]["experiment_name"])
    ids = [experiment.experiment_id] if experiment else [record.experiment_id]
    runs = client.search_runs(ids, filter_string=(f"tags.{REPRODUCES_TAG} = '{record.run_id}' "
                                                  f"AND attributes.start_time >= {started_ms}"),
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ReproductionError(f"the stages ran but no MLflow run tagged "
                                f"{REPRODUCES_TAG}={record.run_id} is in {client.tracking_uri}")
    return runs[0]


def compare_runs(client, record: Record, reproduction) -> list[str]:
    """Compare the two runs' metrics (and trained weights), record the comparison in the
    reproduction's run, print it; returns the differences, a line each."""
    new_id = reproduction.info.run_id
    rows = compare_metrics(metric_histories(client, record.run_id),
                           metric_histories(client, new_id))
    differences = [f"{row.name}: {row.difference}" for row in rows if row.difference]
    old_model, new_model = (record.tags.get("model_sha256"),
                            reproduction.data.tags.get("model_sha256"))
    if old_model and new_model != old_model:
        differences.append(f"the trained model: model_sha256 {str(new_model)[:12]} reproduced, "
                           f"{old_model[:12]} in the run")
    table = comparison_table(record, new_id, rows)
    client.log_text(new_id, table, "reproduction/comparison.md")
    client.log_dict(new_id, {"run": record.run_id, "reproduction": new_id,
                             "identical": not differences, "differences": differences,
                             "metrics": [asdict(row) for row in rows]},
                    "reproduction/comparison.json")
    client.set_tag(new_id, "reproduction", "differs" if differences else "identical")
    print(table, end="")
    return differences


def reproduce(root: Path, run_id: str, uri: str, keep: bool) -> int:
    import mlflow

    client = mlflow.MlflowClient(uri)
    with tempfile.TemporaryDirectory() as downloads:
        record = read_record(client, run_id, Path(downloads))
        exp = record.tags.get("dvc_exp_name")
        _say(f"run {run_id} ({record.name}{f', DVC experiment {exp}' if exp else ''}) from "
             f"commit {record.commit[:12]}")
        worktree, project = add_worktree(root, record)
        try:
            remote = prepare_project(root, project, record)
            dvc = _Dvc(project, stage_env(uri, run_id))
            get_inputs(dvc, project, record, remote)
            started = int(time.time() * 1000)
            dvc("repro", "--force", "--downstream", "train")
            reproduction = find_reproduction(client, record, started)
            differences = compare_runs(client, record, reproduction)
        finally:
            if keep:
                _say(f"kept the worktree {worktree} (git worktree remove --force <it> when done)")
            else:
                remove_worktree(root, worktree)
    new_id = reproduction.info.run_id
    if not differences:
        _say(f"identical: run {new_id} (tagged {REPRODUCES_TAG}={run_id}) reproduces every "
             f"metric of run {run_id} to the last digit, and its trained weights")
        return 0
    _say(f"run {new_id} (tagged {REPRODUCES_TAG}={run_id}) differs from run {run_id} in "
         f"{len(differences)} place(s):")
    for line in differences:
        print(f"  {line}", file=sys.stderr)
    if record.dirty:
        print(f"  (run {run_id}'s checkout had uncommitted changes, git_dirty=true: the code that "
              f"ran may not be commit {record.commit[:12]}'s)", file=sys.stderr)
    return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"hf-text-pipeline {PROG}",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("run_id", help="the MLflow run to reproduce (a train stage's run)")
    parser.add_argument("--tracking-uri", help="where the run is, and where the reproduction "
                        "logs (default: MLFLOW_TRACKING_URI or the project's mlflow.db)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary worktree (under .dvc/tmp/reproduce/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from pipeline.tracking import is_outage, outage_reason, tracking_uri

    root = Path.cwd()
    if not (root / "dvc.yaml").is_file():
        print(f"{PROG}: error: {root} has no dvc.yaml: run this from the project root",
              file=sys.stderr)
        return 1
    uri = args.tracking_uri or tracking_uri(root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(f"{PROG}: error: no MLflow database at {uri.removeprefix('sqlite:///')} "
              "(set MLFLOW_TRACKING_URI or --tracking-uri to where the run is)", file=sys.stderr)
        return 1
    from mlflow.exceptions import MlflowException

    try:
        return reproduce(root, args.run_id, uri, args.keep)
    except PipelineError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
    except Exception as error:
        if is_outage(error):
            print(f"{PROG}: error: tracking server {uri} unreachable ({outage_reason(error)})",
                  file=sys.stderr)
        elif isinstance(error, MlflowException):  # refused: credentials, permissions
            print(f"{PROG}: error: {uri}: {str(error).splitlines()[0][:300]}", file=sys.stderr)
        else:
            raise
    return 1
