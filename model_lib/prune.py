"""Structured pruning of an airbench network: whole channels out of each conv, a genuinely smaller network in.

Each 3x3 conv's output channels are a "space": after it come only per-channel layers (max pooling, batch norm
without a scale, GELU), then the one layer that reads them, the next conv or the head. Removing a channel takes
its filter out of the conv, its entries out of the batch norms, and its input slice out of that reader.

Network Slimming ranks channels by batch norm's scale, which airbench's batch norms do not have (scale=False: each
channel comes out with unit variance and an offset). So a channel is ranked by what its reader makes of it:
- `activation` (the default): its mean absolute activation on training images times the norm of the reader's
  weights on it: a first-order estimate of how much the reader's output moves without it;
- `weight`: the norm of the reader's weights on it alone (no data).
bench/RESULTS.md ("Pruning") measures both after fine-tuning.

The kept weights go into a network built by `model_lib.models.build_model` with the kept widths (fewer FLOPs,
fewer bytes, not masks over the old one), which the training recipe then fine-tunes like any other.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from model_lib.config import DEFAULT_KEEP, MAX_TARGET_SPEEDUP, PRUNE_CRITERIA, ConfigError, option
from model_lib.data import DatasetInfo, cached_dataset, load_arrays, train_rows
from model_lib.fileio import atomic_open, read_json, sha256_file
from model_lib.models import build_model, tta_translates, unwrap_tta, with_tta
from model_lib.precision import machine_key
from model_lib.runs import MODEL_FILE
from model_lib.sources import spread_over
from model_lib.split import run_split
from model_lib.versions import MANIFEST_FILE, ChecksumError, load_verified_model

MIN_CHANNELS = 8  # channels a conv keeps at least (airbench's narrowest width)
# Kept channels come in multiples of this: the CPU's conv kernels work in blocks, and a network of 16 and 72 channels
# ran 1.20x one of 18 and 70, 16 and 64 1.25x 18 and 64 (bench/RESULTS.md, "prune --target-speedup 2 on fast").
CHANNEL_MULTIPLE = 8
SCORE_IMAGES = 1000  # training images the activation criterion averages over
SCORE_BATCH = 250  # of them, classified at once
PRUNED_FOLDER = "pruned"  # under the local work dir: the kept weights each pruning run starts from
SPEED_IMAGES = 1000  # test images each model classifies per timing
SPEED_BATCH = 250  # of them at once
SPEED_REPEATS = 3  # timings of each model, taken in turns; the fastest counts
KEEP_STEPS = tuple(round(0.95 - 0.05 * step, 2) for step in range(18))  # --target-speedup's candidates: 0.95 to 0.1


@dataclass(frozen=True)
class Space:
    """One conv's output channels and the layers that carry or read them, by layer index in the network."""

    conv: int  # the conv whose filters make the channels
    per_channel: tuple[int, ...]  # batch norms between it and the reader, sliced along
    reader: int  # the conv or dense layer that reads them (its kernel's input axis)


def check_keep(keep: float) -> None:
    """Raises ConfigError unless `keep` is a fraction of channels strictly between 0 and 1."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep < 1:
        raise ConfigError(f"{option('keep')} is the fraction of channels kept, above 0 and below 1, not {keep!r}")


def check_target_speedup(target: float) -> None:
    """Raises ConfigError unless `target` is a speed-up above 1 and at most MAX_TARGET_SPEEDUP."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 1 < target <= MAX_TARGET_SPEEDUP:
        raise ConfigError(f"{option('target_speedup')} is a speed-up above 1 and at most {MAX_TARGET_SPEEDUP:g}, "
                          f"not {target!r}")  # fmt: skip


def check_share(keep: float | None, target: float | None) -> None:
    """A pruning request's share: `keep`, or a target speed-up to find one by, or neither (DEFAULT_KEEP).

    Raises:
        ConfigError: A bad value, or both given.
    """
    if keep is not None:
        check_keep(keep)
    if target is not None:
        check_target_speedup(target)
        if keep is not None:
            raise ConfigError(f"{option('keep')} and {option('target_speedup')}: give one, not both (the target "
                              "speed-up finds the share kept)")  # fmt: skip


