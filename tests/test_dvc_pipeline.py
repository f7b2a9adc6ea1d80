"""`dvc repro` end to end in a temporary git repository, Hydra multirun, and bad input at the
CLI."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from support import (
    compose_params,
    dvc_executable,
    make_project,
    run,
    subprocess_env,
    tiny_overrides,
)

STAGES = ["download", "tokenize", "train", "evaluate", "report"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_corpus, tiny_checkpoint):
    """A project copy on the tiny config after one `dvc repro` under the usual umask 022,
    tracking to its default database."""
    root = make_project(tmp_path_factory.mktemp("e2e") / "project",
                        compose_params(tiny_overrides(tiny_corpus, tiny_checkpoint)))
    env = subprocess_env(MLFLOW_TRACKING_URI=None)  # exercise the embedded default
    done = run([dvc_executable(), "repro"], root, env=env, umask=0o022)
    return root, env, done


def _runs(root: Path, experiment: str = "tiny_sentiment"):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client, client.search_runs([experiment_id])


def test_repro_runs_every_stage_and_leaves_its_outputs(project):
    root, _, done = project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in done.stdout
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key in ("raw_dir", "pretrained_dir", "tokenized_dir", "model_dir", "predictions_dir",
                "report_dir", "release_dir"):
        assert any((root / params["paths"][key]).iterdir()), key
    metrics = json.loads((root / params["paths"]["metrics_path"]).read_text())
    assert {"accuracy", "f1", "mcc"} <= set(metrics["test"])
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)


def test_outputs_are_readable_by_group_and_others_under_umask_022(project):
    """A released model (and every other output) can be shared as it is: folders 0755, files
    0644, as the umask says, down to the MLflow copies of the model."""
    root, *_ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    tops = [root / params["paths"][key] for key in ("raw_dir", "pretrained_dir", "tokenized_dir",
                                                    "model_dir", "history_path", "metrics_path",
                                                    "predictions_dir", "report_dir",
                                                    "release_dir")] + [root / "mlartifacts"]
    private = []
    for top in tops:
        for path in [top, *top.rglob("*")]:
            mode = path.stat().st_mode & 0o777
            if mode != (0o755 if path.is_dir() else 0o644):
                private.append(f"{oct(mode)} {path.relative_to(root)}")
    assert not private, "\n".join(private)


def test_second_repro_is_a_no_op(project):
    root, env, _ = project
    done = run([dvc_executable(), "repro"], root, env=env)
    assert "Running stage" not in done.stdout
    assert "Data and pipelines are up to date." in done.stdout


def test_dag_is_download_tokenize_train_evaluate_report(project):
    root, env, _ = project
    done = run([dvc_executable(), "dag", "--dot"], root, env=env)
    edges = {tuple(part.strip().strip('"') for part in line.rstrip(";").split("->"))
             for line in done.stdout.splitlines() if "->" in line}
    for upstream, downstream in zip(STAGES, STAGES[1:]):
        assert (upstream, downstream) in edges


def test_the_run_is_in_the_project_database_with_model_and_lineage(project):
    root, *_ = project
    client, runs = _runs(root)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_ = runs[0]
    assert run_.data.tags["stages"] == "train,evaluate,report"
    assert len(run_.data.tags["git_commit"]) == 40
    assert "test_accuracy" in run_.data.metrics
    assert {a.path for a in client.list_artifacts(run_.info.run_id)} >= {"report", "predictions"}
    assert run_.outputs.model_outputs, "the trained model is logged to the run"
    assert (root / "mlartifacts").is_dir(), "artifacts should stay inside the project"


def test_changing_a_train_param_reruns_only_downstream_stages(project, tmp_path):
    root, env, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["learning_rate"] = 2e-3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run([dvc_executable(), "status", "--json"], root, env=env)
    changed = set(json.loads(status.stdout))
    # report prints the train params, so it is stale too; evaluate follows once the model changes
    assert changed == {"train", "report"}, changed
    done = run([dvc_executable(), "repro"], root, env=env)
    assert "Running stage 'download'" not in done.stdout
    assert "Running stage 'tokenize'" not in done.stdout
    for stage in ("train", "evaluate", "report"):
        assert f"Running stage '{stage}'" in done.stdout
    _, runs = _runs(root)
    assert len(runs) == 2


def test_multirun_gives_one_child_run_per_job_under_a_parent(project):
    """The basic launcher runs the jobs one after another in one process: nothing may leak
    from one job into the next (active MLflow run, seeds, model, data)."""
    root, env, _ = project
    before = run([dvc_executable(), "status", "--json"], root, env=env).stdout
    # params.yaml now says 2e-3 (see the test above), so `dvc repro` trained that model in a
    # process of its own; the sweep trains it again as its second job, after another one.
    done = run(["python", "-m", "stages.train", "-m", "train.learning_rate=3e-3,2e-3",
                "tracking.log_sweep_models=true"], root, env=env)
    client, runs = _runs(root)
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1, done.stdout
    parent = parents[0]
    children = sorted((r for r in runs
                       if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: r.data.tags["sweep_job"])
    assert [c.data.params["train.learning_rate"] for c in children] == ["0.003", "0.002"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs"] == "2"
    assert parent.data.tags["launcher"] == "BasicLauncher"
    assert "train.learning_rate=3e-3,2e-3" in parent.data.params["search_space"]
    assert all(client.search_logged_models([parent.info.experiment_id],
                                           filter_string=f"source_run_id = '{c.info.run_id}'")
               for c in children), "asked to, every job logs its model"
    repro_run = next(r for r in runs if r.data.params.get("train.learning_rate") == "0.002"
                     and "mlflow.parentRunId" not in r.data.tags and "sweep" not in r.data.tags)
    assert children[1].data.tags["model_sha256"] == repro_run.data.tags["model_sha256"], \
        "the second job must train exactly what a fresh process trains"
    job_models = sorted(root.glob("multirun/*/*/*/model/model.safetensors"))
    assert len(job_models) == 2, "each job writes its model into its own job folder"
    after = run([dvc_executable(), "status", "--json"], root, env=env).stdout
    assert after == before, "a sweep must not touch the DVC outputs"


BAD_INPUTS = {
    "missing column": (["dataset.text_column=review"], "column 'review' not found"),
    "unknown label": ([], "label 'neutral' in column 'label' is not one of the label set"),
    "empty text": ([], "column 'sentence' is empty"),
    "malformed tsv": (["dataset.format=tsv"], "malformed row: expected 2 tab-separated fields"),
    "config typo": (["+train.learnin_rate=1"], "unknown key 'train.learnin_rate'"),
    "not utf-8": (["dataset.format=csv"], "train.csv:3: byte 0xe9 at byte offset 37 is not valid "
                  "utf-8; if the file is in another encoding, set dataset.encoding"),
}


def _bad_source(kind: str, folder: Path) -> Path:
    folder.mkdir()
    if kind == "malformed tsv":
        (folder / "train.tsv").write_text("sentence\tlabel\ngood film\tpositive\nno label here\n")
        return folder
    if kind == "not utf-8":  # cp1252, as spreadsheet programs on Windows save csv
        (folder / "train.csv").write_bytes(b"sentence,label\ngood film,positive\n"
                                           b"caf\xe9 scene,negative\n")
        return folder
    rows = [{"sentence": "good film", "label": "positive"},
            {"sentence": "bad", "label": "negative"}]
    if kind == "unknown label":
        rows.append({"sentence": "meh", "label": "neutral"})
    if kind == "empty text":
        rows.append({"sentence": " ", "label": "negative"})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_leaves_no_output(project, tmp_path, kind):
    root, env, _ = project
    overrides, expected = BAD_INPUTS[kind]
    source = _bad_source(kind, tmp_path / "source")
    raw_dir = tmp_path / "raw"
    done = run(["python", "-m", "stages.download", f"dataset.path={source}",
                f"paths.raw_dir={raw_dir}", f"paths.pretrained_dir={tmp_path / 'checkpoint'}",
                *overrides], root, check=False, env=env)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("download: error: "), done.stderr
    assert expected in lines[0]
    if kind != "config typo":
        assert str(source) in lines[0], "the error names the file"
    assert not raw_dir.exists() and not (tmp_path / "checkpoint").exists()
    assert "Traceback" not in done.stderr
    assert ".partial" not in lines[0], "the error names the source, not a temporary output"


def test_a_stage_run_before_its_inputs_exist_says_which_is_missing(project, tmp_path):
    root, env, _ = project
    missing = tmp_path / "tokenized"
    done = run(["python", "-m", "stages.train", f"paths.tokenized_dir={missing}"], root,
               check=False, env=env)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"train: error: {missing} not found: run the stage that "
                                   "writes it first (`dvc repro` runs them in order)")


# Appending a comment to a module changes its hash, not its behaviour: `dvc status` then lists
# exactly the stages that list the module as a code dep (the import graph, see dvc.yaml).
EDITS = {
    "pipeline/sources.py": {"download"},          # the tsv reader
    "pipeline/heads.py": {"train", "evaluate"},   # the pooled head; evaluate loads models with it
    "pipeline/metrics.py": {"train", "evaluate", "report"},
}


@pytest.mark.parametrize("module", sorted(EDITS))
def test_editing_a_module_invalidates_only_the_stages_that_import_it(project, module):
    root, env, _ = project
    before = set(json.loads(run([dvc_executable(), "status", "--json"], root, env=env).stdout))
    path = root / module
    original = path.read_text()
    try:
        path.write_text(original + "# a comment\n")
        after = set(json.loads(run([dvc_executable(), "status", "--json"], root, env=env).stdout))
    finally:
        path.write_text(original)
    assert after - before == EDITS[module] - before
    assert not {"download", "tokenize"} & (after - before) or module == "pipeline/sources.py"


def test_temp_experiment_reports_to_the_project_database(project, tiny_corpus, tiny_checkpoint):
    """`dvc exp run --temp` composes conf/ and runs in .dvc/tmp; its run must reach mlflow.db."""
    root, env, _ = project
    experiment = root / "conf" / "experiment" / "tiny.yaml"
    experiment.write_text("# @package _global_\n" + yaml.safe_dump({
        "defaults": [{"override /dataset": "glue_sst2"}, {"override /train": "smoke"}],
        "dataset": {"name": "tiny_sentiment", "source": "local", "path": str(tiny_corpus),
                    "format": "jsonl", "revision": None, "id_column": None,
                    "submission_name": None},
        "model": {"name": "tiny_bert", "source": "local", "path": str(tiny_checkpoint),
                  "revision": None, "base_model": None, "license": None},
        "tokenize": {"max_length": 32},
        "train": {"max_train_samples": None, "max_eval_samples": None},
    }, sort_keys=False))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny experiment", "--no-verify"], root)
    run([dvc_executable(), "exp", "run", "--temp", "-n", "tiny-temp", "-S", "experiment=tiny"],
        root, env=env)
    _, runs = _runs(root)
    temp_runs = [r for r in runs if r.data.tags.get("dvc_exp_name") == "tiny-temp"]
    assert len(temp_runs) == 1 and temp_runs[0].info.status == "FINISHED"
    # Named after the DVC experiment; runs of `dvc repro` after another config, not alike.
    assert temp_runs[0].info.run_name == "tiny-temp"
    repro = [r for r in runs if "dvc_exp_name" not in r.data.tags
             and "mlflow.parentRunId" not in r.data.tags and "sweep" not in r.data.tags]
    names = {r.data.params["train.learning_rate"]: r.info.run_name for r in repro}
    assert len(set(names.values())) == len(names) and "tiny-temp" not in names.values(), names
    assert temp_runs[0].data.tags["stages"] == "train,evaluate,report"
    shown = run([dvc_executable(), "exp", "show", "--json"], root, env=env).stdout
    assert "tiny-temp" in shown
