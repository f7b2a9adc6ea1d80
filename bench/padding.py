"""Why the tokenize stage does not pad: train-step throughput, padded per batch vs to max_length.

Runs the same MiniLM-L6 training steps on the same SST-2 batches twice, interleaved so machine
noise hits both alike, and prints examples/s for each and their ratio.

    python bench/padding.py [--glue ../shared/data/glue] [--steps 20] [--max-length 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
from transformers import DataCollatorWithPadding

from pipeline.config import load_config
from pipeline.contracts import load_pretrained_tokenizer
from pipeline.modeling import build_model
from pipeline.preparation import prepare_and_save
from pipeline.pretrained import snapshot_pretrained
from pipeline.tokenization import tokenize_dataset

PROJECT = Path(__file__).resolve().parents[1]


def sst2_config(glue: str):
    """The project's SST-2 config on the local GLUE copy, with MiniLM-L6 (conf/ composed)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        composed = compose(config_name="config", overrides=[
            "dataset=glue_sst2", "dataset.source=local", f"dataset.path={glue}/sst2",
            "model=minilm_l6"])
    return load_config(OmegaConf.create(OmegaConf.to_container(composed, resolve=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue",
                        default=str(Path(__file__).resolve().parents[2] / "shared/data/glue"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        cfg = sst2_config(args.glue)
        prepare_and_save(cfg.dataset, 0, str(work / "raw"))
        snapshot_pretrained(cfg.model, str(work / "ckpt"))
        tokenize_dataset(str(work / "raw"), str(work / "ckpt"), str(work / "tok"), args.max_length)
        train = datasets.load_from_disk(str(work / "tok"))["train"].shuffle(seed=0)
        tokenizer = load_pretrained_tokenizer(str(work / "ckpt"))
        collators = {
            "per batch": DataCollatorWithPadding(tokenizer),
            "max_length": DataCollatorWithPadding(tokenizer, padding="max_length",
                                                  max_length=args.max_length),
        }
        model, _ = build_model(str(work / "ckpt"), ["negative", "positive"], cfg.head)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        timings: dict[str, list[float]] = {name: [] for name in collators}
        tokens: dict[str, int] = {name: 0 for name in collators}
        for step in range(args.steps):
            rows = train.select(range(step * args.batch_size, (step + 1) * args.batch_size))
            features = [rows[i] for i in range(len(rows))]
            for name, collate in collators.items():
                batch = collate(features)
                start = time.perf_counter()
                loss = model(**batch).loss
                loss.backward()
                optimizer.zero_grad()  # same weights for both arms: no optimizer.step()
                timings[name].append(time.perf_counter() - start)
                tokens[name] += batch["input_ids"].numel()
    print(f"MiniLM-L6 train steps on SST-2, batch {args.batch_size}, {args.steps} steps, "
          f"max_length {args.max_length}, {torch.get_num_threads()} threads")
    for name in collators:
        median = statistics.median(timings[name])
        print(f"  pad {name:<10}: {args.batch_size / median:8.1f} examples/s  "
              f"(median step {median * 1000:.0f} ms, {tokens[name] / args.steps:.0f} tokens/batch)")
    ratio = statistics.median(timings["max_length"]) / statistics.median(timings["per batch"])
    print(f"  per-batch padding is {ratio:.2f}x the throughput of padding to max_length")


if __name__ == "__main__":
    main()