def check_criterion(criterion: str) -> None:
    if criterion not in PRUNE_CRITERIA:
        raise ConfigError(f"{option('criterion')} {criterion!r}: choose from {', '.join(PRUNE_CRITERIA)}")


def channel_spaces(network) -> list[Space]:
    """The prunable channel spaces of an airbench network, in order.

    Raises:
        ConfigError: The network is not a chain of airbench's layers (another architecture).
    """
    layers = network.layers
    spaces = []
    for index, layer in enumerate(layers):
        if _kind(layer) != "Conv2D" or not layer.trainable:  # the frozen whitening conv stays whole
            continue
        per_channel, reader = [], None
        for later in range(index + 1, len(layers)):
            kind = _kind(layers[later])
            if kind in ("Conv2D", "Dense"):
                reader = later
                break
            if kind == "BatchNormalization":
                per_channel.append(later)
            elif kind not in ("MaxPooling2D", "Activation", "GlobalMaxPooling2D"):
                reader = None
                break
        if reader is None:
            raise ConfigError(f"{network.name}: layer {layers[index].name} is not read by a conv or dense layer")
        spaces.append(Space(index, tuple(per_channel), reader))
    if not spaces:
        raise ConfigError(f"{network.name}: no conv channels to prune (prune takes airbench versions)")
    return spaces


def channel_scores(network, spaces: list[Space], criterion: str, images: np.ndarray | None = None) -> list[np.ndarray]:
    """Per space, a score per channel (higher: keep): see the module's docstring for the criteria."""
    check_criterion(criterion)
    weights = [_reader_norms(network.layers[space.reader]) for space in spaces]
    if criterion == "weight":
        return weights
    import keras

    probe = keras.Model(network.inputs, [network.layers[space.reader].input for space in spaces])
    sums, counts = [np.zeros(len(norms)) for norms in weights], [0] * len(spaces)
    for start in range(0, len(images), SCORE_BATCH):
        outputs = probe.predict_on_batch(np.asarray(images[start : start + SCORE_BATCH], np.float32))
        for index, output in enumerate(outputs):  # per channel, over images and positions
            values = np.abs(np.asarray(output, np.float64)).reshape(-1, output.shape[-1])
            sums[index] += values.sum(axis=0)
            counts[index] += len(values)
    return [total / count * norms for total, count, norms in zip(sums, counts, weights, strict=True)]


def kept_channels(scores: list[np.ndarray], keep: float) -> list[np.ndarray]:
    """Per space, the indices of the channels kept: the best `keep` share (at least `MIN_CHANNELS`), in order."""
    return [np.sort(np.argsort(-score, kind="stable")[: kept_count(len(score), keep)]) for score in scores]


def kept_count(channels: int, keep: float) -> int:
    """How many of a conv's channels a share keeps: the nearest multiple of CHANNEL_MULTIPLE, at least MIN_CHANNELS,
    at most all of them."""
    multiple = CHANNEL_MULTIPLE * round(keep * channels / CHANNEL_MULTIPLE)
    return min(channels, max(MIN_CHANNELS, multiple))


def pruned_weights(network, spaces: list[Space], kept: list[np.ndarray]) -> list[np.ndarray]:
    """The network's weights, in `network.get_weights()` order, with the pruned channels cut out: the network that
    `build_model` makes with the kept widths takes them with `set_weights`."""
    outputs = {space.conv: keep for space, keep in zip(spaces, kept, strict=True)}  # a conv's kept filters
    inputs = {space.reader: keep for space, keep in zip(spaces, kept, strict=True)}  # a reader's kept inputs
    sliced = {index: keep for space, keep in zip(spaces, kept, strict=True) for index in space.per_channel}
    result = []
    for index, layer in enumerate(network.layers):
        for variable in layer.get_weights():
            value = np.asarray(variable)
            if index in inputs and value.ndim >= 2:  # a kernel: (..., inputs, outputs)
                value = np.take(value, inputs[index], axis=value.ndim - 2)
            if index in outputs and value.ndim >= 1:
                value = np.take(value, outputs[index], axis=value.ndim - 1)
            if index in sliced:  # batch norm: each vector per channel
                value = value[sliced[index]]
            result.append(value)
    return result


