"""Stage start-up: seconds from interpreter start to each stage's first work.

A stage's start-up is what it pays before touching its inputs: the interpreter, its module (and
the pipeline modules that imports), Hydra composing params.yaml through the stage entrypoint,
and the heavy libraries its work uses (HEAVY below, read off each stage's code). Each stage runs
in a fresh interpreter, from the project root, through the real entrypoint (`run_stage`) with a
body that imports those libraries and stamps the time; the figure is that stamp less the moment
the parent started the process, the median of ``repeats`` runs. `python -c pass` (the bare
interpreter) and `python -m stages.train --help` (start to exit) are timed the same way.

    python bench/startup.py [--repeats 3]

bench/speed.py imports :func:`measure_startup` and :func:`print_startup`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
STAGES = ("download", "tokenize", "train", "evaluate", "report")

# What each stage's work imports beyond its module's own imports (``module:attribute`` for a
# lazily loaded attribute): the checkpoint's tokenizer (download checks it, tokenize uses it),
# the Trainer (torch with it), MLflow (every run record), matplotlib (the report's figures).
HEAVY = {
    "download": ["datasets", "transformers:AutoTokenizer"],
    "tokenize": ["datasets", "transformers:AutoTokenizer"],
    "train": ["torch", "transformers:Trainer", "mlflow"],
    "evaluate": ["torch", "transformers:Trainer", "mlflow"],
    "report": ["mlflow", "matplotlib.pyplot"],
}

_PROBE = """
import importlib, sys, time
stage, heavy = sys.argv[1], sys.argv[2:]
module = importlib.import_module("stages." + stage)
from stages.entrypoint import run_stage

def first_work(cfg):
    for name in heavy:
        lib, _, attribute = name.partition(":")
        loaded = importlib.import_module(lib)
        if attribute:
            getattr(loaded, attribute)
    print("FIRST_WORK", repr(time.time()), flush=True)

sys.argv = ["stages/" + stage + ".py"]
run_stage(stage, first_work, module.PARAMS)
"""


def cpu_name() -> str:
    """The CPU model, its cores and the flags that decide bf16 speed, e.g. 'AMD EPYC, 2 cores,
    AVX2 AVX-512F AVX-512-BF16'."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    names = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512_bf16": "AVX-512-BF16",
             "amx_bf16": "AMX-BF16"}
    shown = " ".join(label for flag, label in names.items() if flag in flags)
    return f"{model}, {os.cpu_count()} cores{', ' + shown if shown else ''}"


def _seconds_to_first_work(command: list[str], project: Path) -> float:
    started = time.time()
    done = subprocess.run(command, cwd=project, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("FIRST_WORK "):
            return float(line.split()[1]) - started
    raise RuntimeError(f"{' '.join(command[:3])} failed:\n{done.stderr[-2000:]}")


def _seconds_to_exit(command: list[str], project: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def measure_startup(repeats: int = 3, project: Path = PROJECT,
                    python: str = sys.executable) -> dict[str, Any]:
    """Median seconds to first work per stage, and of the bare interpreter and of
    `python -m stages.train --help`, each over ``repeats`` fresh processes, stages interleaved
    round by round so machine noise hits all alike."""
    arms: dict[str, Any] = {"python -c pass": lambda: _seconds_to_exit([python, "-c", "pass"],
                                                                      project)}
    for stage in STAGES:
        arms[stage] = (lambda stage=stage: _seconds_to_first_work(
            [python, "-c", _PROBE, stage, *HEAVY[stage]], project))
    arms["train --help"] = lambda: _seconds_to_exit([python, "-m", "stages.train", "--help"],
                                                    project)
    runs: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(repeats):
        for arm, measure in arms.items():
            runs[arm].append(measure())
    return {"cpu": cpu_name(), "repeats": repeats,
            "seconds": {arm: round(statistics.median(times), 2) for arm, times in runs.items()},
            "runs": {arm: [round(t, 2) for t in times] for arm, times in runs.items()}}


def print_startup(results: dict[str, Any]) -> None:
    print(f"Stage start-up, interpreter start to first work (median of {results['repeats']}), "
          f"on {results['cpu']}")
    print(f"{'':<16}{'seconds':>8}   runs   imports timed")
    for arm, seconds in results["seconds"].items():
        runs = " ".join(f"{t:.2f}" for t in results["runs"][arm])
        heavy = ", ".join(HEAVY.get(arm, [])).replace(":", ".")
        print(f"{arm:<16}{seconds:>8.2f}   {runs}   {heavy}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print_startup(measure_startup(args.repeats))


if __name__ == "__main__":
    main()
