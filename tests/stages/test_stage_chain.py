"""The five stages on tiny fixtures, in process: their outputs and the one MLflow run they share."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import datasets
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.artifacts import hash_path
from pipeline.config import load_config
from pipeline.contracts import LABEL, load_snapshot
from pipeline.registry import CHAMPION, LINEAGE_TAGS
from pipeline.tracking import MODEL_SHA_TAG, run_params, stage_run
from support import (
    PROJECT,
    assert_same_predictions,
    compose_params,
    free_port,
    paths_under,
    run,
    run_stages,
    subprocess_env,
    tiny_overrides,
    wait_until_serving,
)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_corpus, tiny_checkpoint):
    """Run download -> tokenize -> train -> evaluate -> report once; share the results."""
    root = tmp_path_factory.mktemp("chain")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    overrides = [*tiny_overrides(tiny_corpus, tiny_checkpoint), *paths_under(root)]
    cfg = load_config(OmegaConf.create(compose_params(overrides)))
    # Sampled every 0.2 s instead of 10, so that seconds of training leave system metrics.
    environment = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}
    previous = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        run_stages(cfg, "download", "tokenize", "train", "evaluate", "report")
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    return cfg, client, runs, uri


def test_snapshots_hold_named_splits_labels_and_safetensors(chain):
    cfg, *_ = chain
    raw = load_snapshot(cfg.paths.raw_dir)
    assert set(raw) == {"train", "validation", "test"}
    assert raw["train"].features[LABEL].names == ["negative", "positive"]
    checkpoint = Path(cfg.paths.pretrained_dir)
    assert (checkpoint / "model.safetensors").is_file() \
        and (checkpoint / "tokenizer.json").is_file()
    assert not list(checkpoint.glob("*.bin"))


def test_tokenized_data_is_unpadded_and_carries_token_type_ids(chain):
    cfg, *_ = chain
    tokenized = datasets.load_from_disk(cfg.paths.tokenized_dir)
    train = tokenized["train"]
    assert set(train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    lengths = {len(ids) for ids in train["input_ids"]}
    assert len(lengths) > 1, "rows were padded to one length"
    assert max(lengths) <= cfg.tokenize.max_length
    stats = json.loads((Path(cfg.paths.tokenized_dir) / "tokenize_stats.json").read_text())
    assert stats["splits"]["train"]["examples"] == len(train)
    assert 0.0 <= stats["splits"]["train"]["truncation_rate"] <= 1.0


def test_model_has_the_data_labels_and_safetensors(chain):
    cfg, *_ = chain
    config = json.loads((Path(cfg.paths.model_dir) / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert (Path(cfg.paths.model_dir) / "model.safetensors").is_file()
    pickles = [p.name for p in Path(cfg.paths.model_dir).iterdir()
               if p.suffix in (".bin", ".pt", ".pth")]
    assert not pickles, f"pickled files in the model directory: {pickles}"
    assert not Path(cfg.paths.trainer_checkpoints_dir).exists() or not any(
        Path(cfg.paths.trainer_checkpoints_dir).iterdir()), \
        "checkpoints kept after a successful run"


def test_metrics_predictions_and_confusion_agree(chain):
    cfg, *_ = chain
    metrics = json.loads(Path(cfg.paths.metrics_path).read_text())
    assert metrics["primary_split"] == "test"
    for split in ("validation", "test"):
        assert set(metrics[split]) == {"accuracy", "f1", "macro_f1", "mcc", "examples"}
    rows = [json.loads(line) for line in
            (Path(cfg.paths.predictions_dir) / "test.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["test"]["examples"] == 16
    for row in rows:
        probabilities = row["probabilities"]
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(probabilities, key=probabilities.get)
    accuracy = np.mean([row["label"] == row["gold"] for row in rows])
    assert metrics["test"]["accuracy"] == pytest.approx(accuracy)
    with open(cfg.paths.confusion_path) as handle:
        confusion = list(csv.DictReader(handle))
    assert [(c["actual"], c["predicted"]) for c in confusion] == \
        [(r["gold"], r["label"]) for r in rows]


def test_report_and_model_card(chain):
    cfg, *_ = chain
    report_dir = Path(cfg.paths.report_dir)
    text = (report_dir / "report.md").read_text()
    for image in ("training_curves.png", "confusion_matrix.png"):
        assert f"({image})" in text
        assert (report_dir / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Metrics" in text and "tiny_sentiment" in text
    release = Path(cfg.paths.release_dir)
    card = (release / "README.md").read_text()
    for section in ("## Intended use", "## Training data", "## Evaluation",
                    "## Limitations and bias"):
        assert section in card
    # The metadata the Hub reads: model-index with every labelled split's metrics.
    from huggingface_hub import ModelCard

    data = ModelCard.load(release / "README.md").data
    metrics = json.loads(Path(cfg.paths.metrics_path).read_text())
    hub_names = {"macro_f1": ("f1", "macro"), "mcc": ("matthews_correlation", None)}
    expected = {(split, *hub_names.get(name, (name, None))): value
                for split in ("validation", "test") for name, value in metrics[split].items()
                if name != "examples"}
    assert {(r.dataset_split, r.metric_type, r.metric_config): r.metric_value
            for r in data.eval_results} == expected
    assert (data.datasets, data.base_model, data.library_name) == \
        (["tiny_sentiment"], None, "transformers")
    assert (release / "model.safetensors").read_bytes() == \
        (Path(cfg.paths.model_dir) / "model.safetensors").read_bytes()


def test_int8_evaluation_records_its_cost_and_the_report_says_so(chain, tmp_path):
    cfg, *_ = chain
    out = tmp_path / "int8"
    paths = dataclasses.replace(cfg.paths, metrics_path=str(out / "metrics.json"),
                                predictions_dir=str(out / "predictions"),
                                confusion_path=str(out / "confusion.csv"),
                                report_dir=str(out / "report"), release_dir=str(out / "release"))
    int8 = dataclasses.replace(cfg, paths=paths, eval=dataclasses.replace(cfg.eval, quantize=True))
    run_stages(int8, "evaluate", "report")
    fp32 = json.loads(Path(cfg.paths.metrics_path).read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    record = metrics["test"].pop("quantization")
    assert record == {"dtype": "int8", "accuracy_fp32": fp32["test"]["accuracy"],
                      "accuracy_change": pytest.approx(metrics["test"]["accuracy"]
                                                       - fp32["test"]["accuracy"], abs=1e-6),
                      "changed_predictions": sum(
                          a["label"] != b["label"] for a, b in zip(_written(cfg), _written(int8)))}
    assert set(metrics["test"]) == set(metrics["validation"]) == set(fp32["test"])
    report = (out / "report" / "report.md").read_text()
    assert f"which score accuracy {fp32['test']['accuracy']:.4f} on **test**" in report
    assert "{" not in report.split("## Metrics")[1], "a record rendered as a dict"
    run = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id])[0]
    assert run.data.metrics["test_quantization_accuracy_change"] == record["accuracy_change"]


def test_one_mlflow_run_holds_the_whole_model_history(chain):
    cfg, client, runs, _ = chain
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["stages"] == "train,evaluate,report"
    for tag in ("git_commit", "dataset_sha256", "tokenized_sha256", "checkpoint_sha256",
                MODEL_SHA_TAG, "dataset_revision"):
        assert run.data.tags.get(tag), tag
    assert run.data.params["train.learning_rate"] == "0.001"
    assert run.data.params["model.path"] == cfg.model.path
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 2
    assert len(client.get_metric_history(run.info.run_id, "learning_rate")) >= 2
    for metric in ("test_accuracy", "test_f1", "validation_mcc"):
        assert metric in run.data.metrics
    logged = yaml.safe_load(
        mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config/params.yaml"))
    assert logged["train"]["learning_rate"] == 1e-3 and logged["seed"] == cfg.seed
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert "report/report.md" in artifacts and "report/README.md" in artifacts


def test_mlflow_params_are_the_resolved_config_and_a_few_trainer_values(chain):
    """Before: 212 params, every TrainingArguments field and the model's config beside the
    config's own (learning_rate and train.learning_rate, ...)."""
    cfg, _, runs, _ = chain
    params = runs[0].data.params
    trainer = {key for key in params if key.startswith("trainer.")}
    assert set(params) - trainer == set(run_params(cfg))
    assert not {key for key in params if key.startswith("paths.")}
    assert trainer == {"trainer.effective_batch_size", "trainer.gradient_accumulation_steps",
                       "trainer.optim", "trainer.max_grad_norm", "trainer.precision"}
    assert params["trainer.effective_batch_size"] == str(cfg.train.per_device_train_batch_size)
    assert len(params) <= 80


