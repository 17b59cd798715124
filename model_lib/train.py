"""Train: devices, resumable `fit` with the recipe's callbacks, the saved model."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model_lib.config import TrainConfig, option
from model_lib.data import DatasetInfo, load_arrays, train_rows
from model_lib.evaluate import check_learned
from model_lib.fileio import atomic_open, save_model_atomic, write_json
from model_lib.models import WHITEN_SAMPLE_IMAGES, build_model, with_tta
from model_lib.precision import (
    choose_precision,
    cpu_bf16_units,
    devices,
    release_devices,
    scale_for_replicas,
    use_xla,
)
from model_lib.preprocess import make_datasets, with_augmentation
from model_lib.progress import PROGRESS_SECONDS, Progress
from model_lib.prune import pruned_channels, start_weights
from model_lib.recipe import make_optimizer
from model_lib.runs import CONFIG_FILE, HISTORY_FILE, MODEL_FILE, PROBE_FILE, TrainResult, read_history
from model_lib.sources import spread_over
from model_lib.split import load_split
from model_lib.transfer import freeze_backbone, from_scratch, imagenet_weights_note

# A whole-array sample of training images takes at most this much: 5,000 for the whitening fit and 1,024 for the
# batch-norm recount up to 128 px (as at 32), 85 and 64 at 1,024 px.
SAMPLE_MIB = 256
PROBE_IMAGES = 16  # fixed inputs whose outputs a reloaded model must reproduce (registry gate)
DIVERGENCE_FACTOR = 10  # a final loss this many times uniform guessing's (ln of the class count) means divergence
STALE_SHARE = 0.01  # batch norm whose moving statistics still hold more of their initial values than this is recomputed
RECALIBRATION_IMAGES = 1024  # training images, spread over the classes, whose statistics replace stale ones


class TrainingDiverged(RuntimeError):
    """The loss blew up or became NaN: the model is useless and must not be registered."""


class TrainingTimeout(RuntimeError):
    """Training ran past the run's time limit; the last finished epoch's checkpoint stays for a resume."""


def _epoch_logger(log: Callable[[str], None], epochs: int, steps_per_epoch: int):
    import keras

    class EpochLogger(keras.callbacks.Callback):
        """One line per epoch with the figures a person watching the run wants, and progress within epochs
        (a bar on a terminal, else a line at most every `PROGRESS_SECONDS`), so a long epoch is never
        silent. Records each epoch's seconds."""

        progress = None
        lock = threading.Lock()  # Keras may run the batch-end hook for two steps at once (`_off_the_step`)

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.finished, self.shown = epoch, 0, 0
            self.started = time.perf_counter()
            if self.progress is None:  # the first epoch of this call: later ones if it resumed
                total = (epochs - epoch) * steps_per_epoch
                self.progress = Progress(f"epoch {epoch + 1}/{epochs}", total, "steps", log, every=PROGRESS_SECONDS)

        def on_train_batch_end(self, batch, logs=None):
            # Off the loop's thread under JAX: it only counts, since `log` may need the loop's thread (a
            # Prefect run's logger finds its run there); the loop's next hook shows the count.
            with self.lock:
                self.finished += 1

        def on_train_batch_begin(self, batch, logs=None):
            self.show()

        def show(self):
            """Advance the progress to the steps finished so far (on the loop's thread)."""
            finished = self.finished
            if finished > self.shown:
                where = f"epoch {self.epoch + 1}/{epochs} step {finished}/{steps_per_epoch}"
                self.progress.advance(finished - self.shown, where)
                self.shown = finished

        def on_epoch_end(self, epoch, logs=None):
            self.show()  # the epoch's last steps: Keras waits for their hooks before this one
            seconds = time.perf_counter() - self.started
            figures = " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items() if k != "learning_rate")
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            log(f"epoch {epoch + 1}/{epochs}: {figures} lr={lr:.3g} {seconds:.1f}s")
            if logs is not None:
                logs["epoch_seconds"] = seconds

        def on_train_end(self, logs=None):
            self.close()

        def close(self):
            """Remove the bar (Keras skips on_train_end when fit raises; a bar left behind hides the cursor)."""
            if self.progress is not None:
                self.progress.close()
                self.progress = None

    return EpochLogger()


