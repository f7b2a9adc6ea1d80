"""``hf-text-pipeline``: the commands beside the DVC stages (installed as a console script).

    hf-text-pipeline predict --model models/model "a gripping, funny film"
    hf-text-pipeline compare --parent <sweep parent run id>
    hf-text-pipeline sync
    hf-text-pipeline exp-from-sweep multirun/<date>/<time>
    hf-text-pipeline offline-plots
    hf-text-pipeline clean-runs
    hf-text-pipeline reproduce <run id>
    hf-text-pipeline server start

Each command is a module of this package (``-`` in its name is ``_`` in the module's) with its
own ``main(argv)``; ``python -m pipeline.commands <command> ...`` runs the same without the
console script.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "predict": "classify texts or text pairs with a trained model (folder or MLflow URI)",
    "compare": "compare MLflow runs (a sweep's children, or an experiment's runs) side by side",
    "sync": "send the MLflow runs kept locally while the tracking server was unreachable",
    "exp-from-sweep": "run a finished sweep's best job again as a DVC experiment",
    "offline-plots": "make `dvc plots show/diff` pages work without network (Vega inlined)",
    "clean-runs": "free the disk space of deleted MLflow runs and their models (mlflow gc)",
    "reproduce": "run a recorded MLflow run again from its record and compare every metric",
    "server": "start, stop or check the team's MLflow server (PostgreSQL, basic auth)",
}
PROG = "hf-text-pipeline"


def _usage() -> str:
    lines = [f"usage: {PROG} <command> [options]", "", "commands:"]
    lines += [f"  {name:<14} {summary}" for name, summary in COMMANDS.items()]
    lines += ["", f"`{PROG} <command> --help` describes a command's options.",
              "The pipeline's stages run with `dvc repro` (or `python -m stages.<stage> --help`)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"{PROG}: error: unknown command {command!r}; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return importlib.import_module(f"pipeline.commands.{command.replace('-', '_')}").main(rest)
