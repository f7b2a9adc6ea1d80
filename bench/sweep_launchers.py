"""What a parallel Hydra launcher buys on this machine: the same learning-rate sweep with the
basic launcher (jobs one after another in one process, all cores each) and with joblib (jobs in
parallel processes, the cores shared out), timed one after the other in one run.

Run from the project root after `dvc repro tokenize` (it sweeps the train stage over
data/tokenized); jobs write under multirun/ and log to the project's MLflow database.

    python bench/sweep_launchers.py [--jobs 4] [--parallel 2] [--samples 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def sweep(launcher: list[str], rates: list[str], samples: int, threads: int) -> float:
    command = [sys.executable, "-m", "stages.train", "-m", *launcher,
               f"train.learning_rate={','.join(rates)}", "train.num_train_epochs=1",
               f"train.max_train_samples={samples}", f"train.max_eval_samples={samples}",
               "tracking.log_model=false"]
    start = time.perf_counter()
    done = subprocess.run(command, check=False, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        sys.exit(f"{' '.join(command[1:])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=2, help="joblib's n_jobs")
    parser.add_argument("--samples", type=int, default=64, help="training and eval examples")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rates = [f"{1e-5 * 2 ** i:g}" for i in range(args.jobs)]
    basic = sweep([], rates, args.samples, threads=cores)
    joblib = sweep(["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.parallel}"], rates,
                   args.samples, threads=max(1, cores // args.parallel))
    print(f"{args.jobs} jobs, {args.samples} examples each, {cores} cores")
    print(f"basic launcher:            {basic:7.1f} s")
    print(f"joblib, {args.parallel} at a time:     {joblib:7.1f} s")
    print(f"basic / joblib:            {basic / joblib:7.2f}x")


if __name__ == "__main__":
    main()
