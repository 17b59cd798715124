"""The feature-space half of the `out_of_distribution` flag: how far an image's features lie from every class.

Pixel statistics (`model_lib.flags.texture`) catch noise and flat colours, but a checkerboard or a word on
a plain background has a photo's texture. What the network itself computes does not: this is the
Mahalanobis detector of Lee et al. (2018, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks") with its feature ensemble. At each stage of the network (the last
activation at each spatial resolution, pooled by mean and by max over positions) and at the features the
classifier's last Dense layer reads:

* the training images' class means and one shared covariance (Ledoit-Wolf shrunk) are fitted on a sample
  spread over every class;
* an image's score at that stage is its squared Mahalanobis distance to the nearest class mean, put on a
  common scale by the validation images' median and `PASS_RATE` quantile;
* its score is the largest over stages, and it is out of distribution above the `PASS_RATE` quantile of the
  validation images' scores: images the model never trained on decide the limit.

On a `fast` CIFAR-10 model this flags every noise, flat, ramp, shaped-noise, checkerboard and text image of
the synthetic sets and about 1% of the test photos (bench/RESULTS.md, "Out-of-distribution flags").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

OOD_FILE = "ood.npz"  # the fitted rule, beside model.keras in the run and version folders
PASS_RATE = 0.99  # validation images each stage's scale and the final limit let pass
FIT_SAMPLE = 5000  # training images (spread evenly over the class-ordered cache) the class means are fitted on


def stage_layers(network) -> list[str]:
    """The names of the layers whose outputs are scored: from the first layer with weights on, the last one
    at each spatial resolution; then the layer whose output the last Dense layer reads."""
    names, weighted, last_4d = [], False, None
    for layer in network.layers:
        weighted = weighted or bool(layer.weights)
        if not weighted or type(layer).__name__ == "InputLayer":
            continue
        shape = layer.output.shape
        if len(shape) == 4:
            if last_4d is not None and last_4d.output.shape[1:3] != shape[1:3]:
                names.append(last_4d.name)
            last_4d = layer
    if last_4d is not None:
        names.append(last_4d.name)
    head = [layer for layer in network.layers if type(layer).__name__ == "Dense"][-1]
    reader = head.input._keras_history.operation  # noqa: SLF001 - Keras' own record of a tensor's producer
    if reader.name not in names and len(head.input.shape) == 2:
        names.append(reader.name)
    return names


def shrunk_covariance(centred: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf: the sample covariance drawn toward a scaled identity by the amount that minimises its
    expected error. A stage can have more features than a small folder has images."""
    n, d = centred.shape
    sample = centred.T @ centred / n
    mu = np.trace(sample) / d
    target_gap = ((sample - mu * np.eye(d)) ** 2).sum()
    squares = centred**2
    spread = ((squares.T @ squares) / n - sample**2).sum() / n
    shrinkage = min(spread, target_gap) / target_gap if target_gap > 0 else 1.0
    return (1 - shrinkage) * sample + shrinkage * mu * np.eye(d)


