"""Training on a small synthetic folder: learns, logs each epoch, and resumes after an interrupt."""

import re
from pathlib import Path

import keras
import pytest

from model_lib.config import resolve_config
from model_lib.data import ingest
from model_lib.preprocess import prepare_split
from model_lib.runs import read_history
from model_lib.train import train


class Interrupt(Exception):
    pass


class CrashInSecondEpoch(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self.model.optimizer.iterations.numpy() > self.params["steps"]:
            raise Interrupt("simulated crash in epoch 2")


def epoch_summaries(lines: list[str]) -> list[str]:
    """The `epoch i/n` of each epoch's summary line; progress lines (`epoch i/n step k/m: ...`), which a
    slow machine also logs, are left out."""
    return [line.split(":")[0] for line in lines if re.match(r"epoch \d+/\d+: ", line)]


def _prepare(colour_dataset, artifacts, **overrides):
    config = resolve_config("smoke", data=str(colour_dataset), validation_split=0.25, batch_size=8, **overrides)
    dataset = ingest(config.data, artifacts, log=lambda m: None)
    run_dir = artifacts / "runs" / config.run_key(dataset.fingerprint)
    run_dir.mkdir(parents=True)
    prepared = prepare_split(dataset.cache_dir, dataset.class_names, config, run_dir)
    return config, dataset, Path(prepared.split_path), run_dir


@pytest.mark.backends
@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="TensorFlow's op determinism is process-wide: two `train` commands at once check it (test_edges.py)",
)
def test_two_deterministic_runs_under_jax_train_the_same_weights(colour_dataset, artifacts):
    """`--deterministic` under JAX: the same config, seed, data and machine give the same model. In one process
    (compiled once), where two commands at once cost the JAX pass 54 CPU s for the same check."""
    import numpy as np

    weights = []
    for attempt in ("first", "second"):
        prepared = _prepare(colour_dataset, artifacts / attempt, epochs=2, deterministic=True)
        result = train(*prepared, log=lambda message: None)
        weights.append(keras.saving.load_model(result.model_path, safe_mode=True).get_weights())
    assert len(weights[0]) == len(weights[1]) > 0
    for first, second in zip(*weights, strict=True):
        np.testing.assert_array_equal(first, second)


