"""Plot: training curves, confusion-matrix heat map, a grid of labelled test images and the
reliability diagram (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model_lib.evaluate import ECE_BINS, reliability_bins

SAMPLE_GRID = (4, 8)  # rows, columns of the sample-prediction grid
FIGURE_DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> str:
    from model_lib.fileio import atomic_open

    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    _pyplot().close(figure)
    return str(path)


def plot_curves(history, path: Path) -> str:
    """Accuracy and loss per epoch, training and validation, from the history DataFrame."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = history["epoch"] + 1
    for axis, metric in zip(axes, ("accuracy", "loss"), strict=True):
        axis.plot(epochs, history[metric], marker="o", label="train")
        if f"val_{metric}" in history:
            axis.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("Training curves")
    return _save(figure, path)


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path) -> str:
    """Confusion matrix heat map, rows normalised to recall, counts written in the cells."""
    plt = _pyplot()
    confusion = np.asarray(confusion)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = max(5, 0.6 * len(class_names))
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(class_names) <= 20:
        for i in ticks:
            for j in ticks:
                axis.text(
                    j,
                    i,
                    confusion[i, j],
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    figure.colorbar(image, ax=axis, label="fraction of true class")
    axis.set_title("Confusion matrix (test)")
    return _save(figure, path)


def plot_samples(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], path: Path, seed: int = 0
) -> str:
    """A grid of random test images titled with predicted (and, when wrong, true) labels."""
    plt = _pyplot()
    rows, columns = SAMPLE_GRID
    count = min(rows * columns, len(labels))
    picks = np.sort(np.random.default_rng(seed).choice(len(labels), count, replace=False))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.8))
    for axis in np.ravel(axes):
        axis.axis("off")
    for axis, index in zip(np.ravel(axes), picks, strict=False):
        predicted = int(probabilities[index].argmax())
        correct = predicted == int(labels[index])
        title = f"{class_names[predicted]} {probabilities[index, predicted]:.0%}"
        if not correct:
            title += f"\n(true: {class_names[int(labels[index])]})"
        axis.imshow(images[index])
        axis.set_title(title, fontsize=7, color="green" if correct else "red")
    figure.suptitle("Sample test predictions")
    return _save(figure, path)


def plot_reliability(curves: dict[str, np.ndarray], labels: np.ndarray, path: Path, bins: int = ECE_BINS) -> str:
    """Accuracy against confidence per equal-width confidence bin, a line per model (before/after calibration)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    for name, probabilities in curves.items():
        confidence, accuracy, _ = zip(*reliability_bins(probabilities, labels, bins), strict=True)
        axis.plot(confidence, accuracy, marker="o", label=name)
    axis.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    axis.legend(loc="upper left")
    return _save(figure, path)


def plot_pruning(points: list[dict], current: str, path: Path) -> str:
    """Test accuracy against Keras speed-up over the parent and against file size: the parent and each version
    pruned from it (model_lib.prune.family_points), joined in order of the share of channels kept."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    ordered = sorted(points, key=lambda point: -point["keep"])
    for axis, key, label in ((axes[0], "speedup", "images/s, times the parent's (Keras, timed side by side)"),
                             (axes[1], "megabytes", "model.keras (MB)")):  # fmt: skip
        axis.plot([p[key] for p in ordered], [100 * p["accuracy"] for p in ordered], color="0.6", zorder=1)
        for point in ordered:
            mine = point["label"] == current
            axis.scatter(point[key], 100 * point["accuracy"], s=60 if mine else 30, zorder=2,
                         color="tab:red" if mine else "tab:blue")  # fmt: skip
            axis.annotate(point["label"], (point[key], 100 * point["accuracy"]), textcoords="offset points",
                          xytext=(4, 4), fontsize=8)  # fmt: skip
        axis.set_xlabel(label)
        axis.margins(x=0.2)  # room for the labels right of the last point
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    figure.suptitle("Pruned versions of one parent: accuracy, speed and size")
    return _save(figure, path)


def plot_run(run_dir: Path, cache_dir: str, class_names: list[str], seed: int = 0) -> dict[str, str]:
    """All plots of a finished, evaluated run; returns their paths by name."""
    from model_lib.data import load_arrays
    from model_lib.fileio import read_json
    from model_lib.runs import (
        HISTORY_FILE,
        METRICS_FILE,
        PLOT_FILES,
        TEST_PROBABILITIES,
        UNCALIBRATED_PROBABILITIES,
        read_history,
    )

    arrays = load_arrays(cache_dir)
    probabilities = np.load(run_dir / TEST_PROBABILITIES, allow_pickle=False)
    confusion = np.array(read_json(run_dir / METRICS_FILE)["confusion_matrix"])
    return {
        "curves": plot_curves(read_history(run_dir / HISTORY_FILE), run_dir / PLOT_FILES["curves"]),
        "confusion": plot_confusion(confusion, class_names, run_dir / PLOT_FILES["confusion"]),
        "samples": plot_samples(
            np.asarray(arrays.x_test),
            np.asarray(arrays.y_test),
            probabilities,
            class_names,
            run_dir / PLOT_FILES["samples"],
            seed,
        ),
        "reliability": plot_reliability(
            {
                "uncalibrated": np.load(run_dir / UNCALIBRATED_PROBABILITIES, allow_pickle=False),
                "calibrated": probabilities,
            }
            if (run_dir / UNCALIBRATED_PROBABILITIES).is_file()
            else {"model": probabilities},
            np.asarray(arrays.y_test),
            run_dir / PLOT_FILES["reliability"],
        ),  # fmt: skip
    }