def test_mlflow_metrics_have_one_name_per_quantity_and_validation_curves_per_epoch(chain):
    """Before: eval_accuracy per epoch beside validation_accuracy. Now validation_* holds each
    epoch's value at its step, then, at the last step, the kept model's: the run's value."""
    cfg, client, runs, _ = chain
    run = runs[0]
    assert not [key for key in run.data.metrics if key.startswith("eval_")]
    history = json.loads(Path(cfg.paths.history_path).read_text())
    epochs = [entry["step"] for entry in history if "eval_loss" in entry]
    last = int(run.data.tags["train_steps"])
    assert last == max(entry["step"] for entry in history) and len(epochs) == 2
    for key in ("validation_loss", "validation_accuracy"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps[:2] == epochs and set(steps[2:]) == {last}, (key, steps)
    metrics = json.loads(Path(cfg.paths.metrics_path).read_text())
    assert run.data.metrics["validation_accuracy"] == metrics["validation"]["accuracy"]
    assert run.data.metrics["test_accuracy"] == metrics["test"]["accuracy"]


def test_each_split_of_the_dataset_is_a_run_input_with_its_digest(chain):
    cfg, _, runs, _ = chain
    inputs = {}
    for given in runs[0].inputs.dataset_inputs:
        tags = {tag.key: tag.value for tag in given.tags}
        inputs[tags["mlflow.data.context"]] = given.dataset, tags
    assert set(inputs) == {"train", "validation", "test"}
    rows = json.loads((Path(cfg.paths.raw_dir) / "manifest.json").read_text())["splits"]
    for split, (dataset, tags) in inputs.items():
        sha256 = hash_path(Path(cfg.paths.raw_dir) / f"{split}.parquet")
        assert (dataset.name, dataset.digest, tags["sha256"]) == \
            ("tiny_sentiment", sha256[:16], sha256)
        assert tags["rows"] == str(rows[split]["rows"])
        assert json.loads(dataset.source)["uri"].endswith(f"{split}.parquet")
        assert [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]] == \
            ["text", "label"]


