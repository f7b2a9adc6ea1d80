"""What DVC shows of the pipeline's runs: the training curves as files `dvc plots` can draw,
dvc.yaml's plots over them, the offline page template, and a sweep's best job as the
`dvc exp run` that reproduces it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from pipeline.commands.exp_from_sweep import experiment_command
from pipeline.errors import ConfigError
from pipeline.training import TRAIN_CURVE, TRAIN_CURVE_FIELDS, VALIDATION_CURVE, write_curves
from support import PROJECT, compose_params

# A two-phase run's history as train_model leaves it: phase 2's steps and epochs continue phase
# 1's; training, evaluation and summary entries mixed; one step without a gradient norm.
HISTORY = [
    {"loss": 0.70, "grad_norm": 0.5, "learning_rate": 1e-3, "epoch": 0.5, "step": 1,
     "phase": "head"},
    {"loss": 0.69, "learning_rate": 5e-4, "epoch": 1.0, "step": 2, "phase": "head"},
    {"eval_loss": 0.68, "eval_accuracy": 0.5, "eval_runtime": 0.2,
     "eval_samples_per_second": 80.0, "epoch": 1.0, "step": 2, "phase": "head"},
    {"train_runtime": 1.0, "train_loss": 0.695, "epoch": 1.0, "step": 2, "phase": "head"},
    {"loss": 0.60, "grad_norm": 0.7, "learning_rate": 1e-4, "epoch": 1.5, "step": 3,
     "phase": "full"},
    {"loss": 0.50, "grad_norm": 0.6, "learning_rate": 0.0, "epoch": 2.0, "step": 4,
     "phase": "full"},
    {"eval_loss": 0.55, "eval_accuracy": 0.75, "eval_runtime": 0.2,
     "eval_samples_per_second": 80.0, "epoch": 2.0, "step": 4, "phase": "full"},
    {"train_runtime": 1.0, "train_loss": 0.55, "epoch": 2.0, "step": 4, "phase": "full"},
]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_curves_are_one_file_of_training_steps_and_one_of_evaluations(tmp_path):
    """DVC draws a file only when all its rows have the same fields: the history's mixed
    entries become two homogeneous files, steps continuing across the phases."""
    write_curves(HISTORY, str(tmp_path / "curves"))
    train = _rows(tmp_path / "curves" / TRAIN_CURVE)
    assert [list(row) for row in train] == [list(TRAIN_CURVE_FIELDS)] * 4
    assert [int(row["step"]) for row in train] == [1, 2, 3, 4]
    assert [float(row["loss"]) for row in train] == [0.70, 0.69, 0.60, 0.50]
    assert train[1]["grad_norm"] == ""
    validation = _rows(tmp_path / "curves" / VALIDATION_CURVE)
    assert validation == [{"step": "2", "epoch": "1.0", "loss": "0.68", "accuracy": "0.5"},
                          {"step": "4", "epoch": "2.0", "loss": "0.55", "accuracy": "0.75"}]


def test_dvc_yaml_plots_read_the_curves_the_train_stage_writes():
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    curves_dir = params["paths"]["curves_dir"]
    train_outs = pipeline["stages"]["train"]["outs"]
    assert {"${paths.curves_dir}": {"cache": False}} in train_outs, "in git, for plots diff"
    fields = {TRAIN_CURVE: set(TRAIN_CURVE_FIELDS),
              VALIDATION_CURVE: {"step", "epoch", "loss", "${dataset.main_metric}"}}
    drawn = set()
    for plot in pipeline["plots"]:
        ((name, spec),) = plot.items()
        assert spec["x"] == "step", name
        for file, wanted in spec["y"].items():
            folder, _, file_name = file.replace("${paths.curves_dir}", curves_dir).rpartition("/")
            assert folder == curves_dir and file_name in fields, (name, file)
            assert {wanted} <= fields[file_name], (name, file, wanted)
            drawn.add((file_name, wanted))
    assert {(TRAIN_CURVE, "loss"), (VALIDATION_CURVE, "loss"), (TRAIN_CURVE, "learning_rate"),
            (VALIDATION_CURVE, "${dataset.main_metric}")} <= drawn


def test_offline_template_inlines_vega_and_is_named_in_the_local_dvc_config(tmp_path):
    from dvc.config import Config
    from dvc_render.html import HTML

    from pipeline.commands.offline_plots import install_template

    dvc_dir = tmp_path / ".dvc"
    dvc_dir.mkdir()
    page = install_template(dvc_dir).read_text()
    assert "window.vegaEmbed=" in page and "{plot_divs}" in page
    assert "<script src" not in page and "{scripts}" not in page, "nothing from a CDN"
    assert page.count("</script>") == 1, "the bundle does not end its own script early"
    assert Config(dvc_dir=str(dvc_dir)).load_one("local")["plots"]["html_template"] \
        == "plots.html"
    filled = HTML(page).with_element("<div id='loss'></div>").embed()
    assert "<div id='loss'></div>" in filled


def _sweep(tmp_path: Path, jobs: list[tuple[str, str, float | None]]) -> Path:
    """A finished sweep's folder: per job its override, status and validation accuracy, and
    the config it ran with (conf/'s default composition plus the override)."""
    sweep_dir = tmp_path / "multirun" / "2026-01-31" / "12-00-00-4242"
    for num, (override, status, accuracy) in enumerate(jobs):
        folder = sweep_dir / str(num)
        folder.mkdir(parents=True)
        record = {"num": num, "overrides": [override], "status": status,
                  "config": compose_params([override])}
        if accuracy is not None:
            record.update(main_metric="accuracy", validation={"loss": 0.5, "accuracy": accuracy})
        (folder / "job.json").write_text(json.dumps(record))
    return sweep_dir


def test_a_sweeps_best_job_becomes_the_dvc_exp_run_of_its_overrides(tmp_path):
    sweep_dir = _sweep(tmp_path, [("train.learning_rate=1e-5", "COMPLETED", 0.8),
                                  ("train.learning_rate=3e-5", "COMPLETED", 0.9),
                                  ("train.learning_rate=1", "FAILED", None)])
    assert experiment_command(sweep_dir, PROJECT, [], None, queue=False) == [
        "dvc", "exp", "run", "-n", "sweep-12-00-00-job1", "-S", "train.learning_rate=3e-5"]
    assert experiment_command(sweep_dir, PROJECT, ["seed=42"], "best", queue=True) == [
        "dvc", "exp", "run", "-n", "best", "--queue", "-S", "seed=42",
        "-S", "train.learning_rate=3e-5"]


def test_a_job_that_conf_does_not_compose_is_refused_naming_the_keys(tmp_path):
    """The job ran on a params.yaml made with `-S dataset=glue_sst2`: `dvc exp run -S` with its
    overrides alone would train on another dataset."""
    sweep_dir = _sweep(tmp_path, [("train.learning_rate=3e-5", "COMPLETED", 0.9)])
    record = json.loads((sweep_dir / "0" / "job.json").read_text())
    record["config"] = compose_params(["dataset=glue_sst2", "train.learning_rate=3e-5"])
    (sweep_dir / "0" / "job.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError) as error:
        experiment_command(sweep_dir, PROJECT, [], None, queue=False)
    message = str(error.value)
    assert 'dataset.name: "glue_sst2" in the job, "bbc_news" from conf/' in message
    assert "add the -S values params.yaml was made with" in message and "\n" not in message
    assert experiment_command(sweep_dir, PROJECT, ["dataset=glue_sst2"], None, queue=False)[-4:] \
        == ["-S", "dataset=glue_sst2", "-S", "train.learning_rate=3e-5"]


def test_a_sweep_without_a_finished_job_is_refused(tmp_path):
    sweep_dir = _sweep(tmp_path, [("train.learning_rate=1", "FAILED", None)])
    with pytest.raises(ConfigError, match="no finished job with validation metrics"):
        experiment_command(sweep_dir, PROJECT, [], None, queue=False)
    with pytest.raises(ConfigError, match="no such sweep folder"):
        experiment_command(tmp_path / "missing", PROJECT, [], None, queue=False)


def _job_config(tmp_path: Path, mode: RunMode):
    return OmegaConf.create({**compose_params(["train.learning_rate=3e-5"]), "hydra": {
        "mode": mode, "job": {"num": 3}, "runtime": {"output_dir": str(tmp_path)},
        "overrides": {"task": ["train.learning_rate=3e-5"]}}})


def test_every_sweep_job_leaves_its_metrics_and_config_also_without_a_parent_run(tmp_path):
    """Without an MLflow parent (the server was unreachable) the record is still written: it is
    what exp-from-sweep and the sweep's summary read. A single run writes none."""
    from hydra_plugins.mlflow_sweep.callback import MlflowSweepCallback

    callback = MlflowSweepCallback()
    assert callback.run_id is None
    done = JobReturn(status=JobStatus.COMPLETED, _return_value={"accuracy": 0.9, "loss": 0.3})
    callback.on_job_end(_job_config(tmp_path / "single", RunMode.RUN), done)
    assert not (tmp_path / "single" / "job.json").exists()
    callback.on_job_end(_job_config(tmp_path, RunMode.MULTIRUN), done)
    record = json.loads((tmp_path / "job.json").read_text())
    assert record["main_metric"] == "accuracy"
    assert record["validation"] == {"accuracy": 0.9, "loss": 0.3}
    assert record["config"] == compose_params(["train.learning_rate=3e-5"])