@pytest.mark.backends
@pytest.mark.slow
def test_interrupted_run_resumes_where_it_stopped(colour_dataset, artifacts, monkeypatch):
    import model_lib.train

    opened = []

    class Recorded(model_lib.train.Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            opened.append(self)

        def close(self):
            self.closed = True
            super().close()

    monkeypatch.setattr(model_lib.train, "Progress", Recorded)
    config, dataset, split_path, run_dir = _prepare(colour_dataset, artifacts, epochs=3)
    with pytest.raises(Interrupt):
        train(config, dataset, split_path, run_dir, log=lambda m: None, extra_callbacks=(CrashInSecondEpoch(),))
    assert opened and all(progress.closed for progress in opened)  # a crash never leaves a bar on the terminal
    assert (run_dir / "checkpoint").is_dir() and not (run_dir / "model.keras").exists()
    assert read_history(run_dir / "history.csv")["epoch"].tolist() == [0]

    lines = []
    result = train(config, dataset, split_path, run_dir, log=lines.append)
    assert any("Resuming phase train from checkpoint" in line for line in lines)
    assert epoch_summaries(lines) == ["epoch 2/3", "epoch 3/3"]  # epoch 1 not redone
    summary = next(line for line in lines if line.startswith("epoch 2/3: "))
    assert "val_accuracy=" in summary and summary.endswith("s")
    assert result.epochs_run == 3 and read_history(run_dir / "history.csv")["epoch"].tolist() == [0, 1, 2]
    assert Path(result.model_path).is_file() and not (run_dir / "checkpoint").exists()
    assert (run_dir / "tensorboard").is_dir()


@pytest.mark.backends
@pytest.mark.slow
def test_diverged_training_raises_and_saves_no_model(colour_dataset, artifacts):
    from model_lib.train import TrainingDiverged

    config, dataset, split_path, run_dir = _prepare(
        colour_dataset, artifacts, architecture="seed_cnn", epochs=3, optimizer="sgd", learning_rate=50.0,
        lr_schedule="constant",
    )  # fmt: skip
    refused = TrainingDiverged
    if keras.backend.backend() == "jax":  # saturates at the clipped loss (10.7) instead of NaN: it learned nothing
        from model_lib.evaluate import NothingLearned

        refused = (TrainingDiverged, NothingLearned)
    with pytest.raises(refused, match="nothing was registered"):
        train(config, dataset, split_path, run_dir, log=lambda m: None)
    assert not (run_dir / "model.keras").exists()


class CrashInEpoch(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.model.optimizer.iterations.numpy() > self.epoch * self.params["steps"]:
            raise Interrupt(f"simulated crash in epoch {self.epoch + 1}")


@pytest.mark.backends
@pytest.mark.parametrize("saves", [1, 2])
@pytest.mark.slow
def test_a_checkpoint_cut_short_by_a_kill_never_blocks_the_resume(colour_dataset, artifacts, saves):
    config, dataset, split_path, run_dir = _prepare(colour_dataset, artifacts, epochs=4)
    with pytest.raises(Interrupt):
        train(config, dataset, split_path, run_dir, log=lambda m: None, extra_callbacks=(CrashInEpoch(saves),))
    (run_dir / "checkpoint" / "latest.weights.h5").write_bytes(b"\x89HDF\r\n cut short by a kill")
    lines = []
    result = train(config, dataset, split_path, run_dir, log=lines.append)
    epochs = epoch_summaries(lines)
    if saves == 2:  # the previous checkpoint (after epoch 1) is used: epochs 2-4 are trained
        assert epochs == ["epoch 2/4", "epoch 3/4", "epoch 4/4"]
    else:  # nothing to fall back to: the phase starts again, and says so
        assert any("unreadable" in line and "starts again" in line for line in lines)
        assert epochs == ["epoch 1/4", "epoch 2/4", "epoch 3/4", "epoch 4/4"]
    assert result.epochs_run == 4 and read_history(run_dir / "history.csv")["epoch"].tolist() == [0, 1, 2, 3]


@pytest.mark.backends
@pytest.mark.slow
def test_a_long_epoch_reports_progress_from_hooks_run_off_the_training_loop(colour_dataset, artifacts, monkeypatch):
    """Progress lines with rate and time left. Under JAX the callbacks' batch-end hooks run in Keras' thread pool,
    so the loop never waits for each step to finish (on a GPU, a third of an epoch). A hook there must neither
    read `callback.model` (it would write the loop's state into the model while the next step consumes it:
    JAX's "Array has been deleted") nor log (a Prefect run's logger finds its run on the loop's thread only)."""
    import threading

    import model_lib.train

    def on_the_loop() -> bool:
        return threading.current_thread() is threading.main_thread()

    hooks_on_the_loop, touched, lines = set(), set(), []
    off_the_step = model_lib.train._off_the_step

    def recorded(callback):
        hook = callback.on_train_batch_end

        def on_train_batch_end(batch, logs=None):
            hooks_on_the_loop.add(on_the_loop())
            hook(batch, logs)

        callback.on_train_batch_end = on_train_batch_end
        return off_the_step(callback)

    model_of = keras.callbacks.Callback.model.fget

    def model(callback):
        if not on_the_loop():
            touched.add(type(callback).__name__)
        return model_of(callback)

    def log(line: str) -> None:
        assert on_the_loop(), f"logged off the loop's thread: {line}"
        lines.append(line)

    monkeypatch.setattr(model_lib.train, "_off_the_step", recorded)
    monkeypatch.setattr(keras.callbacks.Callback, "model", property(model))
    monkeypatch.setattr(model_lib.train, "PROGRESS_SECONDS", 0.0)  # a line whenever the count moves, to see them
    config, dataset, split_path, run_dir = _prepare(colour_dataset, artifacts, epochs=2, learned_margin=-1.0)
    train(config, dataset, split_path, run_dir, log=log)
    assert not touched
    assert hooks_on_the_loop == ({False} if keras.backend.backend() == "jax" else {True})  # TensorFlow's: in line

    progress = [re.match(r"epoch (\d)/2 step (\d)/4: (\d)/8 steps, .* steps/s, about .*s left$", line)
                for line in lines if " step " in line]  # fmt: skip
    assert progress and all(progress)  # 27 training images, 8 per step: 4 steps an epoch
    counts = [(int(epoch), int(step), int(done)) for epoch, step, done in (match.groups() for match in progress)]
    assert all(done == 4 * (epoch - 1) + step for epoch, step, done in counts)  # the step named is the step counted
    assert [done for _, _, done in counts] == sorted({done for _, _, done in counts})  # rising, each shown once
    assert (1, 4, 4) in counts  # the end of an epoch shows its last steps (the run's very last: its summary line)
    if keras.backend.backend() == "tensorflow":  # in line, every step is shown as it ends
        assert [done for _, _, done in counts] == [1, 2, 3, 4, 5, 6, 7]


def test_a_deterministic_pipeline_augments_the_same_batches_while_the_cores_are_busy():
    """Keras' random layers advance a seed state on each call: parallel augmentation calls took the
    draws in thread order, which is why two concurrent --deterministic runs once differed."""
    import hashlib
    import threading

    import numpy as np

    from model_lib.preprocess import make_datasets
    from model_lib.split import stratified_split

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8), np.arange(2000) % 10
    config = resolve_config("smoke", deterministic=True, seed=0, batch_size=64)
    split = stratified_split(y, config.validation_split, config.seed)
    stop = threading.Event()

    def burn():  # contention, as when another run shares the cores
        matrix = rng.random((300, 300))
        while not stop.is_set():
            matrix @ matrix

    def digest() -> str:
        keras.utils.set_random_seed(0)
        train_ds, _ = make_datasets(x, y, split, 10, config)
        hashed = hashlib.sha256()
        for images, _ in train_ds.take(6):
            hashed.update(np.asarray(images).tobytes())
        return hashed.hexdigest()

    burners = [threading.Thread(target=burn) for _ in range(3)]
    for burner in burners:
        burner.start()
    try:
        assert len({digest() for _ in range(4)}) == 1
    finally:
        stop.set()
        for burner in burners:
            burner.join()


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_in_memory_batches_split_evenly_over_devices_and_validation_counts_every_image_once(shards):
    """JAX shards each batch over the devices: a batch that does not divide evenly fails to load."""
    import numpy as np

    from model_lib.preprocess import array_batches

    x = np.arange(27, dtype=np.uint8)[:, None, None, None].repeat(3, axis=3)  # each image is its own index
    y = np.arange(27) % 3
    size = 4 * shards  # the global batch: 4 images per device
    training = array_batches(x, y, 3, batch_size=size, seed=0, shards=shards)
    assert len(training) == {1: 7, 2: 4, 3: 3}[shards]  # 27 images in batches of 4, 8, 12: last batch 3, 2, 3
    for _ in range(2):  # two epochs, reshuffled
        seen = [training[i][0][:, 0, 0, 0] for i in range(len(training))]
        assert all(len(images) % shards == 0 and len(images) <= size for images in seen)
        seen = np.concatenate(seen).astype(int)
        assert len(set(seen)) == len(seen) == {1: 27, 2: 26, 3: 27}[shards]  # the last batch's odd image sits out
        training.on_epoch_end()

    validation = array_batches(x, y, 3, batch_size=size, seed=None, shards=shards)
    batches = [validation[i] for i in range(len(validation))]
    assert all(len(batch[0]) % shards == 0 for batch in batches) and len(validation) == -(-27 // size)
    if shards == 1:
        assert all(len(batch) == 2 for batch in batches)  # no weights where nothing is padded
        counted = np.concatenate([batch[0][:, 0, 0, 0] for batch in batches])
        labels = np.concatenate([batch[1] for batch in batches])
    else:
        counted = np.concatenate([batch[0][batch[2] == 1][:, 0, 0, 0] for batch in batches])
        labels = np.concatenate([batch[1][batch[2] == 1] for batch in batches])
        assert sum(float(batch[2].sum()) for batch in batches) == 27
    assert counted.astype(int).tolist() == list(range(27))  # every image once, in order
    assert labels.argmax(axis=1).tolist() == (np.arange(27) % 3).tolist()
    with pytest.raises(ValueError, match="multiple of the 2 devices"):
        array_batches(x, y, 3, batch_size=7, seed=0, shards=2)


@pytest.mark.backends
def test_alternate_flip_shows_each_image_both_ways_every_two_epochs_and_keeps_the_parity_in_checkpoints(tmp_path):
    """airbench's alternating flip: a seeded half mirrored once, then every image mirrored in odd epochs."""
    import numpy as np

    from model_lib.preprocess import (
        TrainImages,
        alternate_epoch_mirror,
        batch_augmenter,
        mirror_mask,
        with_augmentation,
    )

    images = np.random.default_rng(0).integers(0, 256, (100, 4, 4, 3), dtype=np.uint8)
    first = TrainImages(images, np.arange(100), mirror_mask(100, seed=3))[np.arange(100)]
    mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(first, images, strict=True)]
    unchanged = [np.array_equal(a, b) for a, b in zip(first, images, strict=True)]
    assert 35 < sum(mirrored) < 65 and all(m or u for m, u in zip(mirrored, unchanged, strict=True))
    again = TrainImages(images, np.arange(100), mirror_mask(100, seed=3))[np.arange(99, -1, -1)]  # any order
    np.testing.assert_array_equal(again[::-1], first)
    np.testing.assert_array_equal(images, np.random.default_rng(0).integers(0, 256, (100, 4, 4, 3), dtype=np.uint8))

    layer = alternate_epoch_mirror(steps_per_epoch=2)
    batch = first[:8].astype(np.float32)
    seen = [np.asarray(layer(batch, training=True)) for _ in range(6)]
    assert [np.array_equal(view, batch[:, :, ::-1]) for view in seen] == [False, False, True, True, False, False]
    np.testing.assert_array_equal(np.asarray(layer(batch)), batch)  # never at inference

    config = resolve_config("smoke", alternate_flip=True, augment_translate=0)
    assert batch_augmenter(config) is None  # no random mirror beside it
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    trainer = with_augmentation(model, config, steps_per_epoch=2)
    trainer.compile("sgd", "mse")
    trainer.fit(batch, np.zeros((8, 2), np.float32), batch_size=4, epochs=3, verbose=0)  # compiled, as in training
    trainer.save_weights(tmp_path / "w.weights.h5")
    resumed = with_augmentation(model, config, steps_per_epoch=2)
    resumed.load_weights(tmp_path / "w.weights.h5")
    assert [int(np.asarray(t.layers[0].calls.value)) for t in (trainer, resumed)] == [6, 6]


@pytest.mark.backends
def test_the_translation_compiles_into_the_step_and_moves_images_as_keras_own_layer_does():
    """Keras' RandomTranslation is marked not compilable, so under JAX it ran eagerly outside the step (most
    of a GPU step's time). The slices that replace it must give the same images from the same draws."""
    import numpy as np

    from model_lib.preprocess import augments_in_step, batch_augmenter, whole_pixel_translation

    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.float32)
    ours, keras_own = (
        whole_pixel_translation(2 / 32, seed=7),
        keras.layers.RandomTranslation(2 / 32, 2 / 32, fill_mode="reflect", interpolation="nearest", seed=7),
    )
    for _ in range(3):  # the same seed state advancing the same way
        moved = np.asarray(ours(images, training=True))
        np.testing.assert_array_equal(moved, np.asarray(keras_own(images, training=True)))
    assert sum(not np.array_equal(a, b) for a, b in zip(moved, images, strict=True)) > 40  # most images moved
    wide = keras.layers.RandomTranslation(0.3, 0.1, fill_mode="reflect", interpolation="nearest")
    drawn = wide.get_random_transformation(images, training=True)
    assert np.abs(np.asarray(drawn["translations"])[:, 1]).max() > 5  # shifts past one border's width of pixels
    narrow_wide = whole_pixel_translation(0.3, seed=0)
    narrow_wide.width_lower, narrow_wide.width_upper = -0.1, 0.1
    np.testing.assert_array_equal(
        np.asarray(narrow_wide.transform_images(images, drawn)), np.asarray(wide.transform_images(images, drawn))
    )
    np.testing.assert_array_equal(np.asarray(ours(images, training=False)), images)

    if augments_in_step():  # TensorFlow augments in tf.data, where Keras' own layer runs as a graph
        assert batch_augmenter(resolve_config("default"), "host") is None  # nothing left outside the step
    trainer = keras.Sequential([keras.Input((32, 32, 3)), whole_pixel_translation(2 / 32, seed=7),
                                keras.layers.Flatten(), keras.layers.Dense(10)])  # fmt: skip
    trainer.compile("sgd", "mse", jit_compile=True)  # raises if a layer cannot be compiled
    trainer.fit(images, np.zeros((64, 10), np.float32), batch_size=32, epochs=1, verbose=0)


@pytest.mark.parametrize("when", ["step", "epoch end"])
def test_a_non_finite_loss_stops_training_from_the_loops_own_thread(when):
    """The NaN check's batch hook may run in Keras' thread pool: it only notes the loss, and the loop's thread
    stops training at the next step's start (or at the epoch's end, for an epoch's last step)."""
    from model_lib.train import _stop_on_nan

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    guard = _stop_on_nan()
    guard.set_model(model)
    model.stop_training = False
    guard.on_train_batch_end(0, {"loss": 0.5})
    guard.on_train_batch_begin(1)
    assert guard.async_safe and not model.stop_training  # a finite loss goes on
    if when == "step":
        guard.on_train_batch_end(1, {"loss": float("nan")})
        assert not model.stop_training  # noted only: the pool's thread never touches the model
        guard.on_train_batch_begin(2)
    else:  # the epoch's last step, whose hook Keras waits for before the epoch's end
        guard.on_epoch_end(0, {"loss": float("inf")})
    assert model.stop_training