def train(
    config: TrainConfig,
    dataset: DatasetInfo,
    split_path: Path,
    run_dir: Path,
    log: Callable[[str], None] = print,
    extra_callbacks: tuple = (),
    time_limit: float | None = None,
) -> TrainResult:
    """Train the configured model, resuming from the run's checkpoint if one exists.

    Args:
        config: The resolved configuration.
        dataset: What ingest produced.
        split_path: The `.npz` written by preprocessing.
        run_dir: This run's folder; the same config on the same data always maps to the same one.
        log: Where progress lines go.
        extra_callbacks: More Keras callbacks (run before the checkpoint is written).
        time_limit: Seconds from this call after which training stops at its next step (`TrainingTimeout`).

    Returns:
        Where the saved model, the probe and the history are, and how training went.
    """
    import keras

    if time_limit is not None:
        extra_callbacks = (*extra_callbacks, _stop_at(time.monotonic() + time_limit, time_limit))

    strategy, device, precision, xla, config = _set_up(config.at_size(dataset.image_shape[0]), log)
    arrays, split = load_arrays(dataset.cache_dir), load_split(split_path)
    images = train_rows(dataset.cache_dir)  # read a batch at a time: memory does not grow with the dataset
    num_classes = len(dataset.class_names)
    shards = strategy.num_replicas_in_sync
    train_ds, val_ds = make_datasets(images, arrays.y_train, split, num_classes, config, shards)
    phases = training_phases(config)
    history_path = _start_run_folder(run_dir, config, phases)

    calibration = images[spread_over(split.train_index, affordable(WHITEN_SAMPLE_IMAGES, images.shape[1:], 1))]
    if config.weights == "imagenet":
        log(imagenet_weights_note())
    with strategy.scope():
        model = build_model(
            config.architecture, num_classes, config.image_size, precision, calibration, config.weights,
            config.network_width, config.seed, pruned_channels(config.pruned),
        )  # fmt: skip
        if config.pruned:  # a pruned network's kept weights, which this run fine-tunes
            model.set_weights(start_weights(config.pruned))
    steps_per_epoch = len(train_ds)  # tf.data knows its length; JAX's batches may leave a few images out
    trainer = with_augmentation(model, config, steps_per_epoch)
    try:
        for phase in phases:
            _fit_phase(model, trainer, phase, config, strategy, precision, xla, train_ds, val_ds, steps_per_epoch,
                       run_dir, log, extra_callbacks, several_phases=len(phases) > 1)  # fmt: skip
    finally:
        release_devices()  # what follows predicts on one device, in batches of any size
    for phase in phases:  # finished: an identical run started later trains afresh, like BackupAndRestore
        (run_dir / phase.done_marker).unlink(missing_ok=True)
    history = read_history(history_path)
    recalibration = images[spread_over(split.train_index, affordable(RECALIBRATION_IMAGES, images.shape[1:], 4))]
    count = recalibrate_stale_batch_norm(model, recalibration, steps=steps_per_epoch * len(history))
    if count:
        log(f"Recomputed the moving statistics of {count} batch-norm layers that {len(history)} epochs left stale")
    final_loss = _check_converged(model, history, num_classes)
    if val_ds is not None:
        val_labels = arrays.y_train[split.val_index]
        check_validation(trainer, val_ds, final_loss, val_labels, num_classes, config.learned_margin)
    train_seconds = float(history["epoch_seconds"].sum())
    log(f"Trained {len(history)} epochs in {train_seconds:.0f}s")

    serving = to_serving_model(model, config, num_classes, calibration)
    model_path, probe_path = _save_outputs(serving, run_dir, np.asarray(arrays.x_test[:PROBE_IMAGES]), config.seed)
    keras.backend.clear_session()
    return TrainResult(
        run_dir=str(run_dir),
        model_path=str(model_path),
        probe_path=str(probe_path),
        history_path=str(history_path),
        epochs_run=len(history),
        train_seconds=round(train_seconds, 2),
        precision=precision,
        device=device,
        backend=keras.backend.backend(),
        device_count=strategy.num_replicas_in_sync,
    )


