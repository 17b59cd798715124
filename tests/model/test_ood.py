"""The feature-space rule of the out_of_distribution flag (model_lib.ood): its statistics, and features that
every Keras way of serving a version reports without changing its probabilities."""

import io

import numpy as np
import pytest

from model_lib.export import convert, write_saved_model
from model_lib.inference import CascadeClassifier, KerasClassifier, TFLiteClassifier
from model_lib.models import build_model, served_with_features, unwrap_tta, with_features, with_tta
from model_lib.ood import PASS_RATE, FeatureClassifier, FeatureRule, fit_rule, stage_layers


def test_the_rule_passes_held_out_images_of_the_classes_and_flags_what_lies_far_from_all_of_them():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (3, 20))
    scales = rng.uniform(0.5, 2.0, 20)  # unequal spreads: the distance is Mahalanobis, not Euclidean

    def images(count: int, shift: float = 0.0):
        labels = rng.integers(0, 3, count)
        stage = centres[labels] + rng.normal(0, 1, (count, 20)) * scales
        stage[:, np.argmin(scales)] += shift  # along the tightest direction: small in Euclidean terms
        return [stage, stage[:, :5] * 2], labels

    train, labels = images(3000)
    val, _ = images(1000)
    rule = fit_rule(["a", "b"], train, labels, val)
    held_out, _ = images(4000)
    assert abs(rule.outside(held_out).mean() - (1 - PASS_RATE)) < 0.01
    far, _ = images(200, shift=8 * scales.min())
    assert rule.outside(far).mean() > 0.95
    buffer = io.BytesIO()
    rule.save(buffer)
    buffer.seek(0)
    np.testing.assert_allclose(FeatureRule.load(buffer).scores(far), rule.scores(far), rtol=1e-6)


@pytest.mark.parametrize("architecture", ["airbench", "seed_cnn"])
@pytest.mark.slow
def test_features_ride_along_without_changing_the_probabilities_in_every_serving(architecture, tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    model = with_tta(build_model(architecture, 4, width=0.25, seed=0), translate=architecture == "airbench")
    network = unwrap_tta(model)[0]
    layers = stage_layers(network)
    sides = [network.get_layer(name).output.shape[1] for name in layers[:-1]]
    assert len(sides) >= 2 and sides == sorted(set(sides), reverse=True)  # the last activation at each resolution
    head = [layer for layer in network.layers if type(layer).__name__ == "Dense"][-1]
    assert network.get_layer(layers[-1]).output is head.input  # and what the classifier's head reads
    scored = with_features(network, layers)
    alone, features = KerasClassifier(scored).classify(pixels)
    np.testing.assert_allclose(alone, KerasClassifier(network).predict(pixels), atol=1e-5)
    assert [f.shape[0] for f in features] == [6] * len(layers) and all(f.ndim == 2 for f in features)
    wrapper = served_with_features(model, layers)
    assert [layer.name for layer in wrapper.layers if "tta" in layer.name] == [
        layer.name for layer in model.layers if "tta" in layer.name
    ]  # the same views
    every, tta_features = KerasClassifier(wrapper).classify(pixels)
    np.testing.assert_allclose(every, KerasClassifier(model).predict(pixels), atol=1e-5)
    for mine, reference in zip(tta_features, features, strict=True):  # the image's own view, not a mirror
        np.testing.assert_allclose(mine, reference, atol=1e-4)
    # Its TFLite export returns them too, in the same order (the interpreter lists outputs in any order).
    path = tmp_path / "model.tflite"
    path.write_bytes(convert(write_saved_model(wrapper, tmp_path / "saved"), "float32", pixels))
    exported, exported_features = TFLiteClassifier(path).classify(pixels)
    np.testing.assert_allclose(exported, every, atol=1e-5)
    for mine, reference in zip(exported_features, features, strict=True):
        np.testing.assert_allclose(mine, reference, rtol=1e-4, atol=1e-4)
    cascade = CascadeClassifier(KerasClassifier(scored), KerasClassifier(model), 1.0, 0.5)
    _, cascade_features = cascade.classify(pixels)
    for mine, reference in zip(cascade_features, features, strict=True):
        np.testing.assert_allclose(mine, reference, atol=1e-4)
    rule = fit_rule(layers, [np.concatenate([f] * 3) for f in features], np.arange(18) % 2, features)
    probabilities, outside = FeatureClassifier(cascade, rule).flagged(pixels)
    assert probabilities.shape == (6, 4) and outside.dtype == bool and outside.shape == (6,)
    assert KerasClassifier(model).flagged(pixels)[1] is None  # a plain model has no rule
