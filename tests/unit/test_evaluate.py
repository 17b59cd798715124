import numpy as np
import pandas as pd
import pytest

from model_lib.evaluate import classification_metrics, write_metrics


def test_metrics_on_known_predictions(tmp_path):
    labels = np.array([0, 0, 1, 1, 2])
    probabilities = np.array(
        [[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]], np.float32
    )
    metrics = classification_metrics(probabilities, labels, ["a", "b", "c"])
    assert metrics["test_accuracy"] == pytest.approx(0.8)
    expected_loss = -np.mean(np.log([0.9, 0.2, 0.8, 0.6, 0.4]))
    assert metrics["test_loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    b = metrics["per_class"][1]
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == 1.0 and b["f1"] == pytest.approx(0.8)
    assert metrics["per_class"][0]["support"] == 2

    files = write_metrics(metrics, ["a", "b", "c"], tmp_path)
    table = pd.read_csv(files["per_class"])
    assert list(table.columns) == ["class", "precision", "recall", "f1", "support"]
    confusion = pd.read_csv(files["confusion_matrix"], index_col=0)
    assert confusion.loc["a", "b"] == 1 and confusion.values.sum() == 5


def test_class_never_predicted_has_zero_precision_not_nan():
    metrics = classification_metrics(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 1]), ["x", "y"])
    assert metrics["per_class"][1] == {"class": "y", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
