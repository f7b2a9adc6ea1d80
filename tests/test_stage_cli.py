"""The stages' command line as a user meets it: --help, group switches, Hydra launcher presets."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from support import PROJECT, compose_params, make_project, run, subprocess_env

STAGES = ["download", "tokenize", "train", "evaluate", "report"]


@pytest.fixture(scope="module")
def crowded_project(tmp_path_factory):
    """A project folder with a deep .venv/, data/ and mlartifacts/ beside conf/: Hydra's own
    --help walked all of it (minutes with a real .venv)."""
    root = make_project(tmp_path_factory.mktemp("help") / "project", compose_params([]),
                        with_git=False)
    for top in (".venv", "data", "mlartifacts"):
        for i in range(200):
            (root / top / f"d{i}" / "a" / "b").mkdir(parents=True)
    return root


@pytest.mark.parametrize("stage", STAGES)
def test_help_says_what_the_stage_reads_writes_and_how_to_change_it(crowded_project, stage):
    done = run([sys.executable, "-m", f"stages.{stage}", "--help"], crowded_project, timeout=60)
    spec = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"][stage]
    assert done.stdout.startswith(f"python -m stages.{stage}: DVC stage `{stage}`")
    params = yaml.safe_load((crowded_project / "params.yaml").read_text())["paths"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in spec["outs"]]
    for out in outs:
        assert out.replace("${paths.", "").rstrip("}") in params
        assert params[out.replace("${paths.", "").rstrip("}")] in done.stdout
    assert "dvc exp run -S dataset=glue_mrpc" in done.stdout
    assert f"python -m stages.{stage} --cfg job" in done.stdout
    assert "conf/dataset" not in done.stdout and "d199" not in done.stdout


SWITCH = ("which a stage cannot do (it reads params.yaml): run `dvc exp run -S {}`, or override "
          "single values here, e.g. `python -m stages.train {}.<key>=<value>`")


@pytest.mark.parametrize("args, line", [
    (["dataset=glue_mrpc"], "'dataset=glue_mrpc' switches the config group 'dataset', "
     + SWITCH.format("dataset=glue_mrpc", "dataset")),
    (["+train=smoke"], "'+train=smoke' switches the config group 'train', "
     + SWITCH.format("train=smoke", "train")),
    (["strategy=two_phase"], "'strategy=two_phase' switches the config group 'strategy', which "
     "a stage cannot do (it reads params.yaml): run `dvc exp run -S strategy=two_phase`"),
    (["experiment=mrpc_minilm"], "'experiment=mrpc_minilm' switches the config group "
     "'experiment', which a stage cannot do (it reads params.yaml): run `dvc exp run -S "
     "experiment=mrpc_minilm`"),
    (["~dataset"], "'~dataset' removes the config group 'dataset', which a stage cannot do (it "
     "reads params.yaml): run `dvc exp run -S dataset=<option>` to choose another option, or "
     "override single values here, e.g. `python -m stages.train dataset.<key>=<value>`"),
    (["-m", "dataset=glue_mrpc,glue_sst2"], "'dataset=glue_mrpc,glue_sst2' switches the config "
     "group 'dataset', which a stage cannot do (it reads params.yaml): run `dvc exp run --queue "
     "-S dataset=glue_mrpc,glue_sst2` and `dvc queue start` (an experiment per option), or "
     "override single values here, e.g. `python -m stages.train dataset.<key>=<value>`"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else "message")
def test_a_group_on_a_stage_command_line_says_how_to_switch_it(args, line):
    """Every form Hydra accepts for a group (switch, add, delete, sweep) stops in one line that
    shows the `dvc exp run -S` form, before any job runs; values and Hydra's own groups pass."""
    done = run([sys.executable, "-m", "stages.train", *args], PROJECT, check=False, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"train: error: {line}"]


def test_slurm_launcher_config_composes_onto_hydra_submitit():
    """conf/cluster/hydra/launcher/slurm.yaml: Hydra's SLURM launcher with GPU-node defaults."""
    done = subprocess.run([sys.executable, "-m", "stages.train", "hydra/launcher=slurm",
                           "hydra.launcher.partition=gpu", "--cfg", "hydra", "--resolve"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    launcher = yaml.safe_load(done.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == \
        ("gpu", 1, 1)


def test_commands_are_installed_as_one_console_script():
    from pathlib import Path

    script = Path(sys.executable).parent / "hf-text-pipeline"
    done = run([str(script), "--help"], PROJECT, timeout=60)
    assert "predict" in done.stdout and "compare" in done.stdout
    done = run([str(script), "predict", "--help"], PROJECT, timeout=60)
    assert done.stdout.startswith("usage: hf-text-pipeline predict")
    bad = run([str(script), "retrain"], PROJECT, check=False, timeout=60)
    assert bad.returncode == 2 and "unknown command 'retrain'" in bad.stderr


def test_stages_import_no_metric_library_before_computing_a_metric():
    """scikit-learn and SciPy cost ~1 s of every start-up (and of --help): the report stage
    never uses them, training and evaluation only once predictions exist."""
    done = run([sys.executable, "-c", "import sys, stages.train, stages.evaluate, stages.report; "
                "print(sorted(m for m in ('scipy.stats', 'sklearn') if m in sys.modules))"],
               PROJECT, timeout=120)
    assert done.stdout.strip() == "[]"


def test_startup_bench_reaches_a_stage_first_work_through_its_entrypoint():
    import importlib.util

    spec = importlib.util.spec_from_file_location("startup", PROJECT / "bench" / "startup.py")
    startup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(startup)
    command = [sys.executable, "-c", startup._PROBE, "report", *startup.HEAVY["report"]]
    assert 0 < startup._seconds_to_first_work(command, PROJECT) < 600
    assert "cores" in startup.cpu_name()


# Where MLflow finds itself in CI or a test, it sends nothing whatever the setting (this test
# runs in both): the probes run without these, as on a user's machine.
CI_VARIABLES = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI",
                "JENKINS_URL", "TRAVIS", "TF_BUILD", "BITBUCKET_BUILD_NUMBER",
                "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION",
                "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID", "DO_NOT_TRACK")
TELEMETRY_PROBE = """
import importlib, sys
importlib.import_module(sys.argv[1])
import mlflow
from mlflow.telemetry import get_telemetry_client
from mlflow.telemetry.utils import _is_ci_env_or_testing
print(_is_ci_env_or_testing(), get_telemetry_client() is not None)
"""


@pytest.mark.parametrize("entry_point", ["stages.train", "pipeline.commands",
                                         "hydra_plugins.mlflow_sweep.callback"])
def test_mlflow_telemetry_is_off_in_our_processes_unless_the_user_turns_it_on(entry_point,
                                                                               tmp_path):
    """A stage, the hf-text-pipeline command and the sweep plugin (which Hydra imports before a
    sweep's first MLflow call) each import the pipeline package before MLflow, which turns
    telemetry off at import; MLFLOW_DISABLE_TELEMETRY=false set by the user is left alone."""
    env = subprocess_env(MLFLOW_DISABLE_TELEMETRY=None, HOME=str(tmp_path),
                         XDG_CONFIG_HOME=str(tmp_path), **dict.fromkeys(CI_VARIABLES))
    done = run([sys.executable, "-c", TELEMETRY_PROBE, entry_point], PROJECT, env=env,
               timeout=120)
    assert done.stdout.split() == ["False", "False"], "(in CI?, telemetry on?)"
    opted_in = run([sys.executable, "-c", "import os, pipeline; "
                    "print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"], PROJECT,
                   env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"}, timeout=60)
    assert opted_in.stdout.strip() == "false"