def widths(network, spaces: list[Space], kept: list[np.ndarray] | None = None) -> list[int]:
    """The channels of each space's conv: as they are, or as many as `kept` keeps."""
    if kept is not None:
        return [len(keep) for keep in kept]
    return [int(network.layers[space.conv].filters) for space in spaces]


def flops(network) -> int:
    """Floating-point operations of one image through the network's convs and dense layers (a multiply and an add
    per weight and output position), the rest (pooling, batch norm, activations) left out."""
    total = 0
    for layer in network.layers:
        kind = _kind(layer)
        if kind in ("Conv2D", "Dense"):
            kernel = layer.get_weights()[0]
            positions = int(np.prod(layer.output.shape[1:-1])) if kind == "Conv2D" else 1
            total += 2 * kernel.size * positions
    return total


def prune_version(version_dir: Path, artifacts_root: Path, keep: float | None, criterion: str, epochs: int | None,
                  target_speedup: float | None = None, log=print) -> tuple[dict, DatasetInfo]:  # fmt: skip
    """Prune a registered airbench version: rank its channels on its own training split (made again from its config,
    as exports do), keep the best `keep` share of each conv's (or the share `target_speedup` finds; neither:
    DEFAULT_KEEP), and write the kept weights for fine-tuning.

    Returns:
        The config of the fine-tuning run (the version's own, with `epochs` if given and its `pruned` record), and the
        version's cached dataset.

    Raises:
        ChecksumError: A file of the version fails its checksum.
        ConfigError: The version is not an airbench network, `keep`, `target_speedup` or `criterion` is bad, or no
            share reaches the target.
        FileNotFoundError: The version's dataset is not cached here.
    """
    import keras

    check_share(keep, target_speedup)
    check_criterion(criterion)
    manifest, dataset = prunable(version_dir, artifacts_root)
    parent = f"{manifest.get('name', version_dir.parent.name)} v{manifest['version']}"
    config = manifest["config"]
    model = load_verified_model(version_dir)
    network, views = unwrap_tta(model)
    spaces = channel_spaces(network)
    arrays = load_arrays(dataset.cache_dir)
    if target_speedup is not None:
        served = partial(with_tta, translate=tta_translates(model)) if views else None  # timed with its views
        timed = timed_shares(network, spaces, len(dataset.class_names), arrays.x_test, log, served)
        keep = search_keep(timed, target_speedup, log)
    keep = DEFAULT_KEEP if keep is None else keep
    split = run_split(np.asarray(arrays.y_train), config["validation_split"], config["seed"])
    rows = spread_over(split.train_index, SCORE_IMAGES)
    images = train_rows(dataset.cache_dir)[np.sort(rows)] if criterion == "activation" else None
    kept = kept_channels(channel_scores(network, spaces, criterion, images), keep)
    values = pruned_weights(network, spaces, kept)
    channels = widths(network, spaces, kept)
    smaller = build_model("airbench", len(dataset.class_names), int(config["image_size"]), channels=tuple(channels))
    smaller.set_weights(values)  # a shape that does not fit fails here, not after fine-tuning
    buffer = io.BytesIO()
    np.savez(buffer, *values)  # plain arrays: `load_weights` reads them with allow_pickle=False
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    path = Path(artifacts_root) / PRUNED_FOLDER / f"{digest[:16]}.npz"  # the same pruning, the same file
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    before, after = flops(network), flops(smaller)
    record = {
        "from": parent,
        "criterion": criterion,
        "keep": keep,
        "channels_before": widths(network, spaces),
        "channels": channels,
        "flops_before": before,
        "flops": after,
        "parameters_before": int(network.count_params()),
        "parameters": int(smaller.count_params()),
        "weights": str(path),
        "weights_sha256": digest,
    }
    log(f"Pruned {parent} by {criterion}, keeping {keep:.0%} of each conv's channels: {channels} of "
        f"{record['channels_before']}, {after / 1e6:.1f} of {before / 1e6:.1f} MFLOPs per view, "
        f"{record['parameters']:,} of {record['parameters_before']:,} parameters")  # fmt: skip
    keras.backend.clear_session()
    fine_tune = {**config, "pruned": record, "epochs": epochs or config["epochs"]}
    return fine_tune, dataset