def test_the_run_holds_system_metrics(chain):
    _, client, runs, _ = chain
    run = runs[0]
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/disk_usage_percentage"):
        assert client.get_metric_history(run.info.run_id, key), key


def test_logged_model_loads_and_classifies_new_text(chain):
    _, _, runs, uri = chain
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{runs[0].info.run_id}/model")
    prediction = model.predict(pd.DataFrame({"text": ["the film was great and charming"]}))
    assert prediction[0]["label"] in {"negative", "positive"}
    assert sum(prediction[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def _fail():
    raise RuntimeError("boom")


def _interrupt():
    raise KeyboardInterrupt


def _terminate():
    signal.raise_signal(signal.SIGTERM)


@pytest.mark.parametrize("stop, status", [(_fail, "FAILED"), (_interrupt, "KILLED"),
                                          (_terminate, "KILLED")])
def test_failed_or_stopped_run_is_not_left_running(chain, stop, status):
    cfg, client, _, uri = chain
    os.environ["MLFLOW_TRACKING_URI"] = uri  # restored by the autouse fixture
    handler = signal.getsignal(signal.SIGTERM)
    with (pytest.raises(BaseException) as raised,
          stage_run("train", cfg, run_name=f"doomed-{stop.__name__}") as run):
        stop()
    assert not isinstance(raised.value, AssertionError)
    assert client.get_run(run.info.run_id).info.status == status
    assert signal.getsignal(signal.SIGTERM) is handler, "the SIGTERM handler is restored"


def _written(cfg, split="test") -> list[dict]:
    return [json.loads(line) for line in
            (Path(cfg.paths.predictions_dir) / f"{split}.jsonl").read_text().splitlines()]


def test_predict_command_reproduces_the_evaluate_stage(chain, tmp_path):
    cfg, *_ = chain
    written = _written(cfg)
    source = tmp_path / "rows.csv"
    with open(source, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows((i, row["text"]) for i, row in enumerate(written))
    output = tmp_path / "out.jsonl"
    done = run([sys.executable, "-m", "pipeline.commands", "predict",
                "--model", cfg.paths.model_dir, "--input", str(source), "--output", str(output),
                "--batch-size", "5"], PROJECT)
    assert "rows" in done.stderr  # the progress bar
    predicted = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["id"] for row in predicted] == [str(i) for i in range(len(written))]
    assert_same_predictions(predicted, written)


def test_predict_reads_arguments_and_stdin(chain, capsys, monkeypatch):
    from pipeline.commands.predict import main

    cfg, *_ = chain
    written = _written(cfg)[:3]
    assert main(["--model", cfg.paths.model_dir, *(row["text"] for row in written)]) == 0
    from_args = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert_same_predictions(from_args, written)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(row["text"] + "\n" for row in written)))
    assert main(["--model", cfg.paths.model_dir]) == 0
    from_stdin = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert from_stdin == from_args


