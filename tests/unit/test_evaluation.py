"""Metrics and post-processing of logits."""

import numpy as np
import pytest

from pipeline.evaluation import compute_metrics, confusion_matrix, softmax


def test_binary_metrics_match_hand_computed_values():
    labels = np.array([1, 1, 1, 0, 0, 0])
    predicted = np.array([1, 1, 0, 0, 0, 1])
    metrics = compute_metrics(labels, predicted, num_labels=2)
    # tp=2 fp=1 fn=1 tn=2: precision = recall = 2/3, F1 = 2/3, MCC = (4-1)/9 = 1/3
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["mcc"] == pytest.approx(1 / 3)
    assert "macro_f1" not in metrics


def test_multiclass_metrics_use_macro_f1():
    labels = np.array([0, 1, 2, 2])
    predicted = np.array([0, 1, 2, 1])
    metrics = compute_metrics(labels, predicted, num_labels=3)
    # per-class F1: 1, 2/3, 2/3
    assert metrics["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert "f1" not in metrics


def test_softmax_is_stable_and_normalised():
    logits = np.array([[1000.0, 1001.0], [0.0, 0.0]])
    probabilities = softmax(logits)
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    assert probabilities[0, 1] == pytest.approx(1 / (1 + np.exp(-1)))
    assert np.allclose(probabilities[1], [0.5, 0.5])


def test_confusion_matrix_rows_are_actual_labels():
    matrix = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
