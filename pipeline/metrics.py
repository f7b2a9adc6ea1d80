"""Metrics of predictions against gold labels: what training selects checkpoints by and what the
evaluate stage reports.

They come from scikit-learn and SciPy: ``evaluate.load`` fetches metric scripts from the Hub at
run time, which a pipeline that must re-run offline cannot depend on. Both are imported where a
metric is computed (~1 s of start-up together): the report stage reads only the confusion-matrix
helpers, and a classification task never needs SciPy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np

from pipeline.config import REGRESSION_METRICS
from pipeline.errors import ConfigError


def _accuracy(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, predictions))


def _f1(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predictions, average="binary", zero_division=0))


def _macro_f1(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predictions, average="macro", labels=list(range(num_labels)),
                          zero_division=0))


def _mcc(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, predictions))


def _correlation(name: str):
    """``scipy.stats.<name>`` (pearsonr, spearmanr) as a metric."""
    def metric(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> Optional[float]:
        from scipy import stats

        if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
            return None  # undefined for constant input (JSON null, not NaN)
        return float(getattr(stats, name)(labels, predictions)[0])
    return metric


METRICS: dict[str, Callable[[np.ndarray, np.ndarray, int], Optional[float]]] = {
    "accuracy": _accuracy,
    "f1": _f1,  # of the positive class (label id 1): GLUE's F1 for MRPC and QQP
    "macro_f1": _macro_f1,
    "mcc": _mcc,
    "pearson": _correlation("pearsonr"),
    "spearman": _correlation("spearmanr"),
}


def task_metrics(configured: Optional[Sequence[str]], main_metric: str, num_labels: int,
                 regression: bool) -> list[str]:
    """The metrics to compute: ``dataset.metrics``, or the task's usual set when it is null
    (regression: Pearson and Spearman; two labels: accuracy, F1, macro-F1, MCC; more: accuracy,
    macro-F1, MCC). Macro-F1 is in every classification set because accuracy and the positive
    class's F1 hide a minority class the model never predicts (0.95 accuracy on a 95/5 split).

    Raises:
        ConfigError: a metric that does not fit the data (F1 of the positive class with more
            than two labels, a correlation for labels), or a main metric not computed.
    """
    if configured:
        names = list(configured)
    elif regression:
        names = ["pearson", "spearman"]
    else:
        names = ["accuracy", *(["f1"] if num_labels == 2 else []), "macro_f1", "mcc"]
    for name in names:
        if regression != (name in REGRESSION_METRICS):
            kind = "a regression task" if regression else "classification"
            raise ConfigError(f"dataset.metrics: {name} does not apply to {kind}")
        if name == "f1" and num_labels != 2:
            raise ConfigError(f"dataset.metrics: f1 is the F1 of the positive class of two labels; "
                              f"the data has {num_labels} labels: use macro_f1")
    if main_metric not in names:
        raise ConfigError(f"dataset.main_metric={main_metric} is not among the metrics computed "
                          f"for this data: {', '.join(names)}")
    return names


def compute_metrics(labels: np.ndarray, predictions: np.ndarray, metrics: Sequence[str],
                    num_labels: int) -> dict[str, Optional[float]]:
    """``metrics`` of ``predictions`` (label ids, or scores for regression) against ``labels``."""
    return {name: METRICS[name](labels, predictions, num_labels) for name in metrics}


def trainer_metrics(eval_prediction, metrics: Sequence[str], num_labels: int) -> dict[str, float]:
    """``compute_metrics`` in the form ``Trainer`` calls it (logits and label ids)."""
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    predictions = logits[:, 0] if num_labels == 1 else np.argmax(logits, axis=-1)
    # Trainer cannot compare None when picking the best checkpoint: an undefined correlation
    # (constant predictions) counts as no correlation.
    return {k: 0.0 if v is None else v
            for k, v in compute_metrics(labels, predictions, metrics, num_labels).items()}


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> np.ndarray:
    matrix = np.zeros((num_labels, num_labels), dtype=int)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> list[dict[str, float]]:
    """Per class (row of ``matrix``, rows actual, columns predicted): its gold ``examples``, how
    often it was ``predicted``, and its ``precision``, ``recall`` and ``f1`` (0 where undefined,
    as scikit-learn's ``zero_division=0``)."""
    scores = []
    for index in range(len(matrix)):
        hits, gold, predicted = matrix[index, index], matrix[index].sum(), matrix[:, index].sum()
        precision = hits / predicted if predicted else 0.0
        recall = hits / gold if gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores.append({"examples": int(gold), "predicted": int(predicted),
                       "precision": float(precision), "recall": float(recall), "f1": float(f1)})
    return scores