def test_predict_names_the_bad_input(chain, tmp_path, capsys):
    from pipeline.commands.predict import main

    cfg, *_ = chain
    source = tmp_path / "rows.jsonl"
    source.write_text('{"text": "fine"}\n{"sentence": "no text column"}\n')
    output = tmp_path / "out.jsonl"
    assert main(["--model", cfg.paths.model_dir, "--input", str(source),
                 "--output", str(output)]) == 1
    assert f"{source}:2: no column 'text'" in capsys.readouterr().err
    assert not output.exists() and not list(tmp_path.glob("*.tmp")), "no partial output"
    assert main(["--model", str(tmp_path / "nowhere"), "some text"]) == 1
    assert "not a model folder" in capsys.readouterr().err
    assert main(["--model", "runs:/0123456789abcdef/model", "some text"]) == 1
    assert "runs:/0123456789abcdef/model: could not load the MLflow model" in \
        capsys.readouterr().err


def test_predict_error_mid_file_starts_its_own_line_and_leaves_no_output(chain, tmp_path,
                                                                         capsys):
    # Before: the error was printed on the progress bar's line.
    from pipeline.commands.predict import main

    cfg, *_ = chain
    source = tmp_path / "rows.jsonl"
    source.write_text('{"text": "the film was great"}\n{"text": "dull"}\n{"sentence": "x"}\n')
    output = tmp_path / "out.jsonl"
    assert main(["--model", cfg.paths.model_dir, "--input", str(source),
                 "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert "rows/s" in err, "the progress bar had started"
    assert f"\npredict: error: {source}:3: no column 'text'" in err
    assert [line for line in err.splitlines() if "predict: error" in line] == \
        [err.splitlines()[-1]]
    assert not output.exists() and not list(tmp_path.glob("*.tmp")), "no partial output"


def test_predict_names_a_bad_byte_mid_file_and_reads_the_file_with_encoding(chain, tmp_path,
                                                                            capsys):
    # Before: a UnicodeDecodeError traceback.
    from pipeline.commands.predict import main

    cfg, *_ = chain
    output = tmp_path / "out.jsonl"
    source = tmp_path / "rows.csv"
    source.write_bytes(b"id,text\n0,the film was great\n1,dull and slow\n2,caf\xe9 scene\n")
    assert main(["--model", cfg.paths.model_dir, "--input", str(source),
                 "--output", str(output)]) == 1
    offset = source.read_bytes().index(b"\xe9")
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"predict: error: {source}:4: byte 0xe9 at byte offset {offset} is not valid utf-8; if "
        "the file is in another encoding, pass --encoding (e.g. cp1252 or latin-1)")
    assert not output.exists() and not list(tmp_path.glob("*.tmp")), "no partial output"
    assert main(["--model", cfg.paths.model_dir, "--input", str(source), "--encoding", "cp1252",
                 "--output", str(output)]) == 0
    predicted = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["text"] for row in predicted] == ["the film was great", "dull and slow",
                                                  "caf\u00e9 scene"]


