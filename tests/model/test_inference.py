"""Folding BatchNormalization for inference: exact where it applies, the original model everywhere else."""

import keras
import numpy as np
import pytest
from keras import layers

from model_lib.images import decode_rgb
from model_lib.inference import KerasClassifier, fold_batch_norms
from model_lib.models import build_model, with_tta

rng = np.random.default_rng(1)
PIXELS = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)


def calibrate(model, images: np.ndarray, gamma_low: float = 0.5):
    """Give every BatchNormalization the statistics of its real input and a random affine, as training would."""
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            activations = np.asarray(keras.Model(model.input, layer.input)(images.astype(np.float32)))
            channels = activations.shape[-1]
            layer.moving_mean.assign(activations.reshape(-1, channels).mean(axis=0))
            layer.moving_variance.assign(activations.reshape(-1, channels).var(axis=0))
            if layer.scale:
                layer.gamma.assign(rng.uniform(gamma_low, 2.0, channels))
            layer.beta.assign(rng.normal(0, 0.5, channels))
    return model


def kinds(model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


@pytest.mark.real_data
def test_seed_cnn_folds_exactly_on_real_cifar_images(cifar_dir):
    paths = sorted((cifar_dir / "test").glob("*/000[0-4].jpg"))
    images = np.stack([decode_rgb(path, (32, 32))[0] for path in paths])
    model = calibrate(build_model("seed_cnn", 10), images)
    folded = fold_batch_norms(model)
    assert "BatchNormalization" not in kinds(folded) and kinds(folded).count("Conv2D") == 3
    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(folded.predict(images, verbose=0), expected, atol=1e-5)
    assert expected.max(axis=1).min() < 0.9  # a calibrated, uncertain model: the comparison means something


def test_batch_norm_after_a_linear_layer_folds_whatever_the_sign_of_its_scale():
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False)(layers.Rescaling(1 / 255)(inputs))
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    outputs = layers.Dense(10, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    model = calibrate(keras.Model(inputs, outputs), PIXELS, gamma_low=-2.0)
    folded = fold_batch_norms(model)
    assert "BatchNormalization" not in kinds(folded)
    np.testing.assert_allclose(folded.predict(PIXELS, verbose=0), model.predict(PIXELS, verbose=0), atol=1e-5)


@pytest.mark.parametrize("reason", ["negative scale after relu", "same padding after the offset", "branches"])
def test_models_that_cannot_fold_exactly_are_returned_as_they_are(reason):
    if reason == "branches":
        model = with_tta(calibrate(build_model("seed_cnn", 10), PIXELS))
    else:
        inputs = keras.Input((32, 32, 3))
        x = layers.Conv2D(8, 3, activation="relu")(layers.Rescaling(1 / 255)(inputs))
        x = layers.BatchNormalization()(x)
        x = layers.Conv2D(8, 3, padding="same" if reason.startswith("same") else "valid")(x)
        outputs = layers.Dense(10, activation="softmax")(layers.Flatten()(x))
        model = calibrate(keras.Model(inputs, outputs), PIXELS, gamma_low=-1.0 if reason.startswith("neg") else 0.5)
    assert fold_batch_norms(model) is model


def test_classifier_traces_once_for_every_batch_size_and_matches_predict():
    model = calibrate(build_model("seed_cnn", 10), PIXELS)
    classifier = KerasClassifier(model)
    for size in (1, 5, 16):
        np.testing.assert_allclose(
            classifier.predict_on_batch(PIXELS[:size]), model.predict(PIXELS[:size], verbose=0), atol=1e-5
        )
    assert classifier._call.experimental_get_tracing_count() == 1


def test_the_unfolded_classifier_scores_any_number_of_images_as_the_saved_model_does():
    model = with_tta(calibrate(build_model("seed_cnn", 10), PIXELS))
    classifier = KerasClassifier(model, fold=False)
    assert classifier.model is model
    # Batches of 5 over 16 images: three full ones and a ragged last one, one trace. (Other batch sizes
    # round differently in the last bits, so the saved model's own figure is within 1e-6, not equal.)
    expected = model.predict(PIXELS, verbose=0)
    np.testing.assert_allclose(classifier.predict(PIXELS, batch_size=5), expected, rtol=0, atol=1e-6)
    assert classifier._call.experimental_get_tracing_count() == 1
    assert classifier.predict(PIXELS[:0]).shape == (0, 10)
