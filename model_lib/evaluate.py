"""Evaluate: test accuracy and loss, per-class precision/recall/F1 and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model_lib.config import option
from model_lib.fileio import atomic_open, write_json
from model_lib.inference import KerasClassifier
from model_lib.runs import CONFUSION_FILE, METRICS_FILE, PER_CLASS_FILE, TEST_PROBABILITIES

SPOT_CHECK_IMAGES = 500  # test images the saved model re-scores when its test probabilities were computed before
SPOT_CHECK_TOLERANCE = 1e-4  # largest difference of a probability between the saved model and those figures
ECE_BINS = 10  # equal-width confidence bins of the expected calibration error and the reliability diagram
LOSS_EPSILON = 1e-7  # probabilities are clipped to [eps, 1] before the log, as Keras does


class ScoresMismatch(RuntimeError):
    """The saved model does not reproduce the test probabilities computed for it: never register it."""


class NothingLearned(RuntimeError):
    """The model is no better than always answering the most common class: never register it."""


def majority_rate(labels: np.ndarray) -> float:
    """The accuracy of always answering the most common class."""
    counts = np.bincount(np.asarray(labels, np.int64))
    return float(counts.max() / counts.sum()) if counts.sum() else 0.0


def check_learned(split: str, accuracy: float, labels: np.ndarray, margin: float) -> None:
    """Refuse a model whose accuracy on `split` is not above the majority-class rate plus `margin`.

    Raises:
        NothingLearned: With the figures and what to try.
    """
    floor = majority_rate(labels)
    if not accuracy > floor + margin:
        raise NothingLearned(
            f"the model learned nothing: {split} accuracy {accuracy:.4f} is not above the majority-class "
            f"rate {floor:.4f} + margin {margin} ({option('learned_margin')}); nothing was registered. Try "
            f"{option('precision')} float32, more {option('epochs')} or a lower {option('learning_rate')}, and check "
            "that the class folders really differ"
        )


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean categorical cross-entropy of the true classes (no smoothing), probabilities clipped as Keras does."""
    picked = probabilities[np.arange(len(labels)), np.asarray(labels, np.int64)]
    return float(-np.log(np.clip(picked, LOSS_EPSILON, 1.0)).mean())


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> list[tuple[float, float, int]]:
    """Per non-empty equal-width bin of top-1 confidence: (mean confidence, accuracy, images)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    return [
        (float(confidence[index == b].mean()), float(correct[index == b].mean()), int((index == b).sum()))
        for b in range(bins)
        if (index == b).any()
    ]


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Test figures from predicted probabilities.

    Args:
        probabilities: `(n, classes)` rows summing to 1.
        labels: `(n,)` true class indices.
        class_names: One name per class index.

    Returns:
        `test_accuracy`, `test_loss` (categorical cross-entropy, no smoothing), `per_class` (a
        list of dicts with precision, recall, f1 and support) and `confusion_matrix` (rows: true).
    """
    labels = np.asarray(labels, np.int64)
    predicted = probabilities.argmax(axis=1)
    classes = len(class_names)
    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_positive = np.diag(confusion).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(true_positive / confusion.sum(axis=0))
        recall = np.nan_to_num(true_positive / confusion.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {
        "test_accuracy": float((predicted == labels).mean()),
        "test_loss": negative_log_likelihood(probabilities, labels),
        "test_count": int(len(labels)),
        "per_class": [
            {
                "class": name,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(confusion[i].sum()),
            }
            for i, name in enumerate(class_names)
        ],
        "confusion_matrix": confusion.tolist(),
    }


def write_metrics(metrics: dict, class_names: list[str], out_dir: Path) -> dict[str, str]:
    """Write `metrics.json`, `per_class.csv` and `confusion_matrix.csv`; return their paths by name."""
    import pandas as pd

    paths = {
        "metrics": out_dir / METRICS_FILE,
        "per_class": out_dir / PER_CLASS_FILE,
        "confusion_matrix": out_dir / CONFUSION_FILE,
    }
    write_json(paths["metrics"], metrics)
    with atomic_open(paths["per_class"], "w", newline="", encoding="utf-8") as handle:
        pd.DataFrame(metrics["per_class"]).to_csv(handle, index=False, float_format="%.4f")
    confusion = pd.DataFrame(metrics["confusion_matrix"], index=class_names, columns=class_names)
    confusion.index.name = "true \\ predicted"
    with atomic_open(paths["confusion_matrix"], "w", newline="", encoding="utf-8") as handle:
        confusion.to_csv(handle)
    return {name: str(path) for name, path in paths.items()}


def predict_probabilities(model, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Class probabilities for uint8 images, predicted in batches by the model as saved (nothing folded)."""
    return KerasClassifier(model, fold=False).predict(np.asarray(images), batch_size).astype(np.float32)


def score_model(model, cache_dir: str, class_names: list[str]) -> tuple[dict, np.ndarray]:
    """A loaded model's metrics (see `classification_metrics`) and probabilities on a cached test set."""
    from model_lib.data import load_arrays

    arrays = load_arrays(cache_dir)
    probabilities = predict_probabilities(model, arrays.x_test)
    return classification_metrics(probabilities, np.asarray(arrays.y_test), class_names), probabilities


def evaluate_run(
    model_path: str,
    cache_dir: str,
    class_names: list[str],
    out_dir: Path,
    learned_margin: float = 0.0,
    scored: str | None = None,
) -> dict:
    """Evaluate a saved model on the cached test set and write its metrics files.

    Also saves the test probabilities (`TEST_PROBABILITIES`) for the plots.

    Args:
        model_path: The saved `.keras` model.
        cache_dir: The ingested dataset.
        class_names: One name per class index.
        out_dir: Where the metrics files go.
        learned_margin: Test accuracy the model must add to the majority-class rate.
        scored: A `.npy` of this model's test probabilities computed before (calibration's): the
            saved model then re-scores only the first `SPOT_CHECK_IMAGES` test images, which must
            match them, instead of all of them.

    Returns:
        The metrics (without the confusion matrix), `majority_rate` and `promotion_floor` (the
        majority-class rate plus `learned_margin`, which the registry's gate also applies) and
        `files`, the written paths by name.

    Raises:
        NothingLearned: Test accuracy not above the majority-class rate plus `learned_margin`
            (the metrics files are written first, for the post-mortem).
        ScoresMismatch: The saved model's outputs differ from `scored`.
    """
    import keras

    from model_lib.data import load_arrays

    model = keras.saving.load_model(model_path, safe_mode=True)
    arrays = load_arrays(cache_dir)
    labels = np.asarray(arrays.y_test)
    if scored is None:
        probabilities = predict_probabilities(model, arrays.x_test)
    else:
        probabilities = np.load(scored, allow_pickle=False)
        spot = predict_probabilities(model, arrays.x_test[:SPOT_CHECK_IMAGES])
        same_shape = probabilities.shape == (len(labels), len(class_names))
        gap = float(np.abs(spot - probabilities[: len(spot)]).max()) if same_shape and len(spot) else np.inf
        if not gap <= SPOT_CHECK_TOLERANCE:
            raise ScoresMismatch(
                f"{model_path} does not reproduce its test probabilities in {scored} (shape {probabilities.shape}, "
                f"largest difference {gap:.2g} on the first {len(spot)} images): nothing was registered"
            )
    metrics = classification_metrics(probabilities, labels, class_names)
    with atomic_open(out_dir / TEST_PROBABILITIES, "wb") as handle:
        np.save(handle, probabilities.astype(np.float32), allow_pickle=False)
    files = write_metrics(metrics, class_names, out_dir)
    check_learned("test", metrics["test_accuracy"], labels, learned_margin)
    majority = majority_rate(labels)
    floors = {"majority_rate": majority, "promotion_floor": majority + learned_margin}
    return {**{k: v for k, v in metrics.items() if k != "confusion_matrix"}, **floors, "files": files}
