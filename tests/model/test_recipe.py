import keras
import numpy as np
import pytest

from model_lib.config import resolve_config
from model_lib.models import build_model
from model_lib.recipe import lookahead_callback, make_optimizer

rng = np.random.default_rng(0)
IMAGES = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.float32)
LABELS = keras.utils.to_categorical(np.arange(16) % 10, 10)


def _one_step_deltas(model, start_weights, config) -> dict[str, np.ndarray]:
    model.set_weights(start_weights)
    model.compile(optimizer=make_optimizer(config, total_steps=10, model=model), loss="categorical_crossentropy")
    model.train_on_batch(IMAGES, LABELS)
    return {w.path: w.numpy() - s for w, s in zip(model.weights, start_weights, strict=True)}


def test_batch_norm_offsets_step_bias_lr_scale_times_further():
    model = build_model("airbench", 10, calibration_images=IMAGES.astype(np.uint8), width=0.25)
    start = [w.numpy() for w in model.weights]
    plain = dict(optimizer="sgd", lr_schedule="constant", learning_rate=0.01, momentum=0.0, weight_decay=0.0)
    boosted = _one_step_deltas(model, start, resolve_config("default", bias_lr_scale=64.0, **plain))
    unboosted = _one_step_deltas(model, start, resolve_config("default", bias_lr_scale=1.0, **plain))
    offsets = [path for path in boosted if path.endswith("/beta")]
    kernels = [path for path in boosted if path.endswith("/kernel") and np.abs(unboosted[path]).max() > 0]
    assert len(offsets) == 6 and kernels
    for path in offsets:
        np.testing.assert_allclose(boosted[path], 64 * unboosted[path], rtol=1e-3, atol=1e-7)
    for path in kernels:
        np.testing.assert_allclose(boosted[path], unboosted[path], rtol=1e-5, atol=1e-7)


def test_lookahead_blends_into_slow_weights_every_few_steps_with_a_cubic_ramp():
    def fresh_model():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return model

    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)
    with_lookahead = fresh_model()
    lookahead = lookahead_callback(every=5, final_decay=0.8, total_steps=10)
    with_lookahead.fit(x, y, batch_size=8, epochs=10, shuffle=False, verbose=0, callbacks=[lookahead])

    by_hand = fresh_model()
    slow = [w.numpy() for w in by_hand.weights]
    for step in range(1, 11):
        by_hand.train_on_batch(x, y)
        if step % 5 == 0:
            decay = 0.8 * (step / 10) ** 3
            slow = [s + (1 - decay) * (w.numpy() - s) for s, w in zip(slow, by_hand.weights, strict=True)]
            by_hand.set_weights(slow)
    for a, b in zip(with_lookahead.get_weights(), by_hand.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    plain = fresh_model()
    plain.fit(x, y, batch_size=8, epochs=10, shuffle=False, verbose=0)
    assert not np.allclose(plain.get_weights()[0], with_lookahead.get_weights()[0], atol=1e-4)


@pytest.mark.parametrize("width", [0.25, 1.0])
def test_airbench_convs_start_as_identity_on_their_input_channels(width):
    model = build_model("airbench", 10, width=width)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D) and layer.name != "whiten"]
    assert len(convs) == 6
    for conv in convs:
        kernel = conv.kernel.numpy()
        passed = min(kernel.shape[2], kernel.shape[3])
        identity = np.zeros((3, 3, kernel.shape[2], passed), np.float32)
        identity[1, 1, np.arange(passed), np.arange(passed)] = 1
        np.testing.assert_array_equal(kernel[..., :passed], identity)
        assert np.abs(kernel[..., passed:]).sum() > 0 or passed == kernel.shape[3]