def prunable(version_dir: Path, artifacts_root: Path) -> tuple[dict, DatasetInfo]:
    """A version's manifest and cached dataset, where `prune` can work on it (the CLI asks before Prefect starts).

    Raises:
        ConfigError: The version is not an airbench network.
        FileNotFoundError: The version's dataset is not cached here.
    """
    manifest = read_json(version_dir / MANIFEST_FILE)
    architecture = manifest["config"]["architecture"]
    if architecture != "airbench":
        raise ConfigError(f"{version_dir} holds a {architecture} network: prune takes airbench versions")
    dataset = cached_dataset(artifacts_root, manifest["dataset"]["fingerprint"], "prune can rank channels on its "
                             "training images and fine-tune")  # fmt: skip
    return manifest, dataset


def pruned_channels(pruned: dict | None) -> tuple[int, ...] | None:
    """The conv widths a config's `pruned` record builds, or None for an unpruned run."""
    return tuple(pruned["channels"]) if pruned else None


def start_weights(pruned: dict) -> list[np.ndarray]:
    """The kept weights a pruned run starts from, after checking the file's sha256 against the record.

    Raises:
        ChecksumError: The file is gone or was changed since `prune` wrote it.
    """
    path = Path(pruned["weights"])
    if not path.is_file() or sha256_file(path) != pruned["weights_sha256"]:
        raise ChecksumError(f"{path}: the pruned weights are missing or changed since prune wrote them")
    return load_weights(path)


def load_weights(path: str | Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as stored:
        return [stored[f"arr_{index}"] for index in range(len(stored.files))]


def _reader_norms(reader) -> np.ndarray:
    """Per input channel of a conv or dense layer, the L2 norm of its weights on that channel."""
    kernel = np.asarray(reader.get_weights()[0], np.float64)
    axes = tuple(axis for axis in range(kernel.ndim) if axis != kernel.ndim - 2)
    return np.sqrt(np.square(kernel).sum(axis=axes))


def _kind(layer) -> str:
    return type(layer).__name__


def images_per_second(models: dict, images: np.ndarray, repeats: int = SPEED_REPEATS) -> dict[str, float]:
    """Each Keras model's images/s on the same images (SPEED_IMAGES at most) as the Keras engine serves them (one
    traced function, batch norms folded: `KerasClassifier`), timed in turns in this process: the model alone, no
    decoding, the fastest of `repeats` each. Only ratios of figures taken together mean anything: images/s depend
    on the host and on what else it runs."""
    import time

    from model_lib.inference import KerasClassifier

    images = images[:SPEED_IMAGES]
    classifiers = {name: KerasClassifier(model) for name, model in models.items()}
    best = dict.fromkeys(models, float("inf"))
    for classifier in classifiers.values():
        classifier.predict(images[:SPEED_BATCH], batch_size=SPEED_BATCH)  # traced once, not timed
    for _ in range(repeats):
        for name, classifier in classifiers.items():
            started = time.perf_counter()
            classifier.predict(images, batch_size=SPEED_BATCH)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: len(images) / seconds for name, seconds in best.items()}


