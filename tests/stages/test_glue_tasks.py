"""Every GLUE task config through the whole pipeline, on tiny fixtures with the Hub's schema."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from pipeline.config import load_config
from support import (
    assert_same_predictions,
    compose_params,
    run_stages,
    tiny_overrides,
    write_glue_fixture,
)

# task: (metrics, labelled evaluation splits, submission files)
TASKS = {
    "cola": (["mcc"], ["validation"], ["CoLA.tsv"]),
    "sst2": (["accuracy"], ["validation"], ["SST-2.tsv"]),
    "mrpc": (["accuracy", "f1"], ["validation"], ["MRPC.tsv"]),
    "qqp": (["accuracy", "f1"], ["validation"], ["QQP.tsv"]),
    "stsb": (["pearson", "spearman"], ["validation"], ["STS-B.tsv"]),
    "mnli": (["accuracy"], ["validation_matched", "validation_mismatched"],
             ["MNLI-m.tsv", "MNLI-mm.tsv"]),
    "qnli": (["accuracy"], ["validation"], ["QNLI.tsv"]),
    "rte": (["accuracy"], ["validation"], ["RTE.tsv"]),
    "wnli": (["accuracy"], ["validation"], ["WNLI.tsv"]),
}


def run_task(task: str, root: Path, tiny_corpus: Path, tiny_checkpoint: Path):
    dataset = compose_params([f"dataset=glue_{task}"])["dataset"]
    fixture = write_glue_fixture(root / "source", dataset)
    overrides = [o for o in tiny_overrides(tiny_corpus, tiny_checkpoint) if not o.startswith(
        ("dataset", "train.num_train_epochs"))]
    overrides += [f"dataset=glue_{task}", "dataset.source=local", f"dataset.path={fixture}",
                  "dataset.revision=null", "tracking.log_model=false"]
    params = compose_params(overrides)
    for key, value in params["paths"].items():
        params["paths"][key] = str(root / value)
    cfg = load_config(OmegaConf.create(params))
    run_stages(cfg, "download", "tokenize", "train", "evaluate", "report")
    return cfg


@pytest.mark.parametrize("task", list(TASKS))
def test_glue_task_runs_end_to_end_with_its_own_metrics(task, tmp_path, tiny_corpus,
                                                        tiny_checkpoint):
    metric_names, labelled, submissions = TASKS[task]
    cfg = run_task(task, tmp_path, tiny_corpus, tiny_checkpoint)

    metrics = json.loads(Path(cfg.paths.metrics_path).read_text())
    assert metrics["primary_split"] == labelled[0]
    assert sorted(k for k in metrics if k != "primary_split") == sorted(labelled)
    for split in labelled:
        assert set(metrics[split]) == {*metric_names, "examples"}

    run = mlflow.search_runs(experiment_names=[cfg.tracking.experiment_name],
                             output_format="list")[0]
    assert run.info.status == "FINISHED"
    for split in labelled:
        for name in metric_names:
            assert f"{split}_{name}" in run.data.metrics
    # Per epoch from training, then the kept model's: one name, validation_<metric>.
    assert len(mlflow.MlflowClient().get_metric_history(
        run.info.run_id, f"validation_{cfg.dataset.main_metric}")) >= 2

    # The hidden test sets: predictions in GLUE's submission format, one per row, in order.
    folder = Path(cfg.paths.predictions_dir) / "submission"
    assert sorted(p.name for p in folder.iterdir()) == sorted(submissions)
    model_config = json.loads((Path(cfg.paths.model_dir) / "config.json").read_text())
    for name in submissions:
        with open(folder / name) as handle:
            rows = list(csv.reader(handle, delimiter="\t"))
        assert rows[0] == ["index", "prediction"]
        assert [int(r[0]) for r in rows[1:]] == list(range(12))
        values = {r[1] for r in rows[1:]}
        if task == "stsb":
            assert all(re.fullmatch(r"-?\d+\.\d{3}", v) for v in values), values  # scores
        elif cfg.dataset.submission_labels == "names":
            assert values <= set(cfg.dataset.label_names)
        else:
            assert values <= {"0", "1"}
    if task == "stsb":
        assert len(model_config["id2label"]) == 1
        assert model_config["problem_type"] == "regression"
        row = json.loads((Path(cfg.paths.predictions_dir) / "validation.jsonl")
                         .read_text().splitlines()[0])
        assert set(row) == {"text", "text_pair", "idx", "gold", "score"}  # no softmax
    if task == "mnli":
        assert list(model_config["id2label"].values()) == ["entailment", "neutral",
                                                           "contradiction"]

    # Inference on the same rows gives what the evaluate stage wrote (pairs, three classes,
    # regression scores alike).
    from pipeline.inference import Classifier

    written = [json.loads(line) for line in
               (Path(cfg.paths.predictions_dir) / f"{labelled[0]}.jsonl").read_text().splitlines()]
    inputs = [{k: row[k] for k in ("text", "text_pair") if k in row} for row in written]
    predicted = list(Classifier(cfg.paths.model_dir).predict(inputs))
    assert_same_predictions(predicted, written)