def _set_up(config: TrainConfig, log: Callable[[str], None]):
    """Devices, precision, XLA, seeds and determinism: `(strategy, device, precision, xla, config)`, the
    config scaled for the number of replicas."""
    import keras

    backend = keras.backend.backend()
    if config.deterministic and backend == "jax":  # read when JAX starts its GPU backend, just below
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true".strip()
    strategy, device, capabilities = devices()
    precision, why = choose_precision(config.precision, capabilities, cpu_bf16_units())
    # JAX always compiles the step with XLA: without jit it would run op by op from Python.
    xla = backend == "jax" or use_xla(config.jit_compile, bool(capabilities))
    log(f"Training {config.architecture} on {device}, precision {precision} ({why}), XLA {'on' if xla else 'off'}")
    config = scale_for_replicas(config, strategy.num_replicas_in_sync)
    if strategy.num_replicas_in_sync > 1:
        replicas = strategy.num_replicas_in_sync
        log(f"{replicas} replicas: global batch {config.batch_size}, learning rate {config.learning_rate}")
    keras.utils.set_random_seed(config.seed)
    if config.deterministic and backend == "tensorflow":  # process-wide: reductions run in a fixed order
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    return strategy, device, precision, xla, config


def _start_run_folder(run_dir: Path, config: TrainConfig, phases: list[Phase]) -> Path:
    """Write the config into the run folder; a fresh start (no checkpoint) drops an old history. Returns its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_FILE, config.to_dict())
    history_path = run_dir / HISTORY_FILE
    if not any((run_dir / name).exists() for phase in phases for name in (phase.checkpoint, phase.done_marker)):
        history_path.unlink(missing_ok=True)  # a fresh start must not append to an old history
    return history_path


def _fit_phase(
    model, trainer, phase: Phase, config: TrainConfig, strategy, precision: str, xla: bool, train_ds, val_ds,
    steps_per_epoch: int, run_dir: Path, log: Callable[[str], None], extra_callbacks: tuple, several_phases: bool,
) -> None:  # fmt: skip
    """Train one phase of `trainer` (`model`, or it behind augmentation layers), from its checkpoint if one
    exists; a phase finished earlier only loads its weights."""
    import keras

    done = run_dir / phase.done_marker
    if done.exists():
        trainer.load_weights(done)
        log(f"Phase {phase.name} already finished; its weights are loaded")
        return
    if (run_dir / phase.checkpoint).exists():
        log(f"Resuming phase {phase.name} from checkpoint in {run_dir / phase.checkpoint}")
    if phase.trainable_backbone_layers is not None:
        count = freeze_backbone(model, phase.trainable_backbone_layers)
        log(f"Phase {phase.name}: {count} backbone layers trainable, learning rate {phase.config.learning_rate}")
    phase_steps = phase.config.epochs * steps_per_epoch
    with strategy.scope():
        trainer.compile(
            optimizer=make_optimizer(phase.config, phase_steps, model, precision),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
            weighted_metrics=["accuracy"],  # weighted: the copies that pad a batch to split evenly count 0
            jit_compile=xla,
        )
    callbacks = _callbacks(config, phase, phase_steps, run_dir, val_ds is not None, log, extra_callbacks)
    try:
        trainer.fit(
            train_ds,
            validation_data=val_ds,
            initial_epoch=phase.first_epoch,
            epochs=phase.last_epoch,
            callbacks=callbacks,
            shuffle=False,
            verbose=0,
        )
    finally:
        callbacks[0].close()  # the epoch logger
    if several_phases:
        partial = done.with_name(f".{phase.name}.partial.weights.h5")
        trainer.save_weights(partial)
        os.replace(partial, done)


def _check_converged(model, history, num_classes: int) -> float:
    """The final training loss; raises TrainingDiverged for non-finite weights or a loss far worse than guessing."""
    final_loss = float(history["loss"].iloc[-1]) if len(history) else float("nan")
    weights_finite = all(np.isfinite(weight).all() for weight in model.get_weights())
    if not weights_finite or not final_loss <= DIVERGENCE_FACTOR * np.log(num_classes):
        raise TrainingDiverged(
            f"training diverged (final loss {final_loss:.3g}, weights finite: {weights_finite}); "
            f"nothing was registered: lower {option('learning_rate')} or raise {option('batch_size')}"
        )
    return final_loss


def _save_outputs(serving, run_dir: Path, test_images: np.ndarray, seed: int) -> tuple[Path, Path]:
    """Save the serving model and its probe (fixed inputs and outputs a reloaded model must reproduce)."""
    model_path = run_dir / MODEL_FILE
    save_model_atomic(serving, model_path)
    probe_path = run_dir / PROBE_FILE
    probe_inputs = probe_images(test_images, seed)
    with atomic_open(probe_path, "wb") as handle:
        np.savez(handle, inputs=probe_inputs, outputs=serving.predict(probe_inputs, verbose=0))
    return model_path, probe_path


def check_validation(model, val_ds, train_loss: float, val_labels, num_classes: int, margin: float) -> None:
    """The trained model on the validation split: a loss that exploded, or no more than guessing, stops the run.

    A finite training loss does not prove a usable model: batch norm's moving statistics can
    differ wildly from the batches' own (validation loss in the thousands), and a model that
    collapsed onto one class sits at the loss of guessing.

    Raises:
        TrainingDiverged: Validation loss above `DIVERGENCE_FACTOR` times guessing's.
        NothingLearned: Validation accuracy not above the majority-class rate plus `margin`.
    """
    val_loss, val_accuracy = model.evaluate(val_ds, verbose=0)[:2]
    if not val_loss <= DIVERGENCE_FACTOR * np.log(num_classes):
        raise TrainingDiverged(
            f"validation loss exploded ({val_loss:.3g}, training loss {train_loss:.3g}); nothing was registered: "
            f"try {option('precision')} float32 or a lower {option('learning_rate')}"
        )
    check_learned("validation", float(val_accuracy), np.asarray(val_labels), margin)


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs trained with one optimiser (transfer learning has two)."""

    name: str
    first_epoch: int
    last_epoch: int
    config: TrainConfig  # the optimiser settings of this phase
    trainable_backbone_layers: int | None = None  # None: no backbone to freeze

    @property
    def checkpoint(self) -> str:
        return "checkpoint" if self.name == "train" else f"checkpoint-{self.name}"

    @property
    def done_marker(self) -> str:
        return f"{self.name}.done.weights.h5"


