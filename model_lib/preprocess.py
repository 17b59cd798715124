"""Preprocess/augment: the stratified validation split and the input pipelines.

Under TensorFlow the pipelines are tf.data and augment in parallel map calls beside the training
step (on a 2-core CPU that overlap pays). Under other Keras backends (JAX) they are in-memory
batches and the same augmentation layers run inside the compiled training step, as airbench
does on GPUs: no tf.data, so no TensorFlow needed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_lib.config import TrainConfig
from model_lib.runs import SPLIT_FILE
from model_lib.split import Split, run_split, save_split

PREFETCH_BATCHES = 2  # batches prepared ahead of the training step
TRANSLATE_PER_SIDE = 32  # pixels of side that augment_translate's shift is given per


def test_set_fingerprint(x_test: np.ndarray, y_test: np.ndarray, class_names: list[str]) -> str:
    """Content hash of a test set: two models are only compared on test sets with equal hashes."""
    digest = hashlib.sha256("\n".join(class_names).encode())
    digest.update(np.ascontiguousarray(x_test).data)
    digest.update(np.ascontiguousarray(y_test, dtype=np.int32).data)
    return digest.hexdigest()[:32]


def batch_augmenter(config: TrainConfig, place: str = "all"):
    """A Keras pipeline of random layers that augments whole float32 batches, or None if none apply.

    Args:
        config: The augmentation settings.
        place: "all"; or "step", the layers XLA can compile into the training step; or "host",
            the others (Keras' RandomRotation and RandomZoom), which then run on each batch before it goes in.
    """
    import keras
    from keras import layers

    steps = []
    if config.augment_flip and not config.flip_alternates:
        steps.append(layers.RandomFlip("horizontal", seed=config.seed))
    if config.augment_rotation:
        steps.append(layers.RandomRotation(config.augment_rotation, seed=config.seed + 1))
    if config.augment_zoom:
        steps.append(layers.RandomZoom(config.augment_zoom, seed=config.seed + 2))
    if config.augment_translate:
        steps.append(random_translation(translate_factor(config), config.seed + 3))
    if place != "all":
        steps = [layer for layer in steps if layer.supports_jit == (place == "step")]
    return keras.Sequential(steps, name=f"augment_{place}") if steps else None


def translate_factor(config: TrainConfig) -> float:
    """`augment_translate` as a fraction of the side: its pixels are per 32 px (airbench's 2 of 32), so a larger
    image shifts by as much of itself."""
    return config.augment_translate / TRANSLATE_PER_SIDE


def random_translation(factor: float, seed: int):
    """Random shifts of up to `factor` of the side each way, borders reflected, nearest pixel: the layer
    for the backend's pipeline (inside the compiled step, or Keras' own in tf.data, where as a graph it
    is 4x faster on a CPU than the step's slices: bench/augment_cost.py)."""
    import keras

    if augments_in_step():
        return whole_pixel_translation(factor, seed)
    return keras.layers.RandomTranslation(factor, factor, "reflect", "nearest", seed=seed)


def whole_pixel_translation(factor: float, seed: int):
    """Keras' RandomTranslation with reflected borders and nearest-pixel sampling, in operations that
    XLA compiles into the training step (the backends that augment there).

    Keras' own layer warps the images with an affine transform that it marks as not compilable, so
    under JAX it ran eagerly on each batch outside the step, with a wait for the device each time:
    on an H200 that was 20-30 ms of a 30 ms step. With nearest-pixel sampling a translation moves
    each image by its draws rounded to whole pixels: here a slice of a copy padded with mirrored
    borders. Same draws, same seed, same images out (tests/model/test_train.py), on every backend.

    Args:
        factor: Largest shift each way, fraction of the side (Keras' height_factor and width_factor).
        seed: Seed of the draws.
    """
    import math

    import keras

    class WholePixelTranslation(keras.layers.RandomTranslation):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.supports_jit = True

        def _translate_inputs(self, inputs, transformation, interpolation):
            if transformation is None:
                return inputs
            ops = self.backend.numpy
            unbatched = len(inputs.shape) == 3
            images = ops.expand_dims(inputs, 0) if unbatched else inputs
            # Output pixel i is input pixel i - shift, read from the copy padded with mirrored borders. One
            # slice per possible shift, chosen by a mask, as airbench's batch_crop does.
            shifts = self.backend.cast(ops.round(transformation["translations"]), "int32")  # (batch, [x, y])
            bounds = {1: (self.height_lower, self.height_upper), 2: (self.width_lower, self.width_upper)}
            for axis, column in ((1, 1), (2, 0)):  # rows by the y shift, then columns by the x shift
                side = images.shape[axis]
                pad = math.ceil(max(map(abs, bounds[axis])) * side)
                widths = [[0, 0]] * 4
                widths[axis] = [pad, pad]
                padded = ops.pad(images, widths, mode="symmetric")  # Keras' "reflect": d c b a | a b c d
                shift = ops.reshape(shifts[:, column], [-1, 1, 1, 1])
                moved = images
                for amount in range(-pad, pad + 1):
                    window = [slice(None)] * 4
                    window[axis] = slice(pad - amount, pad - amount + side)
                    moved = ops.where(ops.equal(shift, amount), padded[tuple(window)], moved)
                images = moved
            return ops.squeeze(images, 0) if unbatched else images

    return WholePixelTranslation(
        height_factor=factor, width_factor=factor, fill_mode="reflect", interpolation="nearest", seed=seed
    )


def augments_in_step() -> bool:
    """Whether augmentation runs inside the training step (any backend but TensorFlow) rather than in tf.data."""
    import keras

    return keras.backend.backend() != "tensorflow"


def with_augmentation(model, config: TrainConfig, steps_per_epoch: int):
    """The model to train: `model` behind the layers that augment inside the step (identity outside
    training): the random ones on backends without tf.data, and the alternate-epoch mirror on all;
    `model` itself when there are none.

    Args:
        steps_per_epoch: Training batches per epoch, which tells the alternate-epoch mirror the epoch.
    """
    import keras

    steps = [
        batch_augmenter(config, "step") if augments_in_step() else None,
        alternate_epoch_mirror(steps_per_epoch) if config.flip_alternates else None,
    ]
    steps = [step for step in steps if step is not None]
    if not steps:
        return model
    return keras.Sequential([keras.Input(model.input_shape[1:]), *steps, model], name=f"{model.name}_training")


def mirror_mask(count: int, seed: int) -> np.ndarray:
    """Which of `count` training images start mirrored: a seeded half, the alternate-epoch mirror's first epoch."""
    return np.random.default_rng(seed).random(count) < 0.5


class TrainImages:
    """The training split's images, read a batch at a time from the cached array (a file reader or a memory
    map: never a copy of the whole split), with `mirror_mask`'s images mirrored when given one.

    Indexed by position in the split: `images[positions]` is a dense uint8 batch.
    """

    def __init__(self, source, index: np.ndarray, mirrored: np.ndarray | None = None):
        self.source, self.index, self.mirrored = source, np.asarray(index), mirrored
        self.shape = (len(self.index), *source.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, positions) -> np.ndarray:
        positions = np.asarray(positions)
        images = np.array(self.source[self.index[positions]])
        if self.mirrored is not None:
            flip = self.mirrored[positions]
            images[flip] = images[flip, :, ::-1]
        return images


def alternate_epoch_mirror(steps_per_epoch: int):
    """A layer that mirrors whole training batches in odd epochs (airbench's alternating flip over
    `mirror_mask`'s images), counting its training calls in a variable: checkpoints carry the
    count, so a resumed run keeps the parity, and no host round trip tells it the epoch."""
    import keras
    from keras import ops

    class AlternateEpochMirror(keras.layers.Layer):
        def build(self, input_shape):
            self.calls = self.add_weight(
                shape=(), initializer="zeros", dtype="int32", trainable=False, aggregation="only_first_replica"
            )

        def call(self, images, training=False):
            if not training:
                return images
            odd = ops.equal((self.calls // steps_per_epoch) % 2, 1)
            self.calls.assign(self.calls + 1)
            return ops.where(odd, ops.flip(images, axis=2), images)

    return AlternateEpochMirror(name="alternate_epoch_mirror")


def array_batches(
    x: np.ndarray, y: np.ndarray, num_classes: int, batch_size: int, seed: int | None, augment=None, shards: int = 1
):
    """Batches of float32 pixels and one-hot labels from in-memory arrays, for backends without tf.data.

    Args:
        x: uint8 images.
        y: Integer labels.
        num_classes: Width of the one-hot labels.
        batch_size: Images per batch (the last one may be smaller).
        seed: Seed of the per-epoch reshuffling (training); None keeps the order (validation).
        augment: Random layers applied to each batch here, outside the compiled step (those XLA cannot compile).
        shards: Devices each batch is split over: every batch holds a multiple of them. Training leaves
            the last batch's odd images out (others each epoch); validation pads its last batch with
            copies weighted 0, so accuracy counts every image once (the mean loss divides by the padded
            count: at most shards - 1 extra images).
    """
    import keras

    if batch_size % shards:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {shards} devices that split it")
    count = len(y)
    used = training_images(count, batch_size, shards) if seed is not None else count  # training cuts its last batch
    steps = -(-used // batch_size)

    class ArrayBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = np.arange(count)
            self.on_epoch_end()

        def __len__(self) -> int:
            return steps

        def __getitem__(self, index: int):
            rows = self.order[:used][index * batch_size : (index + 1) * batch_size]
            weights = np.ones(len(rows), np.float32)
            if len(rows) % shards:  # validation's last batch
                padding = validation_padding(len(rows), batch_size, shards)
                rows, weights = np.concatenate([rows, rows[:1].repeat(padding)]), np.pad(weights, (0, padding))
            images = x[rows].astype(np.float32)
            if augment is not None:
                images = np.asarray(augment(images, training=True))
            batch = images, np.eye(num_classes, dtype=np.float32)[y[rows]]
            return (*batch, weights) if shards > 1 and seed is None else batch

        def on_epoch_end(self) -> None:
            if seed is not None:
                self.order = self.rng.permutation(count)

    return ArrayBatches()


def make_datasets(x: np.ndarray, y: np.ndarray, split: Split, num_classes: int, config: TrainConfig, shards: int = 1):
    """The training and validation pipelines for the backend: tf.data under TensorFlow, else `array_batches`
    (whose augmentation `with_augmentation` puts in the step). Validation is None without a validation split.

    Args:
        shards: Devices that split each batch: every batch holds a multiple of them.
    """
    mirrored = mirror_mask(len(split.train_index), config.seed) if config.flip_alternates else None
    train = TrainImages(x, split.train_index, mirrored), np.asarray(y[split.train_index], np.int32)
    val = (np.asarray(x[split.val_index]), np.asarray(y[split.val_index])) if len(split.val_index) else None
    if not augments_in_step():
        return _tf_datasets(train, val, num_classes, config, shards)
    host_augment = batch_augmenter(config, "host")
    batches = array_batches(*train, num_classes, config.batch_size, config.seed, host_augment, shards)
    return batches, None if val is None else array_batches(*val, num_classes, config.batch_size, None, shards=shards)


def training_images(count: int, batch_size: int, shards: int) -> int:
    """How many of `count` training images an epoch uses so that every batch splits evenly over `shards`
    devices: the last batch's odd images sit the epoch out (other ones each epoch, as the order is
    reshuffled). A device handed no image at all fails (TensorFlow's convolutions on an empty batch under
    MirroredStrategy), and JAX cannot split an uneven batch."""
    return count - (count % batch_size) % shards


def validation_padding(count: int, batch_size: int, shards: int) -> int:
    """Copies, weighted 0, that make the last validation batch split evenly over `shards` devices."""
    return -(count % batch_size) % shards


def _tf_datasets(train: tuple, val: tuple | None, num_classes: int, config: TrainConfig, shards: int = 1):
    """tf.data pipelines for training (shuffled, augmented per batch) and validation; every batch splits
    evenly over `shards` devices (`training_images`, `validation_padding`).

    Augmentation runs on whole batches in parallel map calls, so it overlaps with the training
    step on the other core instead of costing one Python-free op chain per image.

    Parallelism is fixed rather than autotuned: tearing down an autotuned iterator (Keras does at
    every epoch) waits for the autotuner's sleep to run out, up to 60 s. Measured here, that idled
    both cores for 15-58 s every few epochs.
    """
    import tensorflow as tf

    parallel = os.cpu_count() or 1
    options = tf.data.Options()
    options.autotune.enabled = False

    def one_hot(images, labels):
        return tf.cast(images, tf.float32), tf.one_hot(labels, num_classes)

    train_images, train_labels = train

    def gather(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return train_images[positions], train_labels[positions]

    def load(positions):
        # The batch is read here, in tf.data's threads (positional reads, no shared state), so neither the
        # split nor a shuffle buffer of images is ever held whole: the shuffle holds positions.
        batch, batch_labels = tf.numpy_function(gather, [positions], (tf.uint8, tf.int32), stateful=False)
        batch.set_shape((None, *train_images.shape[1:]))
        batch_labels.set_shape((None,))
        return one_hot(batch, batch_labels)

    train_ds = (
        tf.data.Dataset.range(len(train_labels))
        .shuffle(len(train_labels), seed=config.seed, reshuffle_each_iteration=True)
        .take(training_images(len(train_labels), config.batch_size, shards))
        .batch(config.batch_size)
        .map(load, num_parallel_calls=parallel)
    )
    augmenter = batch_augmenter(config)
    if augmenter is not None:
        # Keras' random layers draw from a seed state each call advances: parallel calls would take the
        # draws in whatever order the threads run, so a deterministic run augments one batch at a time.
        calls = None if config.deterministic else parallel

        def augment(images, labels):
            return augmenter(images, training=True), labels

        train_ds = train_ds.map(augment, num_parallel_calls=calls)
    train_ds = train_ds.prefetch(PREFETCH_BATCHES).with_options(options)
    if val is None:
        return train_ds, None
    padding = validation_padding(len(val[1]), config.batch_size, shards)
    images, labels = (np.concatenate([part, part[:1].repeat(padding, axis=0)]) for part in val)
    weights = np.pad(np.ones(len(val[1]), np.float32), (0, padding))

    def weighted_one_hot(images, labels, weights):
        return *one_hot(images, labels), weights

    val_ds = (
        tf.data.Dataset.from_tensor_slices((images, labels, weights) if padding else (images, labels))
        .batch(config.batch_size)
        .map(weighted_one_hot if padding else one_hot, num_parallel_calls=parallel)
        .prefetch(PREFETCH_BATCHES)
        .with_options(options)
    )
    return train_ds, val_ds


@dataclass(frozen=True)
class PreparedSplit:
    """What preprocessing hands to training, calibration and registration."""

    run_dir: str  # this run's folder
    split_path: str  # the .npz of train and validation indices
    train_count: int  # images
    validation_count: int  # images
    test_count: int  # images
    test_fingerprint: str  # content hash of the test set: scores on equal fingerprints are comparable


def prepare_split(cache_dir: str, class_names: list[str], config: TrainConfig, out_dir: Path) -> PreparedSplit:
    """Write the run's stratified split into `out_dir` and describe the data a run will see."""
    from model_lib.data import load_arrays

    arrays = load_arrays(cache_dir)
    split = run_split(np.asarray(arrays.y_train), config.validation_split, config.seed)
    split_path = out_dir / SPLIT_FILE
    save_split(split, split_path)
    return PreparedSplit(
        run_dir=str(out_dir),
        split_path=str(split_path),
        train_count=int(len(split.train_index)),
        validation_count=int(len(split.val_index)),
        test_count=int(len(arrays.y_test)),
        test_fingerprint=test_set_fingerprint(arrays.x_test, arrays.y_test, class_names),
    )
