"""How training time grows: SST-2 at 10 / 30 / 100 % of the training rows (64 tokens), and at
max_length 64 / 128 / 256 (10 % of the rows), one epoch of the `sst2_minilm` preset each.

    python bench/scale.py [--glue ../shared/data/glue] [--fractions 0.1 0.3 1]
                          [--lengths 64 128 256]

Each point is the train stage in a fresh process (bench/speed.py's pipeline arm); it prints the
training time, the real (non-pad) and padded tokens it processed, and seconds per million real
tokens: a constant column means time grows linearly with real tokens. A least-squares line
through (real tokens, seconds) and its R^2 close the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import PROJECT, composed, load, machine, run_arm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glue", type=Path, default=PROJECT.parent / "shared" / "data" / "glue")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hf-text-pipeline-scale"))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--length-fraction", type=float, default=0.1)
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from stages.download import download
    from stages.tokenize import tokenize

    shutil.rmtree(args.work, ignore_errors=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{args.work / 'mlflow.db'}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT),
                                                       os.environ.get("PYTHONPATH")]))}
    os.environ.update(env)
    print(f"machine: {machine()}", flush=True)
    points = [(fraction, 64) for fraction in args.fractions] + \
        [(args.length_fraction, length) for length in args.lengths if length != 64 or
         args.length_fraction not in args.fractions]
    shared: dict[str, str] = {}  # one download (snapshot and checkpoint) for every point
    rows_total = None
    results = []
    for fraction, length in points:
        work = args.work / f"len{length}"
        config = composed("sst2", args.glue, work, quick=False)
        config["tokenize"]["max_length"] = length
        config["paths"].update(shared)
        path = work / f"rows{fraction:g}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(config), path)
        cfg = load(path)
        if not shared:
            download(cfg)
            shared = {"raw_dir": cfg.paths.raw_dir, "pretrained_dir": cfg.paths.pretrained_dir}
        if not Path(cfg.paths.tokenized_dir).is_dir():
            tokenize(cfg)
        if rows_total is None:
            import datasets

            rows_total = len(datasets.load_from_disk(cfg.paths.tokenized_dir)["train"])
        config["train"]["max_train_samples"] = max(1, round(rows_total * fraction))
        OmegaConf.save(OmegaConf.create(config), path)
        result = run_arm([sys.executable, str(PROJECT / "bench" / "speed.py"),
                          "--internal-train", str(path)], env)
        results.append((fraction, length, result))
        print(f"{fraction:>5.0%} rows, max_length {length}: {result['train_runtime']:.0f} s, "
              f"{result['real_tokens'] / 1e6:.2f} M real tokens, validation accuracy "
              f"{result['accuracy']:.4f}", flush=True)

    print(f"\n{'rows':>7}{'max_len':>8}{'seconds':>9}{'real tokens':>13}{'padded':>10}"
          f"{'s per M real tokens':>21}")
    for _, length, r in results:
        print(f"{r['train_rows']:>7}{length:>8}{r['train_runtime']:>9.1f}{r['real_tokens']:>13.0f}"
              f"{r['batch_tokens']:>10.0f}{r['train_runtime'] / r['real_tokens'] * 1e6:>21.1f}")
    tokens = np.array([r["real_tokens"] for _, _, r in results])
    seconds = np.array([r["train_runtime"] for _, _, r in results])
    slope, intercept = np.polyfit(tokens, seconds, 1)
    fitted = slope * tokens + intercept
    r2 = 1 - ((seconds - fitted) ** 2).sum() / ((seconds - seconds.mean()) ** 2).sum()
    print(f"least squares: seconds = {intercept:.1f} + {slope * 1e6:.1f} x M real tokens, "
          f"R^2 = {r2:.4f}")


if __name__ == "__main__":
    main()
