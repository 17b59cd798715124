"""Calibration: a temperature fitted on the validation split and folded into the saved model, and the
rules that flag a prediction as unsure.

Both flags' rules (see `model_lib.flags`) are chosen here, on data the model did not train on, and
stored in the manifest: the texture range of the training images, and the calibrated confidence
that 97% of correct validation predictions reach.

Temperature scaling divides the logits by one number T before the softmax: the ranking of classes,
hence the accuracy, does not change; confidences become honest (a label-smoothed model is
under-confident, T < 1 sharpens it). The fold is a stock `Rescaling(1/T)` layer before the
softmax, so the model still loads with `safe_mode` and exports to TFLite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model_lib.config import MIN_VALIDATION_IMAGES
from model_lib.evaluate import ECE_BINS, negative_log_likelihood, reliability_bins
from model_lib.fileio import atomic_open, save_model_atomic, write_json
from model_lib.flags import texture_range
from model_lib.inference import CASCADE_TOLERANCE, KerasClassifier, cascade, softmax
from model_lib.models import tta_views, unwrap_tta, view_pixels, with_features, with_tta
from model_lib.ood import OOD_FILE, fit_feature_rule, stage_layers
from model_lib.runs import TEST_PROBABILITIES, UNCALIBRATED_PROBABILITIES

LOG_T_RANGE = (-3.0, 3.0)  # natural-log bounds of the temperature search: T from 0.05 to 20
UNSURE_PASS_RATE = 0.97  # the low-confidence threshold lets this share of correct validation predictions pass
# A TTA model serves first view first (model_lib.inference.CascadeClassifier): every view only where the first
# view's top-1 minus top-2 calibrated probability is below a margin, the smallest of CASCADE_MARGINS at which the
# cascade's top-1 differs from every view's on at most CASCADE_MAX_DISAGREEMENT of the validation images; under
# `--engine auto` only when, on the test set, that loses at most CASCADE_TOLERANCE of accuracy. Two `default`
# models needed 0.4 and 0.6: 8-14% of the CIFAR-10 test images re-run (bench/RESULTS.md, "The app").
CASCADE_MARGINS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # probability
CASCADE_MAX_DISAGREEMENT = 0.005  # of the validation images
CALIBRATION_FILE = "calibration.json"
TEMPERATURE_LAYER = "temperature"
PROBABILITIES_LAYER = "probabilities"  # the softmax every architecture ends in (model_lib.models)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the mean gap between confidence and accuracy over equal-width confidence bins, weighted by size."""
    gaps = [
        abs(confidence - accuracy) * count
        for confidence, accuracy, count in reliability_bins(probabilities, labels, bins)
    ]
    return float(sum(gaps) / len(labels)) if len(labels) else 0.0


def probabilities_at(view_logits: list[np.ndarray], temperature: float) -> np.ndarray:
    """The model's output at a temperature: the mean over its views (see `view_logits`) of softmax(logits / T)."""
    return np.mean([softmax(logits / temperature) for logits in view_logits], axis=0)


