import keras
import numpy as np
import pytest

from model_lib.config import resolve_config
from model_lib.models import (
    ARCHITECTURES,
    build_model,
    network_parameter_count,
    patch_whitening_kernel,
    tta_views,
    unwrap_tta,
    view_pixels,
    with_tta,
)
from model_lib.recipe import learning_rate_schedule
from model_lib.train import to_serving_model

rng = np.random.default_rng(0)
IMAGES = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)


# Every architecture under JAX as well (`backends`) but transfer: MobileNetV3's cold XLA compiles took 40-50 s a test
# in a clean clone's JAX pass, and tests/model/test_transfer.py builds and trains it under JAX already.
ON_EVERY_BACKEND = [name if name == "transfer" else pytest.param(name, marks=pytest.mark.backends)
                    for name in sorted(ARCHITECTURES)]  # fmt: skip


def test_seed_cnn_is_the_origin_network():
    model = build_model("seed_cnn", 10)
    assert model.count_params() == 161_098
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 3 and kinds.count("BatchNormalization") == 3 and kinds.count("MaxPooling2D") == 3
    assert [layer.filters for layer in model.layers if hasattr(layer, "filters")] == [32, 64, 128]


@pytest.mark.parametrize("architecture", ON_EVERY_BACKEND)
@pytest.mark.slow
def test_architectures_build_and_train_a_step_on_cpu(architecture):
    model = build_model(architecture, 10, calibration_images=IMAGES, dtype_policy="mixed_bfloat16")
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    labels = keras.utils.to_categorical(np.arange(8) % 10, 10)
    loss = model.train_on_batch(IMAGES.astype(np.float32), labels)
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    probabilities = model.predict(IMAGES, verbose=0)  # raw uint8 pixels in
    assert probabilities.dtype == np.float32 and np.allclose(probabilities.sum(axis=1), 1, atol=1e-3)


