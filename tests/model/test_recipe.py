import keras
import numpy as np
import pytest

from model_lib.config import resolve_config
from model_lib.models import build_model
from model_lib.recipe import make_optimizer, orthogonalise, with_lookahead

pytestmark = pytest.mark.backends
rng = np.random.default_rng(0)
IMAGES = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.float32)
LABELS = keras.utils.to_categorical(np.arange(16) % 10, 10)


def _one_step_deltas(model, start_weights, config) -> dict[str, np.ndarray]:
    model.set_weights(start_weights)
    model.compile(optimizer=make_optimizer(config, total_steps=10, model=model), loss="categorical_crossentropy")
    model.train_on_batch(IMAGES, LABELS)
    return {w.path: w.numpy() - s for w, s in zip(model.weights, start_weights, strict=True)}


@pytest.mark.slow
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


@pytest.mark.parametrize("backend_step", ["compiled", "eager"])
@pytest.mark.slow
def test_lookahead_blends_into_slow_weights_every_few_steps_with_a_cubic_ramp(backend_step):
    def fresh_model(optimizer):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(optimizer=optimizer, loss="mse", run_eagerly=backend_step == "eager")
        return model

    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)
    with_slow = fresh_model(with_lookahead(keras.optimizers.SGD, every=5, final_decay=0.8, total_steps=10)(0.1))
    with_slow.fit(x, y, batch_size=8, epochs=7, shuffle=False, verbose=0)  # ends mid-period: the slow copy wins

    by_hand = fresh_model(keras.optimizers.SGD(0.1))
    for step in range(1, 8):
        by_hand.train_on_batch(x, y)
        if step == 1:
            slow = [w.numpy() for w in by_hand.weights]
        if step % 5 == 0:
            decay = 0.8 * (step / 10) ** 3
            slow = [s + (1 - decay) * (w.numpy() - s) for s, w in zip(slow, by_hand.weights, strict=True)]
            by_hand.set_weights(slow)
    for a, b in zip(with_slow.get_weights(), slow, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(by_hand.get_weights()[0], with_slow.get_weights()[0], atol=1e-4)


@pytest.mark.slow
def test_lookahead_state_survives_a_checkpoint(tmp_path):
    """A resumed run continues from the same slow copy: it is saved with the optimiser's variables."""
    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)

    def fresh_model():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(optimizer=with_lookahead(keras.optimizers.SGD, 5, 0.8, 10)(0.1), loss="mse")
        return model

    whole = fresh_model()
    whole.fit(x, y, batch_size=8, epochs=10, shuffle=False, verbose=0)
    first, second = fresh_model(), fresh_model()
    first.fit(x, y, batch_size=8, epochs=6, shuffle=False, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(str(tmp_path), save_freq="epoch")])  # fmt: skip
    second.fit(x, y, batch_size=8, epochs=10, shuffle=False, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(str(tmp_path), save_freq="epoch")])  # fmt: skip
    for a, b in zip(whole.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


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


def _newton_schulz_reference(g: np.ndarray) -> np.ndarray:
    """airbench94_muon's zeropower_via_newtonschulz5, in float64 NumPy on PyTorch's (out, in*k*k) layout."""
    x = g / (np.linalg.norm(g) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(3):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(3, 3, 24, 16), (3, 3, 16, 64), (3, 3, 64, 64)])
def test_muon_steps_conv_kernels_as_airbench94_muon_does_and_other_weights_by_sgd(shape):
    config = resolve_config("default", optimizer="muon", lr_schedule="constant", learning_rate=0.5,
                            muon_learning_rate=0.2, muon_momentum=0.6, momentum=0.85, weight_decay=0.0,
                            lookahead_every=0)  # fmt: skip
    kernel = keras.Variable(rng.normal(size=shape).astype(np.float32))
    dense = keras.Variable(rng.normal(size=(16, 10)).astype(np.float32))
    optimizer = make_optimizer(config, total_steps=10)
    plain = keras.optimizers.SGD(0.5, momentum=0.85, nesterov=True)
    dense_by_sgd = keras.Variable(dense.numpy())

    torch_layout = kernel.numpy().transpose(3, 2, 0, 1)  # (out, in, kh, kw)
    buffer = np.zeros_like(torch_layout, np.float64)
    for _ in range(2):
        grads = rng.normal(size=shape).astype(np.float32), rng.normal(size=(16, 10)).astype(np.float32)
        optimizer.apply_gradients(zip(grads, [kernel, dense], strict=True))
        plain.apply_gradients([(grads[1], dense_by_sgd)])
        g = grads[0].transpose(3, 2, 0, 1).astype(np.float64)
        buffer = 0.6 * buffer + g
        direction = g + 0.6 * buffer
        torch_layout = torch_layout * np.sqrt(len(torch_layout)) / np.linalg.norm(torch_layout)
        update = _newton_schulz_reference(direction.reshape(len(direction), -1)).reshape(direction.shape)
        torch_layout = torch_layout - 0.2 * update

    np.testing.assert_allclose(kernel.numpy(), torch_layout.transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dense.numpy(), dense_by_sgd.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(576, 64), (2304, 256), (64, 2304)])
def test_orthogonalise_brings_every_singular_value_near_one(shape):
    """Singular values five-fold apart all come out between 0.6 and 1.3 in three iterations."""
    k = min(shape)
    u, _ = np.linalg.qr(rng.normal(size=(shape[0], k)))
    v, _ = np.linalg.qr(rng.normal(size=(shape[1], k)))
    matrix = ((u * np.linspace(1, 5, k)) @ v.T).astype(np.float32)
    singular = np.linalg.svd(keras.ops.convert_to_numpy(orthogonalise(matrix)), compute_uv=False)
    assert 0.6 < singular.min() and singular.max() < 1.3, (singular.min(), singular.max())