def test_predict_decodes_stdin_with_the_encoding_and_an_empty_stdin_gives_no_output(
        chain, capsys, monkeypatch):
    from pipeline.commands.predict import main

    cfg, *_ = chain
    piped = b"the film was great\r\ncaf\xe9 scene\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped)))
    assert main(["--model", cfg.paths.model_dir]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (  # after transformers' loading bar
        "predict: error: <stdin>:2: byte 0xe9 at byte offset 23 is not valid utf-8; if the file "
        "is in another encoding, pass --encoding (e.g. cp1252 or latin-1)")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped)))
    assert main(["--model", cfg.paths.model_dir, "--encoding", "cp1252"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["text"] for row in rows] == ["the film was great", "caf\u00e9 scene"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert main(["--model", cfg.paths.model_dir]) == 0
    assert capsys.readouterr().out == ""


def test_predict_loads_the_mlflow_model_of_the_run(chain, capsys, monkeypatch):
    from pipeline.commands.predict import main

    cfg, _, runs, uri = chain
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    written = _written(cfg)[:4]
    assert main(["--model", f"runs:/{runs[0].info.run_id}/model",
                 *(row["text"] for row in written)]) == 0
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert_same_predictions(predicted, written)


def test_train_registers_its_model_with_its_lineage_as_the_champion(chain):
    cfg, client, runs, _ = chain
    run = runs[0]
    version = client.get_model_version_by_alias(cfg.tracking.registered_model, CHAMPION)
    assert cfg.tracking.registered_model == "tiny_sentiment", "named after the dataset"
    assert (str(version.version), version.run_id) == ("1", run.info.run_id)
    lineage = {key: run.data.tags[key] for key in LINEAGE_TAGS if key in run.data.tags}
    assert {"git_commit", "dataset_sha256", "tokenized_sha256", "checkpoint_sha256",
            MODEL_SHA_TAG} <= set(lineage)
    assert version.tags == {**lineage, "validation_accuracy":
                            repr(run.data.metrics["validation_accuracy"])}


def test_predict_loads_the_registry_champion(chain, capsys, monkeypatch):
    from pipeline.commands.predict import main

    cfg, _, _, uri = chain
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    written = _written(cfg)[:4]
    assert main(["--model", f"models:/{cfg.tracking.registered_model}@{CHAMPION}",
                 *(row["text"] for row in written)]) == 0
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert_same_predictions(predicted, written)


def test_mlflow_models_serve_of_the_champion_answers_with_the_evaluate_predictions(chain,
                                                                                   tmp_path):
    cfg, _, _, uri = chain
    written = _written(cfg)[:5]
    port = free_port()
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
             f"models:/{cfg.tracking.registered_model}@{CHAMPION}", "--host", "127.0.0.1",
             "--port", str(port), "--env-manager", "local"],
            env=subprocess_env(MLFLOW_TRACKING_URI=uri), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_serving(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log",
                               timeout=180)
            body = json.dumps({"dataframe_records": [{"text": row["text"]} for row in written]})
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                             data=body.encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
        finally:
            server.terminate()
            server.wait(timeout=30)
    assert_same_predictions(answer["predictions"], written)