def training_phases(config: TrainConfig) -> list[Phase]:
    """One phase; or, for transfer learning, the frozen-backbone head phase then fine-tuning.

    A transfer backbone without pretrained weights (`weights` none) has nothing to protect: it
    trains whole, in one phase, with the main recipe (a frozen random backbone learns nothing).
    """
    if config.architecture != "transfer" or from_scratch(config.weights):
        return [Phase("train", 0, config.epochs, config)]
    head_epochs = min(config.head_epochs, config.epochs)
    phases = [Phase("head", 0, head_epochs, replace(config, epochs=head_epochs), trainable_backbone_layers=0)]
    if config.epochs > head_epochs:
        fine_tune = replace(
            config,
            epochs=config.epochs - head_epochs,
            learning_rate=config.fine_tune_learning_rate,
            lr_schedule="constant",
        )
        phases.append(Phase("finetune", head_epochs, config.epochs, fine_tune, config.fine_tune_layers))
    return phases


def _callbacks(
    config: TrainConfig, phase: Phase, phase_steps: int, run_dir: Path, validating: bool, log, extra_callbacks
) -> list:
    import keras

    monitor = "val_loss" if validating else "loss"
    # The logger goes first: it adds epoch_seconds for the CSV log.
    steps_per_epoch = phase_steps // max(1, phase.config.epochs)
    epoch_logger = _off_the_step(_epoch_logger(log, config.epochs, steps_per_epoch))  # its pool hook only counts
    callbacks = [epoch_logger, _stop_on_nan()]
    if config.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor, patience=config.early_stopping_patience, restore_best_weights=True)
        )
    if config.reduce_lr_patience:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor, factor=config.reduce_lr_factor, patience=config.reduce_lr_patience
            )
        )
    if importlib.util.find_spec("tensorflow") is not None:  # Keras writes TensorBoard logs with tf.summary
        # At update_freq "epoch" its batch hook only writes the step's graph, which exists under TensorFlow alone.
        graph = keras.backend.backend() == "tensorflow"
        callbacks.append(_off_the_step(keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=graph)))
    return callbacks + [
        keras.callbacks.CSVLogger(str(run_dir / HISTORY_FILE), append=True),
        *extra_callbacks,
        # Last, so an epoch is in the history before its checkpoint claims it is done.
        _kill_safe_backup(str(run_dir / phase.checkpoint), log),
    ]


