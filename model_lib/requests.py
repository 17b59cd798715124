"""The two requests a user makes, training and prediction, each field declared once: its type, default,
choices and help. `flows/surfaces.py` makes from them the `train` and `predict` options, the flows'
parameters and so the deployments' forms (Prefect reads the flows' signatures and docstrings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from model_lib.config import (
    AUTO,
    AUTO_IMAGE_SIZES,
    BATCH_IMAGES,
    CHOICES,
    DEFAULT_KEEP,
    ENGINES,
    PROFILES,
    PRUNE_CRITERIA,
    SHARD_FILES,
    TOP_K,
    ConfigError,
    TrainConfig,
)

CLI, FLOW = "cli", "flow"  # where a field is shown: the command line, the flow (and so its deployment's form)
DEFAULT_MODEL = "cifar10@champion"  # the version prediction serves when none is named


@dataclass(frozen=True)
class Field:
    """One field of a request."""

    name: str  # the flow's parameter; the CLI's option is --name-with-dashes unless `cli_names` says
    type: object  # the value's type in the flow, before `choices` and an empty default make it a Literal or Optional
    help: str
    default: object = None  # None on a training field: the profile's value
    choices: tuple[str, ...] = ()  # the names it takes: an enum in the deployment's form, listed in --help
    cli_names: tuple[str, ...] = ()  # the command line's names, where they are not --name-with-dashes
    cli_type: object = None  # the command line's type where it cannot be the flow's (image_size: a number or auto)
    argument: bool = False  # positional on the command line
    shown: tuple[str, ...] = (CLI, FLOW)
    config: bool = False  # a `TrainConfig` field: the request's value overrides the profile's

    @property
    def flow_type(self) -> object:
        base = Literal[self.choices] if self.choices else self.type
        return base | None if self.default is None else base

    @property
    def option_names(self) -> tuple[str, ...]:
        if self.cli_names:
            return self.cli_names
        dashed = "--" + self.name.replace("_", "-")
        return (f"{dashed}/--no-{dashed[2:]}",) if self.type is bool else (dashed,)

    @property
    def cli_help(self) -> str:
        return f"{self.help} One of: {', '.join(self.choices)}." if self.choices else self.help


def _config(name: str, type_: object, help_: str, **more) -> Field:
    return Field(name, type_, help_, config=True, choices=CHOICES.get(name, ()), **more)


def _default(field: str) -> str:
    return f"(default {getattr(TrainConfig, field)})"


TRAIN_REQUEST: tuple[Field, ...] = (
    Field(
        "profile",
        str,
        "The recipe to start from: default (airbench94_muon, 8 epochs, about 12-35 min on 2 CPU "
        "cores), gpu (default at twice the width for 12 epochs, for GPUs), airbench94 (10 epochs), fast, seed "
        "(the origin notebook's), smoke (a minute, for checks) or tiny (seconds, for tests).",
        default="default",
        choices=tuple(PROFILES),
    ),  # fmt: skip
    _config("architecture", str, "The network (transfer: a MobileNetV3Small backbone)."),
    _config("epochs", int, "Passes over the training split."),
    _config(
        "batch_size",
        int,
        "Images per optimiser step (with SGD the learning rate scales with it, Muon's step with its square root).",
    ),  # fmt: skip
    _config("learning_rate", float, "Peak learning rate per step."),
    _config(
        "data",
        str,
        "Image folder (train/<class>/, test/<class>/), cifar-10-batches-py folder, or keras "
        "(download); empty means CIFAR10_DIR, else keras.",
    ),  # fmt: skip
    _config("seed", int, "Seeds the split, weights, shuffling and augmentation."),
    _config("precision", str, "Number format of training (auto: decided once per machine, by measuring)."),
    _config(
        "optimizer", str, "sgd (Nesterov momentum), muon (sgd, but Muon on the conv kernels; airbench only) or adam."
    ),  # fmt: skip
    _config(
        "network_width",
        float,
        "Multiplier on airbench's channel widths (64/256/256; gpu uses 2); compute grows about with its square.",
    ),  # fmt: skip
    _config(
        "image_size",
        int | Literal[AUTO],
        f"Pixels per side the model sees, or {AUTO} (the default): the "
        f"largest of {', '.join(map(str, AUTO_IMAGE_SIZES))} px at most the training images' median short "
        "side (CIFAR-10: 32).",
        cli_type=str,
    ),  # fmt: skip
    _config("label_smoothing", float, "Target mass spread uniformly over all classes."),
    _config("jit_compile", str, "XLA compilation of the training step (auto: GPUs only)."),
    _config(
        "validation_split", float, "Fraction of training images held out (stratified) for validation and calibration."
    ),  # fmt: skip
    _config("max_train_images", int, "Class-balanced cap on training images; empty means all."),
    _config("max_test_images", int, "Class-balanced cap on test images; empty means all."),
    _config("skip_corrupt", bool, "Skip undecodable files (listed in the data report) instead of failing."),
    _config(
        "model_name",
        str,
        "Registry name; empty means cifar10 for CIFAR-10's classes, else the data folder's name.",
        cli_names=("--name", "--model-name"),
    ),  # fmt: skip
    _config("weights", str, "transfer only: imagenet (downloads), a local weights file, or none."),
    _config("head_epochs", int, "transfer only: epochs training the new head before fine-tuning."),
    _config("fine_tune_learning_rate", float, "transfer only: constant learning rate while fine-tuning."),
    _config(
        "learned_margin",
        float,
        "Accuracy a run must add to the majority-class rate (validation and test) "
        f"to be registered, and a version to become champion {_default('learned_margin')}.",
    ),  # fmt: skip
    _config(
        "max_leakage",
        float,
        f"Data gate: fraction of test images allowed to be exact copies of training images {_default('max_leakage')}.",
    ),  # fmt: skip
    _config("min_class_images", int, f"Data gate: training images every class needs {_default('min_class_images')}."),
    _config("allow_class_change", bool, "Data gate: let a class of the previous registered version vanish."),
    _config(
        "balance_shift_warning",
        float,
        "Warn when the class shares moved more than this since the previous "
        f"version (total variation distance) {_default('balance_shift_warning')}.",
    ),  # fmt: skip
    _config(
        "deterministic",
        bool,
        "Op determinism and serial augmentation: the same model on every run of the "
        "same config, seed, data and machine.",
    ),  # fmt: skip
    _config(
        "tta_translate",
        bool,
        "Serve with airbench's mirror-plus-translate test-time augmentation (six views, "
        "three times flip TTA's prediction time; on in default) instead of flip TTA (two).",
    ),  # fmt: skip
    Field(
        "promotion_margin",
        float,
        "Test accuracy a new version must add to the champion's (on the same test images) to replace it.",
        default=0.0,
    ),  # fmt: skip
    Field("export", bool, "Also write TFLite float32, float16 and int8 exports beside the version.", default=False),
    Field(
        "skip_unchanged",
        bool,
        "End at once when the latest version came from the same config and data (set "
        "by the data trigger, so a queued duplicate never trains twice).",
        default=False,
        shown=(FLOW,),
    ),  # fmt: skip
    Field(
        "timeout_minutes",
        float,
        "Fail the training task after this long; empty means 4 times the profile's "
        "slowest 2-core CPU time (scaled by epochs), at least 30 minutes.",
    ),  # fmt: skip
)

PREDICT_REQUEST: tuple[Field, ...] = (
    Field(
        "input_dir",
        str,
        "The folder of images (walked recursively by default; links out of it are refused); "
        "in a deployment's run, empty means the inbox, ARTIFACTS_DIR/inbox.",
        argument=True,
    ),  # fmt: skip
    Field(
        "output_csv",
        str,
        "The CSV to write; empty means a new file per run under ARTIFACTS_DIR/predictions/; "
        "an s3:// URL is written locally, then uploaded once complete. An existing file is replaced only when "
        "it is an earlier prediction CSV, unless overwrite.",
        cli_names=("--output",),
    ),  # fmt: skip
    Field(
        "model",
        str,
        "A registry reference (cifar10, cifar10@champion, cifar10@latest, cifar10@v3), a version "
        "folder, or a registered .tflite or .onnx export.",
        default=DEFAULT_MODEL,
    ),  # fmt: skip
    Field("top_k", int, "Ranked labels and probabilities per row.", default=TOP_K),
    Field("batch_size", int, "Images per decoding job and per model call.", default=BATCH_IMAGES),
    Field("recursive", bool, "Descend into sub-folders.", default=True),
    Field("shard_size", int, "Files per shard task.", default=SHARD_FILES),
    Field(
        "fail_on_error",
        bool,
        "Fail the run (after writing the CSV) when any file could not be classified.",
        default=False,
    ),  # fmt: skip
    Field("dask_address", str, "Run shards on this Dask scheduler.", shown=(CLI,)),
    Field("dask_workers", int, "Run shards on a local Dask cluster of N workers.", shown=(CLI,)),
    Field(
        "overwrite", bool, "Replace an existing output CSV even if it is not an earlier prediction CSV.", default=False
    ),  # fmt: skip
    Field(
        "files",
        list[str],
        "Only these files (paths relative to input_dir), as the inbox trigger sends them.",
        shown=(FLOW,),
    ),  # fmt: skip
    Field(
        "unsure_below",
        float,
        "Flag rows low_confidence below this confidence instead of the model's calibrated threshold.",
    ),  # fmt: skip
    Field(
        "engine",
        str,
        "auto runs the version's fastest TFLite export that passed parity with the Keras model "
        "(accuracy and top-1 labels, see the manifest's exports), else a TTA model first view first where its "
        "calibration allows it; keras always runs the Keras model as saved; onnx runs its fastest ONNX export "
        "that passed parity, on ONNX Runtime (the onnx extra).",
        default=ENGINES[0],
        choices=ENGINES,
    ),  # fmt: skip
)

PRUNE_REQUEST: tuple[Field, ...] = (
    Field(
        "model",
        str,
        "The version to prune: a registry reference (cifar10@champion, cifar10@v3) or a version folder.",
        default=DEFAULT_MODEL,
        argument=True,
    ),  # fmt: skip
    Field(
        "keep",
        float,
        f"Share of each conv's channels kept, above 0 and below 1 (0.5 keeps about a quarter of the FLOPs); empty: "
        f"{DEFAULT_KEEP}, or the share a target speed-up finds.",
    ),  # fmt: skip
    Field(
        "target_speedup",
        float,
        "Instead of a share kept: the largest share of channels whose network runs this many times the version's "
        "images/s (Keras on this machine, timed before fine-tuning), e.g. 2.",
    ),  # fmt: skip
    Field(
        "criterion",
        str,
        "How a conv's channels are ranked: activation (their mean activation on training images times the weights "
        "that read them) or weight (those weights alone).",
        default=PRUNE_CRITERIA[0],
        choices=PRUNE_CRITERIA,
    ),  # fmt: skip
    Field(
        "epochs",
        int,
        "Epochs of fine-tuning the smaller network with the version's own recipe; empty: the version's own.",
    ),  # fmt: skip
    Field("alias", str, "Also point this alias (e.g. edge) at the pruned version, whatever the gate decides."),
    *(field for field in TRAIN_REQUEST if field.name in ("promotion_margin", "export", "timeout_minutes")),
)


def fields_of(request: tuple[Field, ...], surface: str) -> tuple[Field, ...]:
    return tuple(field for field in request if surface in field.shown)


def field_named(request: tuple[Field, ...], name: str) -> Field:
    """The request's field of that name (another command's option of the same meaning shows its help)."""
    return next(field for field in request if field.name == name)


def parameter_names(request: tuple[Field, ...]) -> dict[str, str]:
    """Each field as the flow's parameter, keyed by the CLI's word for it (`output` -> `output_csv`): what
    `model_lib.config.option` says in a deployment's run."""
    words = {field.name: field.name for field in fields_of(request, FLOW)}
    for field in fields_of(request, FLOW):
        if CLI in field.shown and field.cli_names and field.cli_names[0].startswith("--"):
            words[field.cli_names[0][2:].replace("-", "_")] = field.name
    return words


def with_defaults(request: tuple[Field, ...], given: Mapping[str, object]) -> dict:
    """`given` and every other field of the request at its default (Prefect fills them in; a direct call does not)."""
    return {field.name: field.default for field in request} | dict(given)


def training_overrides(request: Mapping[str, object]) -> dict:
    """The `TrainConfig` overrides in a training request (the fields declared `config`).

    Raises:
        ConfigError: A name the training request does not declare: never dropped in silence.
    """
    declared = {field.name: field for field in TRAIN_REQUEST}
    if unknown := sorted(set(request) - set(declared)):
        raise ConfigError(f"unknown training option(s): {', '.join(unknown)}")
    return {name: value for name, value in request.items() if declared[name].config}


def _check_declarations() -> None:
    """Config fields name `TrainConfig` fields, and no other field does (a typo would train on the profile's value)."""
    config_fields = {field.name for field in dataclasses.fields(TrainConfig)}
    for field in TRAIN_REQUEST:
        if field.config != (field.name in config_fields and field.name != "profile"):
            raise TypeError(f"training request field {field.name!r}: config={field.config} is wrong")


_check_declarations()
