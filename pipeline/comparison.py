"""Compare the MLflow runs of a sweep or of DVC experiments: a table and a plot per swept value.

The swept values are the params that differ between the runs, so the same comparison serves a
Hydra sweep's child runs, an Optuna search and a DVC experiment queue.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.plots import pyplot

logger = logging.getLogger(__name__)

TABLE_CSV = "runs.csv"
TABLE_MD = "runs.md"
PLOT = "metric_vs_params.png"
# Tags that say which run a row is; shown before the params.
_ID_TAGS = ("dvc_exp_name", "sweep_job")
SUMMARY_PREFIXES = ("validation_", "test_", "train_runtime")
# How long each per-epoch validation took: not a result to compare runs by.
_TIMINGS = ("validation_runtime", "validation_samples_per_second", "validation_steps_per_second")


def swept_params(runs: Sequence[Any]) -> list[str]:
    """Params whose value differs between the runs that have them (a job that failed before
    its stage started has only its overrides)."""
    # Dotted keys are this project's config (train.learning_rate) and what the Trainer resolved
    # (trainer.*); a sweep parent's own params (search_space) are not dotted.
    keys = sorted({key for run in runs for key in run.data.params if "." in key})
    return [key for key in keys
            if len({run.data.params[key] for run in runs if key in run.data.params}) > 1]


def comparison_rows(runs: Sequence[Any], params: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run: name, id, status, identifying tags, swept params, final metrics."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.info.run_name, "run_id": run.info.run_id,
                               "status": run.info.status}
        row.update({tag: run.data.tags[tag] for tag in _ID_TAGS if tag in run.data.tags})
        row.update({key: run.data.params.get(key) for key in params})
        row.update(sorted((k, v) for k, v in run.data.metrics.items()
                          if k.startswith(SUMMARY_PREFIXES) and k not in _TIMINGS))
        rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def tick_label(value: str, width: int = 24) -> str:
    """A categorical value short enough for an axis; a long one (a path) keeps its end, where
    such values differ."""
    return value if len(value) <= width else "…" + value[-(width - 1):]


def plot_metric_vs_params(rows: Sequence[dict[str, Any]], metric: str,
                          params: Sequence[str], path: Path) -> None:
    """One panel per swept param: the metric of each finished run against the param's value."""
    plt = pyplot()
    params = list(params) or ["run"]
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.4), squeeze=False)
    for axis, param in zip(axes[0], params):
        points = [(row.get(param), row[metric]) for row in rows
                  if row.get(metric) is not None and row["status"] == "FINISHED"]
        numeric = all(_number(x) is not None for x, _ in points)
        if numeric and points:
            xs = [_number(x) for x, _ in points]
            axis.scatter(xs, [y for _, y in points])
            if min(xs) > 0 and max(xs) / min(xs) >= 10:
                axis.set_xscale("log")  # learning rates and the like span decades
        else:
            labels = sorted({str(x) for x, _ in points})
            axis.scatter([labels.index(str(x)) for x, _ in points], [y for _, y in points])
            axis.set_xticks(range(len(labels)), [tick_label(label) for label in labels],
                            rotation=20, ha="right")
        axis.set_xlabel(param)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    fig.suptitle(f"{metric} by swept value ({len(rows)} runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_comparison(runs: Sequence[Any], metric: str, out_dir: Path) -> list[Path]:
    """Write the table (csv and Markdown, best run first) and the plot; return their paths."""
    import csv

    params = swept_params(runs)
    rows = comparison_rows(runs, params)
    # Best first; runs without the metric (failed ones) last.
    rows.sort(key=lambda row: (row.get(metric) is None, -(row.get(metric) or 0.0)))
    # The stages' summary metrics, not the per-step curves.
    metrics = sorted({key for run in runs for key in run.data.metrics
                      if key.startswith(SUMMARY_PREFIXES)})
    head = ["run", "status", *[t for t in _ID_TAGS if any(t in row for row in rows)]]
    columns = [*head, *params, *([metric] if metric in metrics else []),
               *[m for m in metrics if m != metric], "run_id"]
    out_dir.mkdir(parents=True, exist_ok=True)
    table_csv, table_md, plot = out_dir / TABLE_CSV, out_dir / TABLE_MD, out_dir / PLOT
    with table_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table_md.write_text(_markdown(rows, columns))
    plot_metric_vs_params(rows, metric, params, plot)
    logger.info("compared %d runs on %s (swept: %s) in %s", len(rows), metric,
                ", ".join(params) or "nothing", out_dir)
    return [table_csv, table_md, plot]


def main_metric_of(runs: Sequence[Any]) -> str:
    """``validation_<dataset.main_metric>`` as the runs' params recorded it."""
    names = {run.data.params.get("dataset.main_metric") for run in runs} - {None}
    return f"validation_{min(names) if names else 'accuracy'}"
