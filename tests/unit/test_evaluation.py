"""Metrics, the choice of metrics per task, and post-processing of logits."""

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.evaluation import submission_file
from pipeline.inference import postprocess, softmax
from pipeline.metrics import compute_metrics, confusion_matrix, per_class_scores, task_metrics


def test_binary_metrics_match_hand_computed_values():
    labels = np.array([1, 1, 1, 0, 0, 0])
    predicted = np.array([1, 1, 0, 0, 0, 1])
    metrics = compute_metrics(labels, predicted, ["accuracy", "f1", "mcc"], num_labels=2)
    # tp=2 fp=1 fn=1 tn=2: precision = recall = 2/3, F1 = 2/3, MCC = (4-1)/9 = 1/3
    assert metrics == pytest.approx({"accuracy": 4 / 6, "f1": 2 / 3, "mcc": 1 / 3})


def test_multiclass_metrics_use_macro_f1():
    labels = np.array([0, 1, 2, 2])
    predicted = np.array([0, 1, 2, 1])
    assert task_metrics(None, "accuracy", 3, regression=False) == ["accuracy", "macro_f1", "mcc"]
    metrics = compute_metrics(labels, predicted, ["accuracy", "macro_f1"], num_labels=3)
    # per-class F1: 1, 2/3, 2/3
    assert metrics == pytest.approx({"accuracy": 0.75, "macro_f1": (1 + 2 / 3 + 2 / 3) / 3})


def test_binary_tasks_report_macro_f1_besides_the_positive_class_f1():
    # On a 95/5 split, predicting the majority class everywhere scores accuracy 0.95 and, with
    # the majority as the positive class, F1 0.97: only macro-F1 (0.49) shows the failure.
    assert task_metrics(None, "accuracy", 2, regression=False) == ["accuracy", "f1", "macro_f1",
                                                                   "mcc"]
    labels = np.array([1] * 95 + [0] * 5)
    metrics = compute_metrics(labels, np.ones(100, dtype=int),
                              task_metrics(None, "accuracy", 2, regression=False), num_labels=2)
    assert metrics["accuracy"] == pytest.approx(0.95)
    assert metrics["macro_f1"] == pytest.approx((0 + 2 * 0.95 / 1.95) / 2)


def test_per_class_scores_match_scikit_learn():
    from sklearn.metrics import precision_recall_fscore_support

    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 1, 0, 1, 1, 1, 2, 0, 2])
    scores = per_class_scores(confusion_matrix(labels, predicted, 4))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=[0, 1, 2, 3], zero_division=0)
    assert [s["examples"] for s in scores] == support.tolist() == [3, 2, 4, 0]
    assert [s["predicted"] for s in scores] == [3, 4, 2, 0]
    for name, expected in (("precision", precision), ("recall", recall), ("f1", f1)):
        assert [s[name] for s in scores] == pytest.approx(expected.tolist()), name


def test_regression_metrics_are_pearson_and_spearman():
    labels = np.array([0.0, 1.0, 2.0, 3.0, 5.0])
    scores = np.array([0.1, 0.9, 2.5, 2.4, 4.0])
    assert task_metrics(None, "pearson", 1, regression=True) == ["pearson", "spearman"]
    metrics = compute_metrics(labels, scores, ["pearson", "spearman"], num_labels=1)
    assert metrics["pearson"] == pytest.approx(np.corrcoef(labels, scores)[0, 1])
    assert metrics["spearman"] == pytest.approx(0.9)  # one swapped pair of ranks: 1 - 6*2/120
    # Constant predictions have no correlation: null in JSON rather than NaN.
    assert compute_metrics(labels, np.ones(5), ["pearson"], 1) == {"pearson": None}


@pytest.mark.parametrize("configured, main, labels, regression, message", [
    (["f1"], "f1", 3, False, "f1 is the F1 of the positive class of two labels"),
    (["pearson"], "pearson", 2, False, "pearson does not apply to classification"),
    (["accuracy"], "accuracy", 1, True, "accuracy does not apply to a regression task"),
    (None, "f1", 3, False, "dataset.main_metric=f1 is not among the metrics computed"),
])
def test_metrics_that_do_not_fit_the_data_are_config_errors(configured, main, labels,
                                                           regression, message):
    with pytest.raises(ConfigError, match=message):
        task_metrics(configured, main, labels, regression)


def test_softmax_is_stable_and_normalised():
    logits = np.array([[1000.0, 1001.0], [0.0, 0.0]])
    probabilities = softmax(logits)
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    assert probabilities[0, 1] == pytest.approx(1 / (1 + np.exp(-1)))
    assert np.allclose(probabilities[1], [0.5, 0.5])


def test_postprocess_gives_labels_and_probabilities_or_scores():
    records = postprocess(np.array([[2.0, 0.0, -1.0]]), ["a", "b", "c"], regression=False)
    assert records[0]["label"] == "a"
    assert sum(records[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert postprocess(np.array([[3.25]]), ["score"], regression=True) == [{"score": 3.25}]


def test_confusion_matrix_rows_are_actual_labels():
    matrix = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_submission_files_are_named_as_glue_expects():
    assert submission_file("MRPC", "test") == "MRPC.tsv"
    assert submission_file("MNLI", "test_matched") == "MNLI-m.tsv"
    assert submission_file("MNLI", "test_mismatched") == "MNLI-mm.tsv"
