"""Calibration: the temperature fit, its fold into a saved model (safe_mode reload), ECE and the flags."""

import numpy as np
import pytest

from model_lib.calibrate import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    probabilities_at,
    view_logits,
    with_temperature,
)
from model_lib.flags import flags, texture
from model_lib.models import build_model, with_tta


def test_the_fit_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 10))
    truth = probabilities_at([logits], 2.5)
    labels = np.array([rng.choice(10, p=row) for row in truth])
    assert fit_temperature([logits], labels) == pytest.approx(2.5, rel=0.1)


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy():
    probabilities = np.array([[0.9, 0.1]] * 10 + [[0.3, 0.7]] * 10)  # bins 0.9 and 0.7
    labels = np.array([0] * 9 + [1] + [1] * 5 + [0] * 5)  # 90% right at 0.9, 50% right at 0.7
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.5 * 0.0 + 0.5 * 0.2)
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


@pytest.mark.parametrize("tta", [None, "flip", "translate"])
def test_the_temperature_is_folded_with_stock_layers_and_survives_a_safe_mode_reload(tmp_path, tta):
    import keras

    keras.utils.set_random_seed(0)
    model = build_model("seed_cnn", 4)
    model = with_tta(model, translate=tta == "translate") if tta else model
    images = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    views = view_logits(model, images)
    assert len(views) == {None: 1, "flip": 2, "translate": 8}[tta]  # the unshifted pair twice: half the weight
    np.testing.assert_allclose(probabilities_at(views, 1.0), model.predict(images, verbose=0), atol=1e-5)
    calibrated = with_temperature(model, 0.25)
    calibrated.save(tmp_path / "calibrated.keras")
    reloaded = keras.saving.load_model(tmp_path / "calibrated.keras", safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), probabilities_at(views, 0.25), atol=1e-5)
    # A second calibration replaces the temperature instead of stacking on it.
    again = with_temperature(reloaded, 2.0)
    np.testing.assert_allclose(again.predict(images, verbose=0), probabilities_at(views, 2.0), atol=1e-5)


def test_calibrate_sharpens_an_underconfident_model_and_chooses_the_thresholds():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    logits = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(inputs))
    outputs = keras.layers.Activation("softmax", name="probabilities")(keras.layers.Rescaling(0.02)(logits))
    model = keras.Model(inputs, outputs)  # colour -> class, but with confidences squashed towards 1/3
    model.get_layer("head").set_weights([np.eye(3, dtype=np.float32) * 2, np.full(3, -170.0, np.float32)])
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    signal = np.eye(3)[labels][:, None, None, :] * 60 + rng.normal(0, 25, (600, 1, 1, 3))  # overlapping classes
    images = np.clip(signal + rng.normal(100, 30, (600, 32, 32, 3)), 0, 255)
    images = images.astype(np.uint8)
    val, test = (images[:300], labels[:300]), (images[300:], labels[300:])
    calibrated, record, before, after = calibrate(model, *val, *test, images[:300])
    assert record["temperature"] < 0.5 and record["test_ece_after"] < record["test_ece_before"]
    assert record["test_nll_after"] < record["test_nll_before"]
    assert 0 < record["unsure_threshold"] < 1 and record["fitted_on"] == "validation split (300 images)"
    low, high = record["texture_range"]
    assert low < float(np.median(texture(images))) < high
    np.testing.assert_allclose(before, model.predict(images[300:], verbose=0), atol=1e-5)
    np.testing.assert_allclose(after, calibrated.predict(images[300:], verbose=0), atol=1e-5)
    assert record["cascade"] is None  # no TTA views: nothing to serve first
    _, untouched, _, _ = calibrate(model, images[:10], labels[:10], images[300:], labels[300:], images[:300])
    assert untouched["temperature"] == 1.0 and untouched["unsure_threshold"] is None


def colour_data(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    signal = np.eye(3)[labels][:, None, None, :] * 60 + rng.normal(0, 25, (count, 1, 1, 3))  # overlapping classes
    return np.clip(signal + rng.normal(100, 30, (count, 32, 32, 3)), 0, 255).astype(np.uint8), labels


@pytest.mark.backends  # under JAX the unsure rows are padded to a power of two (one compilation per size)
def test_a_tta_model_served_first_view_first_gives_what_calibration_measured():
    import keras

    from model_lib.calibrate import CASCADE_MARGINS
    from model_lib.inference import CascadeClassifier, KerasClassifier
    from model_lib.models import unwrap_tta

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.Flatten()(keras.layers.AveragePooling2D(8)(inputs))  # 4x4 cells: a mirror changes them
    logits = keras.layers.Dense(3, name="head")(pooled)
    outputs = keras.layers.Activation("softmax", name="probabilities")(keras.layers.Rescaling(0.05)(logits))
    network = keras.Model(inputs, outputs, name="cells")
    kernel = np.tile(np.eye(3), (16, 1)) * 2 / 16 + np.random.default_rng(1).normal(0, 0.05, (48, 3))
    network.get_layer("head").set_weights([kernel.astype(np.float32), np.zeros(3, np.float32)])
    images, labels = colour_data(900)
    val, test = (images[:400], labels[:400]), (images[400:], labels[400:])
    calibrated, record, _, after = calibrate(with_tta(network), *val, *test, images[:400])
    cascade = record["cascade"]
    assert 0 < cascade["every_view_share"] < 1 and cascade["margin"] in CASCADE_MARGINS
    assert cascade["test_accuracy_every_view"] == pytest.approx((after.argmax(1) == test[1]).mean(), abs=1e-6)
    assert cascade["serves"] == (cascade["test_accuracy_every_view"] - cascade["test_accuracy"] <= 0.002)

    every = KerasClassifier(calibrated)
    first = KerasClassifier(unwrap_tta(calibrated)[0])
    scale = record["temperature"] / cascade["first_view_temperature"]
    served = CascadeClassifier(first, every, scale, cascade["margin"]).predict(test[0])
    assert (served.argmax(1) == test[1]).mean() == pytest.approx(cascade["test_accuracy"], abs=1.5 / len(test[1]))
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)
    every_time = CascadeClassifier(first, every, scale, margin=2.0).predict(test[0])  # every image is unsure
    np.testing.assert_allclose(every_time, calibrated.predict(test[0], verbose=0), atol=1e-5)
    first_only = CascadeClassifier(first, every, scale, margin=0.0).predict(test[0])
    own_temperature = probabilities_at(view_logits(calibrated, test[0])[:1], cascade["first_view_temperature"])
    np.testing.assert_allclose(first_only, own_temperature, atol=1e-4)