def _kill_safe_backup(backup_dir: str, log: Callable[[str], None]):
    """Keras' BackupAndRestore, safe against a kill while it writes.

    It keeps the previous checkpoint too (`double_checkpoint`) and falls back to it when the last
    one is unreadable. A kill during the very first save leaves nothing to fall back to: then
    the phase starts again from its first epoch instead of failing.
    """
    import shutil

    import keras

    class KillSafeBackup(keras.callbacks.BackupAndRestore):
        def on_train_begin(self, logs=None):
            try:
                super().on_train_begin(logs)
            except (OSError, ValueError) as error:  # h5py's OSError, or cut-short JSON metadata
                log(f"Checkpoint in {backup_dir} unreadable ({error}); the phase starts again")
                shutil.rmtree(backup_dir, ignore_errors=True)
                self.model._initial_epoch = None

    return _off_the_step(KillSafeBackup(backup_dir, double_checkpoint=True))  # saves at epoch ends only


def _stop_on_nan():
    """Keras' TerminateOnNaN, off the step (`_off_the_step`): the batch hook only notes a non-finite loss, and
    the loop's own thread stops training at the next step's start or at the epoch's end."""
    import keras

    class StopOnNaN(keras.callbacks.Callback):
        noted = False

        def on_train_batch_end(self, batch, logs=None):
            self.note(logs)

        def on_train_batch_begin(self, batch, logs=None):
            self.stop_if_noted()

        def on_epoch_end(self, epoch, logs=None):
            self.note(logs)
            self.stop_if_noted()

        def note(self, logs):
            loss = (logs or {}).get("loss")
            if loss is not None and not np.isfinite(loss):
                self.noted = True

        def stop_if_noted(self):
            if self.noted:
                self.model.stop_training = True

    return _off_the_step(StopOnNaN())


