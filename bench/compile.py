"""Does `torch.compile` pay for the train step on this machine? Eager against compiled, MRPC.

    python bench/compile.py [--glue ../shared/data/glue] [--steps 300] [--batch-size 8]

The train step the stage runs on CPU (MiniLM-L6, bf16 autocast where the CPU has native bf16,
else fp32; fused AdamW; batches grouped by length) on MRPC pairs, in four arms, each in a fresh
process with the same weights and batches: eager; `torch.compile(dynamic=True)` (one graph for
every length); and `torch.compile` on lengths padded to multiples of 32 (at most four shapes up
to 128 tokens), the latter twice: with an empty inductor cache, then with the cache the first run
left (a user's second run). Per arm: the first step (compilation), the median step of the second
half (steady state), the time compilation costs beyond steady steps, and how many steps the
steady gain needs to repay it, against the step count of the `mrpc_minilm` preset (3 epochs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT)]

ARMS = {  # name: (compile mode, pad_to_multiple_of, inductor cache)
    "eager": (None, None, "none"),
    "compile dynamic": ("dynamic", None, "cold"),
    "compile, lengths x32": ("static", 32, "cold"),
    "same, warm cache": ("static", 32, "warm"),
}


def prepare(glue: str, work: Path) -> None:
    """MRPC's snapshot, the pretrained checkpoint and the tokenized data, as the stages do."""
    import datasets
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.config import load_config
    from pipeline.preparation import prepare_and_save
    from pipeline.pretrained import snapshot_pretrained
    from pipeline.tokenization import tokenize_dataset

    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        composed = compose(config_name="config", overrides=[
            "experiment=mrpc_minilm", "dataset.source=local", f"dataset.path={glue}/mrpc"])
    cfg = load_config(OmegaConf.create(OmegaConf.to_container(composed, resolve=True)))
    datasets.disable_progress_bars()
    prepare_and_save(cfg.dataset, cfg.seed, str(work / "raw"))
    snapshot_pretrained(cfg.model, str(work / "ckpt"))
    tokenize_dataset(str(work / "raw"), str(work / "ckpt"), str(work / "tok"),
                     cfg.tokenize.max_length)


def arm(name: str, work: Path, steps: int, batch_size: int) -> dict:
    """One arm's train steps, in this (fresh) process."""
    import datasets
    import torch
    from transformers import DataCollatorWithPadding

    from pipeline.config import HeadConfig
    from pipeline.contracts import LABELS, load_pretrained_tokenizer
    from pipeline.modeling import build_model
    from pipeline.training import resolve_precision

    mode, multiple, _ = ARMS[name]
    _, precision, _ = resolve_precision("auto")
    train = datasets.load_from_disk(str(work / "tok"))["train"]
    rows = [{k: v for k, v in row.items() if k in ("input_ids", "token_type_ids",
                                                    "attention_mask", LABELS)} for row in train]
    # Length-grouped like the stage's sampler: sorted within shuffled chunks of 50 batches.
    random.Random(0).shuffle(rows)
    batches = []
    for start in range(0, len(rows), 50 * batch_size):
        chunk = sorted(rows[start:start + 50 * batch_size], key=lambda r: len(r["input_ids"]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    random.Random(1).shuffle(batches)
    collate = DataCollatorWithPadding(load_pretrained_tokenizer(str(work / "ckpt")),
                                      pad_to_multiple_of=multiple)
    torch.manual_seed(0)
    model, _ = build_model(str(work / "ckpt"), ["not_equivalent", "equivalent"],
                           HeadConfig(type="auto"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    forward = model if mode is None else torch.compile(model, dynamic=mode == "dynamic")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times, shapes = [], set()
    for rows_of_batch in batches[:steps]:
        batch = collate(rows_of_batch)
        shapes.add(batch["input_ids"].shape[1])
        start = time.perf_counter()
        with autocast:
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"precision": precision, "steps": len(times), "total": sum(times),
            "first": times[0], "steady": statistics.median(times[len(times) // 2:]),
            "shapes": len(shapes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue",
                        default=str(Path(__file__).resolve().parents[2] / "shared/data/glue"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--internal-arm", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.internal_arm:
        print(json.dumps(arm(args.internal_arm, args.work, args.steps, args.batch_size)))
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(args.glue, work)
        results = {}
        for name, (_, _, cache) in ARMS.items():
            # Cold arms get an empty inductor cache; the warm arm reuses the one before it.
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
                   "PYTHONPATH": str(PROJECT)}
            if cache == "cold":
                env["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{len(results)}")
            elif cache == "warm":
                env["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{len(results) - 1}")
            done = subprocess.run([sys.executable, __file__, "--internal-arm", name,
                                   "--work", str(work), "--steps", str(args.steps),
                                   "--batch-size", str(args.batch_size)],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"arm {name!r} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    preset_steps = 3 * math.ceil(3668 / args.batch_size)  # MRPC train rows, 3 epochs
    eager = results["eager"]["steady"]
    print(f"MiniLM-L6 train steps on MRPC, batch {args.batch_size}, {args.steps} steps, "
          f"{results['eager']['precision']}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; the preset's 3 epochs: {preset_steps} steps")
    for name, r in results.items():
        overhead = r["total"] - r["steps"] * r["steady"]
        gain = eager - r["steady"]
        repay = ("-" if r is results["eager"] else
                 f"{overhead / gain:,.0f} steps" if gain > 0 else "never")
        projected = overhead + preset_steps * r["steady"]
        print(f"  {name:<22} first step {r['first']:6.1f} s, steady {r['steady'] * 1000:6.1f} "
              f"ms ({eager / r['steady']:.2f}x eager), {r['shapes']:>2} shapes, start-up cost "
              f"{overhead:6.1f} s, repaid after {repay}; the preset's steps: {projected:5.0f} s")


if __name__ == "__main__":
    main()