@functools.cache
def _blas():
    """The process's thread pools (BLAS among them), found once."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@dataclass(frozen=True)
class FeatureRule:
    """A fitted detector: per stage a whitening projection, the projected class means and the score scale."""

    layers: tuple[str, ...]
    projections: tuple[np.ndarray, ...]  # features x features: x @ P has identity covariance
    centres: tuple[np.ndarray, ...]  # classes x features, projected
    medians: np.ndarray  # per stage: the validation images' median squared distance
    spreads: np.ndarray  # per stage: their PASS_RATE quantile minus the median
    limit: float  # on the combined score

    def stage_distances(self, features: list[np.ndarray]) -> np.ndarray:
        """Per image (rows) and stage (columns): the squared Mahalanobis distance to the nearest class mean."""
        stages = []
        # One BLAS thread: OpenBLAS' threads spin on after these small products and slowed the TensorFlow
        # call of the next batch by a quarter (bench/RESULTS.md, "Out-of-distribution flags").
        with _blas().limit(limits=1, user_api="blas"):
            for values, projection, centres in zip(features, self.projections, self.centres, strict=True):
                projected = np.asarray(values, np.float32) @ projection
                distances = (projected**2).sum(1)[:, None] - 2 * projected @ centres.T + (centres**2).sum(1)[None]
                stages.append(distances.min(axis=1))
        return np.stack(stages, axis=1)

    def scores(self, features: list[np.ndarray]) -> np.ndarray:
        """Per image: the largest over stages of its scaled distance (see `stage_distances`)."""
        return ((self.stage_distances(features) - self.medians) / self.spreads).max(axis=1)

    def outside(self, features: list[np.ndarray]) -> np.ndarray:
        """Per image: True where its features lie beyond the limit."""
        return self.scores(features) > self.limit

    def save(self, handle) -> None:
        """Into a binary file, as an `.npz` of plain arrays (loaded with `allow_pickle=False`)."""
        arrays = {"layers": np.array(self.layers), "medians": self.medians, "spreads": self.spreads,
                  "limit": np.array(self.limit)}  # fmt: skip
        for i, (projection, centres) in enumerate(zip(self.projections, self.centres, strict=True)):
            arrays[f"projection_{i}"], arrays[f"centres_{i}"] = projection, centres
        np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: Path | str) -> FeatureRule:
        with np.load(path, allow_pickle=False) as saved:
            count = len(saved["layers"])
            return cls(
                layers=tuple(str(name) for name in saved["layers"]),
                projections=tuple(saved[f"projection_{i}"] for i in range(count)),
                centres=tuple(saved[f"centres_{i}"] for i in range(count)),
                medians=saved["medians"],
                spreads=saved["spreads"],
                limit=float(saved["limit"]),
            )


def spread_sample(labels: np.ndarray, count: int = FIT_SAMPLE) -> np.ndarray:
    """Up to `count` positions spread evenly over `labels`: every class of a class-ordered array in proportion."""
    return np.unique(np.linspace(0, len(labels) - 1, min(len(labels), count)).astype(int))


def classified(classifier, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """`images`' probabilities and each stage's features (None from a classifier without them) in one pass, from a
    classifier of a model built by `model_lib.models.with_features` or `served_with_features`."""
    batches = [classifier.classify(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    probabilities = np.concatenate([np.asarray(batch[0], np.float32) for batch in batches])
    if batches[0][1] is None:
        return probabilities, None
    stages = range(len(batches[0][1]))
    return probabilities, [np.concatenate([np.asarray(batch[1][s], np.float64) for batch in batches]) for s in stages]


def fit_feature_rule(
    classifier, layers: list[str], images, labels: np.ndarray, train_index: np.ndarray, val_index: np.ndarray
) -> tuple[FeatureRule, dict]:
    """Fit the detector on training images of every class and set its limits on validation images.

    Args:
        classifier: A classifier whose further outputs are `layers`' features (a model built by
            `model_lib.models.with_features`, or its export), run once over each set.
        layers: The scored layers (`stage_layers` of the network).
        images, labels: The cached training images (an array or memory map) and their labels.
        train_index, val_index: The run's split (`model_lib.split`): the class means are fitted on `FIT_SAMPLE` of
            its training images spread over every class, the scales and the limit are `PASS_RATE` quantiles over
            its validation images.

    Returns:
        The rule, and a JSON-friendly record of what decided it.
    """
    sample = train_index[spread_sample(labels[train_index])]
    train_features, val_features = (classified(classifier, np.asarray(images[rows]))[1] for rows in (sample, val_index))
    rule = fit_rule(layers, train_features, labels[sample], val_features)
    record = {
        "file": OOD_FILE,
        "stages": list(layers),
        "fitted_on": f"{len(sample)} training images of {len(np.unique(labels[sample]))} classes; limit from "
        f"{len(val_index)} validation images ({PASS_RATE:.0%} pass)",
        "pass_rate": PASS_RATE,
    }
    return rule, record


def fit_rule(layers: list[str], train: list[np.ndarray], labels: np.ndarray, val: list[np.ndarray]) -> FeatureRule:
    """The rule from each stage's features of training images (with their labels) and of validation images."""
    classes = np.unique(labels)
    projections, centres = [], []
    for values in train:
        means = np.stack([values[labels == c].mean(axis=0) for c in classes])
        covariance = shrunk_covariance(values - means[np.searchsorted(classes, labels)])
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        projection = eigenvectors / np.sqrt(np.maximum(eigenvalues, eigenvalues.max() * 1e-9))
        projections.append(projection.astype(np.float32))
        centres.append((means @ projection).astype(np.float32))
    unscaled = FeatureRule(tuple(layers), tuple(projections), tuple(centres), np.zeros(len(train), np.float32),
                           np.ones(len(train), np.float32), np.inf)  # fmt: skip
    stages = unscaled.stage_distances(val)
    medians = np.median(stages, axis=0)
    spreads = np.maximum(np.quantile(stages, PASS_RATE, axis=0) - medians, 1e-6)
    combined = ((stages - medians) / spreads).max(axis=1)
    return replace(unscaled, medians=medians.astype(np.float32), spreads=spreads.astype(np.float32),
                   limit=float(np.quantile(combined, PASS_RATE)))  # fmt: skip


class FeatureClassifier:
    """A classifier whose network also reports its stages' features, and the rule that scores them.

    `flagged(pixels)` returns `(probabilities, outside)`; `predict_on_batch` and the shapes are the inner
    classifier's, so it serves wherever that one does.
    """

    def __init__(self, classifier, rule: FeatureRule):
        self.classifier, self.rule = classifier, rule
        self.input_shape, self.output_shape = classifier.input_shape, classifier.output_shape

    def predict_on_batch(self, pixels: np.ndarray) -> np.ndarray:
        return self.classifier.predict_on_batch(pixels)

    def predict(self, pixels: np.ndarray, batch_size: int = 256, verbose: int = 0) -> np.ndarray:
        return self.classifier.predict(pixels, batch_size, verbose)

    def flagged(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        probabilities, features = self.classifier.classify(pixels)
        return probabilities, None if features is None else self.rule.outside(features)