def test_flip_tta_returns_the_average_of_both_views():
    model = build_model("seed_cnn", 10)
    tta = with_tta(model)
    expected = (model.predict(IMAGES, verbose=0) + model.predict(IMAGES[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(tta.predict(IMAGES, verbose=0), expected, atol=1e-6)
    assert not np.allclose(model.predict(IMAGES, verbose=0), expected, atol=1e-4)  # the flip really changes it
    # The manifest counts the network, not the wrapper's fixed 32x32 mirror matrix.
    assert (network_parameter_count(tta), tta.count_params()) == (161_098, 161_098 + 32 * 32)
    assert network_parameter_count(model) == 161_098


def test_translate_tta_is_airbenchs_mirror_plus_translate_and_loads_safely(tmp_path):
    network = build_model("seed_cnn", 10)
    padded = np.pad(IMAGES, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    # airbench's views: the image, and the windows at the reflect-padded image's corners (0:32 and 2:34).
    np.testing.assert_array_equal(view_pixels(IMAGES, -1, False), padded[:, 0:32, 0:32])
    np.testing.assert_array_equal(view_pixels(IMAGES, 1, True), padded[:, 2:34, 2:34][:, :, ::-1])
    np.testing.assert_array_equal(view_pixels(IMAGES, 0, True), IMAGES[:, :, ::-1])

    def pair(images):
        return (network.predict(images, verbose=0) + network.predict(images[:, :, ::-1], verbose=0)) / 2

    expected = pair(IMAGES) / 2 + pair(padded[:, 0:32, 0:32]) / 4 + pair(padded[:, 2:34, 2:34]) / 4
    tta = with_tta(network, translate=True)
    np.testing.assert_allclose(tta.predict(IMAGES, verbose=0), expected, atol=1e-6)
    assert not np.allclose(with_tta(network).predict(IMAGES, verbose=0), expected, atol=1e-4)
    tta.save(tmp_path / "tta.keras")
    reloaded = keras.saving.load_model(tmp_path / "tta.keras", safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(IMAGES, verbose=0), expected, atol=1e-6)
    assert unwrap_tta(reloaded)[1] == tta_views(translate=True) and len(set(tta_views(translate=True))) == 6
    assert unwrap_tta(with_tta(network))[1] == ((0, False), (0, True)) and unwrap_tta(network)[1] == ()
    assert network_parameter_count(reloaded) == 161_098


def test_serving_model_is_a_float32_twin_with_the_trained_weights(tmp_path):
    config = resolve_config("airbench94", tta_flip=False)
    trained = build_model("airbench", 10, calibration_images=IMAGES, dtype_policy="mixed_bfloat16")
    serving = to_serving_model(trained, config, 10, IMAGES)
    assert all(w.dtype == "float32" for w in serving.weights)
    np.testing.assert_allclose(serving.predict(IMAGES, verbose=0), trained.predict(IMAGES, verbose=0), atol=0.05)
    serving.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(reloaded.predict(IMAGES, verbose=0), serving.predict(IMAGES, verbose=0))


def test_patch_whitening_decorrelates_patches():
    images = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    kernel = patch_whitening_kernel(images)
    assert kernel.shape == (2, 2, 3, 24)
    np.testing.assert_allclose(kernel[..., :12], -kernel[..., 12:])


def test_a_large_image_is_cut_into_whitened_patches_and_the_conv_groups_run_at_cifar_size():
    images = rng.integers(0, 256, (40, 128, 128, 3), dtype=np.uint8)
    model = build_model("airbench", 10, 128, calibration_images=images)
    whiten = model.get_layer("whiten")
    assert whiten.kernel.shape == (4, 4, 3, 96) and whiten.strides == (4, 4)
    assert whiten.output.shape[1:3] == (32, 32)  # then airbench's three groups, as on a CIFAR image
    # Its outputs are whitened: about unit variance, uncorrelated (the first half; the second is its negation).
    features = keras.Model(model.inputs, whiten.output).predict(images, verbose=0)[..., :48].reshape(-1, 48)
    covariance = np.cov(features, rowvar=False)
    np.testing.assert_allclose(covariance, np.eye(48), atol=0.05)
    assert model.predict(images[:2], verbose=0).shape == (2, 10)


def test_auto_image_size_takes_the_largest_supported_side_within_the_images():
    from model_lib.sources import auto_image_size

    assert auto_image_size([32] * 5) == 32 and auto_image_size([8, 8, 8]) == 32  # never below 32
    assert auto_image_size([375, 480, 375]) == 128 and auto_image_size([70, 100, 90]) == 64


def test_warmup_linear_schedule_rises_from_a_fraction_to_the_peak_then_falls_to_a_fraction():
    config = resolve_config(
        "default", learning_rate=0.4, warmup_fraction=0.2, lr_start_fraction=0.2, lr_end_fraction=0.1
    )
    schedule = learning_rate_schedule(config, total_steps=1000)
    lr = [float(schedule(step)) for step in (0, 100, 200, 600, 1000, 1200)]
    assert lr[0] == pytest.approx(0.08) and lr[1] == pytest.approx(0.24) and lr[2] == pytest.approx(0.4)
    assert lr[3] == pytest.approx(0.4 * (1 - 0.9 * 400 / 800)) and lr[4] == lr[5] == pytest.approx(0.04)
    assert learning_rate_schedule(resolve_config("seed"), 100) == 1e-3


@pytest.mark.parametrize("architecture", ON_EVERY_BACKEND)
@pytest.mark.slow
def test_a_seed_gives_the_same_weights_while_other_threads_draw_random_numbers(architecture):
    """Prefect's background threads draw from Python's `random` too: Keras' initializers must not."""
    import random
    import threading

    stop = threading.Event()

    def draw():  # as a log or API worker thread does, at any moment
        while not stop.is_set():
            random.random()

    def weights(seed: int) -> list[np.ndarray]:
        keras.utils.set_random_seed(seed)
        return build_model(architecture, 10, calibration_images=IMAGES, seed=seed).get_weights()

    drawer = threading.Thread(target=draw)
    drawer.start()
    try:
        first, second, other = weights(0), weights(0), weights(1)
    finally:
        stop.set()
        drawer.join()
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