def _stop_at(deadline: float, limit: float):
    """Raise `TrainingTimeout` at the first step or epoch end past `deadline` (`time.monotonic`), on the loop's
    thread. A run's limit used to be Prefect's task timeout alone: its alarm lands wherever Python is, and inside
    TensorFlow's tracing it came out as a TypeError or a pybind11 RuntimeError, or not at all."""
    import keras

    class StopAtDeadline(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.check()

        def on_epoch_end(self, epoch, logs=None):
            self.check()

        def check(self):
            if time.monotonic() > deadline:
                raise TrainingTimeout(f"training ran past its time limit of {limit / 60:g} min and was stopped")

    return StopAtDeadline()


def _off_the_step(callback):
    """Let Keras run `callback`'s batch hooks in its thread pool (backends whose Keras says they are thread-safe,
    such as JAX), so the training loop never waits for a step to finish before starting the next.

    Run in line, a batch hook gets the step's logs as Python numbers, and converting them waits for the
    accelerator every step: host work (the next batch, its transfer) then stops overlapping with the device's.
    Only for callbacks whose batch hooks read the logs or count. They must not touch `self.model`: under JAX
    that property writes the loop's latest state into the model, which from another thread races the next
    step (whose inputs JAX donates: "Array has been deleted"). Nor may they log: a Prefect run's logger
    finds its run in the loop's thread only.
    """
    callback.async_safe = True
    return callback


def affordable(count: int, image_shape: tuple[int, ...], bytes_per_value: int) -> int:
    """At most `count` images, fewer where `count` of this shape would take more than `SAMPLE_MIB`: the
    whitening fit (uint8) and the batch-norm recount (float32, one batch) hold their whole sample."""
    return max(1, min(count, SAMPLE_MIB * 2**20 // (int(np.prod(image_shape)) * bytes_per_value)))


def recalibrate_stale_batch_norm(model, images: np.ndarray, steps: int) -> int:
    """Replace the moving statistics of each trainable batch norm that `steps` updates left stale with those of
    `images`, one batch in training mode ("precise BN", Wu and Johnson 2021, in one pass).

    After n steps a moving statistic still holds momentum**n of its initial value (mean 0, variance 1) and
    follows the weights of long ago: at Keras' default momentum 0.99 the seed's network under `smoke` (26
    steps) kept 77% of it, and answered at 11.5% validation accuracy (chance) after 26% in training; a
    MobileNetV3 backbone trained from scratch (momentum 0.999) did the same on scikit-learn's digits (94%
    in training, 10% in inference, 91% on the test images after this). Frozen (pretrained) statistics stay,
    and a long run's (the seed's 100 epochs, airbench's momentum) are current already.

    Returns:
        How many batch-norm layers were recalibrated.
    """
    from keras import layers

    norms = [layer for layer in model._flatten_layers() if isinstance(layer, layers.BatchNormalization)]
    norms = [layer for layer in norms if layer.trainable and layer.momentum**steps > STALE_SHARE]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0  # the moving statistics become this batch's
    try:
        if norms:
            model(images.astype("float32"), training=True)
    finally:
        for layer, momentum in zip(norms, momenta, strict=True):
            layer.momentum = momentum
    return len(norms)


def to_serving_model(trained, config: TrainConfig, num_classes: int, calibration_images: np.ndarray):
    """A float32 twin of the trained model (whatever precision trained it), with the configured TTA.

    Serving in float32 keeps the saved model portable: it runs the same on CPUs without bf16 and
    converts cleanly to TFLite.
    """
    side = trained.input_shape[1]
    serving = build_model(
        config.architecture, num_classes, side, "float32", calibration_images, width=config.network_width,
        channels=pruned_channels(config.pruned),
    )  # fmt: skip
    serving.set_weights(trained.get_weights())
    return with_tta(serving, translate=config.tta_translate) if config.tta_flip or config.tta_translate else serving


def probe_images(sample: np.ndarray, seed: int) -> np.ndarray:
    """Fixed inputs for the load-back check: real images plus black, white and seeded noise."""
    noise = np.random.default_rng(seed).integers(0, 256, (2, *sample.shape[1:]), dtype=np.uint8)
    extremes = np.stack([np.zeros(sample.shape[1:], np.uint8), np.full(sample.shape[1:], 255, np.uint8)])
    return np.concatenate([sample.astype(np.uint8), extremes, noise])