def search_keep(speedup: Callable[[float], float], target: float, log=print) -> float:
    """The largest of KEEP_STEPS whose network runs at least `target` times the version's images/s, by bisection
    (fewer channels never run slower): `speedup(keep)` measures one share (`timed_shares`).

    Raises:
        ConfigError: Not even the smallest share reaches the target on this machine.
    """
    low, high = 0, len(KEEP_STEPS) - 1  # the first step (largest share) that reaches the target lies in [low, high]
    if (smallest := speedup(KEEP_STEPS[high])) < target:
        raise ConfigError(f"{option('target_speedup')} {target:g}: even keeping {KEEP_STEPS[high]:g} of the channels "
                          f"runs only {smallest:.2f}x here; ask for less")  # fmt: skip
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if speedup(KEEP_STEPS[middle]) >= target else (middle + 1, high)
    log(f"Target {target:g}x: keeping {KEEP_STEPS[low]:g} of each conv's channels")
    return KEEP_STEPS[low]


def timed_shares(network, spaces: list[Space], class_count: int, images: np.ndarray, log=print,
                 served: Callable | None = None) -> Callable[[float], float]:  # fmt: skip
    """`search_keep`'s measure: a share's network's images/s over `network`'s, in Keras here (`images_per_second`),
    each wrapped by `served` (the version's TTA views: they cost the same at any width, so the ratio is the one the
    registered version is timed at). Timed before fine-tuning, with the widths' fresh weights: a network's speed does
    not depend on their values."""
    side, before = int(network.input_shape[1]), widths(network, spaces)
    serve = served or (lambda model: model)
    parent = serve(network)

    def speedup(keep: float) -> float:
        smaller = build_model("airbench", class_count, side, channels=tuple(kept_count(c, keep) for c in before))
        speed = images_per_second({"parent": parent, "pruned": serve(smaller)}, images)
        views = "with its views, " if served else ""
        log(f"Keep {keep:g}: {speed['pruned'] / speed['parent']:.2f}x the version's images/s (Keras, {views}before "
            "fine-tuning)")  # fmt: skip
        return speed["pruned"] / speed["parent"]

    return speedup


def measure_against_parent(parent_dir: Path, model_path: Path, images: np.ndarray) -> dict:
    """A fine-tuned pruned model's and its parent's Keras images/s on the same test images (`images_per_second`),
    and their `.keras` files' sizes: the record `pruning.json` keeps and the pruning plot draws."""
    import keras

    models = {"parent": load_verified_model(parent_dir), "pruned": keras.saving.load_model(model_path, safe_mode=True)}
    speed = images_per_second(models, images)
    keras.backend.clear_session()
    return {
        "images": len(images[:SPEED_IMAGES]),
        "engine": f"keras ({keras.backend.backend()})",
        "host": machine_key().split(" flags:")[0],
        "parent_images_per_second": round(speed["parent"], 1),
        "images_per_second": round(speed["pruned"], 1),
        "speedup": round(speed["pruned"] / speed["parent"], 3),
        "parent_bytes": (parent_dir / MODEL_FILE).stat().st_size,
        "bytes": Path(model_path).stat().st_size,
    }


def family_points(parent: dict, pruned: list[dict]) -> list[dict]:
    """The points of a pruning plot (model_lib.plots.plot_pruning): the parent, then each version pruned from it.

    Args:
        parent: The parent's manifest.
        pruned: One {"label", "keep", "accuracy", "measured"} each, `measured` its `pruning.json` record.
    """
    points = [{"label": f"parent v{parent['version']}", "keep": 1.0, "accuracy": parent["metrics"]["test_accuracy"],
               "speedup": 1.0, "megabytes": pruned[0]["measured"]["parent_bytes"] / 1e6}]  # fmt: skip
    for item in pruned:
        measured = item["measured"]
        points.append({"label": item["label"], "keep": item["keep"], "accuracy": item["accuracy"],
                       "speedup": measured["speedup"], "megabytes": measured["bytes"] / 1e6})  # fmt: skip
    return points