def fit_temperature(view_logits: list[np.ndarray], labels: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood (golden-section search on log T)."""
    ratio = (np.sqrt(5) - 1) / 2
    low, high = LOG_T_RANGE

    def loss(log_t: float) -> float:
        return negative_log_likelihood(probabilities_at(view_logits, float(np.exp(log_t))), labels)

    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(40):  # the bracket shrinks to 0.618^40 of 6: far below any meaningful difference
        if loss_a < loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return float(np.exp((low + high) / 2))


def unsure_threshold(probabilities: np.ndarray, labels: np.ndarray, pass_rate: float = UNSURE_PASS_RATE) -> float:
    """The confidence below which a prediction is flagged unsure: `pass_rate` of correct predictions are above it."""
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    confidences = probabilities.max(axis=1)[correct]
    return float(np.quantile(confidences, 1 - pass_rate)) if len(confidences) else 0.0


def _logits_and_temperature(network):
    """The network's logits tensor (before any folded temperature) and the temperature already folded in."""
    names = {layer.name for layer in network.layers}
    if TEMPERATURE_LAYER in names:
        layer = network.get_layer(TEMPERATURE_LAYER)
        return layer.input, 1.0 / float(layer.scale)
    return network.get_layer(PROBABILITIES_LAYER).input, 1.0


def view_logits(model, images: np.ndarray, batch_size: int = 500) -> list[np.ndarray]:
    """The logits (before temperature) of each view the model averages (`model_lib.models.tta_views`): a view
    weighted twice appears twice, so the model's output is their plain mean."""
    import keras

    network, views = unwrap_tta(model)
    views = views or ((0, False),)  # no wrapper: the image itself
    logits, _ = _logits_and_temperature(network)
    # Unfolded: evaluation checks the saved model against these outputs (SPOT_CHECK_TOLERANCE).
    logit_model = KerasClassifier(keras.Model(network.inputs, logits), fold=False)
    scored = {
        view: np.asarray(logit_model.predict(view_pixels(images, *view), batch_size), np.float64)
        for view in dict.fromkeys(views)
    }
    return [scored[view] for view in views]


def with_temperature(model, temperature: float):
    """The same model with `softmax(logits / temperature)` as its output, from stock layers only."""
    import keras

    network, views = unwrap_tta(model)
    logits, _ = _logits_and_temperature(network)
    scaled = keras.layers.Rescaling(1.0 / temperature, dtype="float32", name=TEMPERATURE_LAYER)(logits)
    outputs = keras.layers.Activation("softmax", dtype="float32", name=PROBABILITIES_LAYER)(scaled)
    calibrated = keras.Model(network.inputs, outputs, name=network.name)
    return with_tta(calibrated, translate=views == tta_views(translate=True)) if views else calibrated


def calibrate(
    model, val_images: np.ndarray, val_labels: np.ndarray, test_images, test_labels, train_images
) -> tuple[object, dict, np.ndarray, np.ndarray]:
    """Fit a temperature on validation images, fold it into the model, and measure the change on the test set.

    Args:
        model: The serving model (pixels in, probabilities out), with or without a TTA wrapper.
        val_images, val_labels: The validation split the temperature and threshold are chosen on.
        test_images, test_labels: The test set the before/after figures are measured on.
        train_images: The training images the texture range is measured on.

    Returns:
        The calibrated model; a JSON-friendly record: `temperature`, `fitted_on`, test `ece` and
        `nll` before and after, `unsure_threshold` (on the calibrated confidences) and
        `texture_range`; and the test probabilities before and after calibration (the calibrated
        model's outputs, computed from the same logits). With fewer than
        `MIN_VALIDATION_IMAGES` validation images, the temperature stays as it was.
    """
    val, test = view_logits(model, np.asarray(val_images)), view_logits(model, np.asarray(test_images))
    _, folded = _logits_and_temperature(unwrap_tta(model)[0])
    enough = len(val_labels) >= MIN_VALIDATION_IMAGES
    temperature = fit_temperature(val, val_labels) if enough else folded
    before, after = probabilities_at(test, folded), probabilities_at(test, temperature)
    validation = probabilities_at(val, temperature)
    record = {
        "temperature": round(temperature, 6),
        "fitted_on": f"validation split ({len(val_labels)} images)" if enough
        else f"not fitted: {len(val_labels)} validation images, fewer than {MIN_VALIDATION_IMAGES}",
        "test_ece_before": round(expected_calibration_error(before, test_labels), 6),
        "test_ece_after": round(expected_calibration_error(after, test_labels), 6),
        "test_nll_before": round(negative_log_likelihood(before, test_labels), 6),
        "test_nll_after": round(negative_log_likelihood(after, test_labels), 6),
        "unsure_threshold": round(unsure_threshold(validation, val_labels), 6) if enough
        else None,
        "unsure_pass_rate": UNSURE_PASS_RATE,
        "texture_range": texture_range(train_images),
        "cascade": cascade_record(val, validation, val_labels, test, after, test_labels) if enough else None,
    }  # fmt: skip
    calibrated = with_temperature(model, temperature) if enough else model
    return calibrated, record, before.astype(np.float32), after.astype(np.float32)


def cascade_record(
    val: list[np.ndarray], val_every: np.ndarray, val_labels, test: list[np.ndarray], every: np.ndarray, test_labels
):
    """How a TTA model does served first view first (`model_lib.inference.cascade`), from its view logits and its
    calibrated outputs (`val_every`, `every`): the first view's own temperature (fitted on the validation split,
    like the model's) and margin (`cascade_margin`), and on the test set the share of images every view re-ran,
    accuracy and ECE next to every view's; `serves` when the accuracy lost is at most `CASCADE_TOLERANCE`. None
    for a model without TTA views."""
    if len(val) < 2:
        return None
    first_temperature = fit_temperature([val[0]], val_labels)
    margin = cascade_margin(probabilities_at([val[0]], first_temperature), val_every)
    first = probabilities_at([test[0]], first_temperature)
    served, unsure = cascade(first, lambda rows: every[rows], margin or 1.0)
    labels = np.asarray(test_labels)
    accuracy, every_accuracy = (served.argmax(1) == labels).mean(), (every.argmax(1) == labels).mean()
    return {
        "first_view_temperature": round(first_temperature, 6),
        "margin": margin,
        "every_view_share": round(float(unsure.mean()), 6),
        "test_accuracy": round(float(accuracy), 6),
        "test_accuracy_every_view": round(float(every_accuracy), 6),
        "test_ece": round(expected_calibration_error(served, labels), 6),
        "serves": margin is not None and bool(every_accuracy - accuracy <= CASCADE_TOLERANCE),
    }


def cascade_margin(first: np.ndarray, every: np.ndarray) -> float | None:
    """The smallest of `CASCADE_MARGINS` at which the cascade's top-1 (from the first view's and every view's
    validation probabilities) differs from every view's on at most `CASCADE_MAX_DISAGREEMENT`; None if none does."""
    decided = every.argmax(axis=1)
    for margin in CASCADE_MARGINS:
        served, _ = cascade(first, lambda rows: every[rows], margin)
        if (served.argmax(axis=1) != decided).mean() <= CASCADE_MAX_DISAGREEMENT:
            return margin
    return None


def calibrate_run(model_path: str, probe_path: str, cache_dir: str, split_path: str, out_dir: Path) -> dict:
    """Calibrate a run's saved model in place: the model and its probe outputs are replaced atomically.

    Also fits the feature-space rule of the `out_of_distribution` flag (`model_lib.ood`) on a sample of the
    training split and the validation split, into `ood.npz`, recorded as the record's `feature_rule` (None
    where the validation split is too small to set limits on). Writes `calibration.json` and the test
    probabilities before (for the reliability diagram)
    and after calibration (for evaluation, which then need not score the test set again) into `out_dir`.

    Returns:
        The calibration record (see `calibrate`).
    """
    import keras

    from model_lib.data import load_arrays
    from model_lib.split import load_split

    arrays, split = load_arrays(cache_dir), load_split(Path(split_path))
    model = keras.saving.load_model(model_path, safe_mode=True)
    val_images, val_labels = np.asarray(arrays.x_train[split.val_index]), np.asarray(arrays.y_train[split.val_index])
    test_images, test_labels = np.asarray(arrays.x_test), np.asarray(arrays.y_test)
    calibrated, record, uncalibrated, probabilities = calibrate(
        model, val_images, val_labels, test_images, test_labels, arrays.x_train
    )
    with atomic_open(out_dir / UNCALIBRATED_PROBABILITIES, "wb") as handle:
        np.save(handle, uncalibrated, allow_pickle=False)
    if calibrated is not model:
        save_model_atomic(calibrated, Path(model_path))
        with np.load(probe_path, allow_pickle=False) as probe:
            inputs = probe["inputs"]
        with atomic_open(probe_path, "wb") as handle:
            np.savez(handle, inputs=inputs, outputs=calibrated.predict(inputs, verbose=0))
    with atomic_open(out_dir / TEST_PROBABILITIES, "wb") as handle:  # after the model it describes
        np.save(handle, probabilities, allow_pickle=False)
    record["feature_rule"] = None
    (out_dir / OOD_FILE).unlink(missing_ok=True)  # an earlier attempt's, were this one to fit none
    if record["unsure_threshold"] is not None:
        network = unwrap_tta(model)[0]  # the image's own view
        layers = stage_layers(network)
        labels = np.asarray(arrays.y_train)
        rule, record["feature_rule"] = fit_feature_rule(
            KerasClassifier(with_features(network, layers)), layers, arrays.x_train, labels, split.train_index,
            split.val_index,
        )  # fmt: skip
        with atomic_open(out_dir / OOD_FILE, "wb") as handle:
            rule.save(handle)
    write_json(out_dir / CALIBRATION_FILE, record)
    return record