def test_flags_mark_unlike_images_out_of_distribution_and_doubtful_ones_low_confidence():
    rng = np.random.default_rng(0)
    photo_like = np.clip(rng.normal(128, 15, (2, 32, 32, 3)), 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)
    flat = np.full((1, 32, 32, 3), 90, np.uint8)
    pixels = np.concatenate([photo_like, noise, flat])
    probabilities = np.array([[0.9, 0.1], [0.55, 0.45], [0.99, 0.01], [0.99, 0.01]])
    band = [2.0, 40.0]
    assert flags(probabilities, pixels, 0.6, band) == ["ok", "low_confidence", "out_of_distribution"] * 1 + [
        "out_of_distribution"
    ]
    assert flags(probabilities, pixels, None, None) == [""] * 4  # a model registered before calibration


@pytest.mark.slow
def test_evaluation_takes_calibrations_test_scores_only_when_the_saved_model_reproduces_them(tmp_path):
    import keras

    from model_lib.evaluate import SPOT_CHECK_IMAGES, ScoresMismatch, evaluate_run

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    cache = tmp_path / "cache"
    cache.mkdir()
    x_test = rng.integers(0, 256, (SPOT_CHECK_IMAGES + 20, 32, 32, 3), dtype=np.uint8)
    for name, array in {"x_train": x_test[:4], "y_train": np.arange(4) % 3, "x_test": x_test,
                        "y_test": rng.integers(0, 3, len(x_test))}.items():  # fmt: skip
        np.save(cache / f"{name}.npy", array)
    model = with_tta(build_model("seed_cnn", 3), translate=True)
    model.save(tmp_path / "model.keras")
    probabilities = model.predict(x_test, verbose=0)
    scored = tmp_path / "scored.npy"
    np.save(scored, probabilities)
    args = (str(tmp_path / "model.keras"), str(cache), ["a", "b", "c"])
    full = evaluate_run(*args, tmp_path / "full", learned_margin=-1.0)
    reused = evaluate_run(*args, tmp_path / "reused", learned_margin=-1.0, scored=str(scored))
    assert reused["test_accuracy"] == full["test_accuracy"] and reused["test_loss"] == pytest.approx(full["test_loss"])
    np.testing.assert_allclose(np.load(tmp_path / "reused" / "test_probabilities.npy"), probabilities, atol=1e-6)
    # Scores of another model (or a stale file) are refused, with the file named, before anything is written.
    for wrong in (probabilities[::-1], probabilities[:-1]):
        np.save(scored, wrong)
        with pytest.raises(ScoresMismatch, match="scored.npy"):
            evaluate_run(*args, tmp_path / "wrong", learned_margin=-1.0, scored=str(scored))
    assert not (tmp_path / "wrong" / "metrics.json").exists()


def test_the_texture_range_is_measured_on_every_class_of_a_class_ordered_array(monkeypatch):
    import model_lib.flags

    rng = np.random.default_rng(0)
    smooth = np.full((300, 8, 8, 3), 120, np.uint8) + rng.integers(0, 3, (300, 8, 8, 3)).astype(np.uint8)
    busy = rng.integers(0, 256, (300, 8, 8, 3)).astype(np.uint8)  # a second class, stored after the first
    monkeypatch.setattr(model_lib.flags, "TEXTURE_SAMPLE", 100)
    low, high = model_lib.flags.texture_range(np.concatenate([smooth, busy]))
    assert low < model_lib.flags.texture(smooth).max() and high > np.median(model_lib.flags.texture(busy))


def test_the_cascade_margin_is_the_smallest_that_keeps_every_views_answers():
    from model_lib.calibrate import CASCADE_MARGINS, cascade_margin

    every = np.array([[0.7, 0.3], [0.2, 0.8]] * 100)
    assert cascade_margin(every, every) == CASCADE_MARGINS[0]  # the first view already agrees
    wrong_but_sure = np.array([[0.0, 1.0], [1.0, 0.0]] * 100)
    assert cascade_margin(wrong_but_sure, every) is None  # no margin in the grid re-runs them: never served
    # Every first answer is 0.75/0.25, half of them wrong: only a margin above 0.5 re-runs them.
    assert cascade_margin(np.array([[0.75, 0.25]] * 200), every) == 0.6
