"""Training configuration: one frozen dataclass, named profiles, and overrides on top of them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


class ConfigError(ValueError):
    """An option value the configuration cannot take."""


# The most a run may ask for: past these, a value is a typo (a few zeros too many) that would run for
# days or exhaust memory, not a plan. Counts not listed (image caps) are bounded by the data.
UPPER_LIMITS = {
    "epochs": 10_000,  # passes
    "head_epochs": 10_000,  # passes
    "batch_size": 65_536,  # images per step (prediction's too)
    "image_size": 1_024,  # pixels per side
    "shard_size": 1_000_000,  # files per prediction shard
    "learning_rate": 100.0,  # per step
    "fine_tune_learning_rate": 100.0,  # per step
    "network_width": 16.0,  # x airbench's widths: compute grows with its square
}


def check_count(field: str, value: int) -> None:
    """Refuse a count below 1 or above the field's `UPPER_LIMITS` entry.

    Raises:
        ConfigError: Naming the field (`option`), its bound and the value.
    """
    most = UPPER_LIMITS.get(field)
    if value < 1:
        raise ConfigError(f"{option(field)} must be at least 1, not {value}")
    if most is not None and value > most:
        raise ConfigError(f"{option(field)} must be at most {most:,}, not {value:,}")


def check_number(name: str, value: float, *, above: float | None = None, at_least: float | None = None,
                 at_most: float | None = None) -> None:  # fmt: skip
    """Refuse a number outside its bounds, and inf and nan always: they pass `> 0` checks and then break a
    service (`app --reload-seconds inf` stopped following promotions, `1e-6` spun a core).

    Raises:
        ConfigError: Naming it (`name`: `option(field)`, or a CLI-only option), its bounds and the value.
    """
    bounds = [f"above {above:g}" if above is not None else "", f"at least {at_least:g}" if at_least is not None
              else "", f"at most {at_most:g}" if at_most is not None else ""]  # fmt: skip
    if not (
        math.isfinite(value)
        and (above is None or value > above)
        and (at_least is None or value >= at_least)
        and (at_most is None or value <= at_most)
    ):
        wanted = " and ".join(bound for bound in bounds if bound) or "finite"
        raise ConfigError(f"{name} must be a number {wanted}, not {value}")


AUTO = "auto"  # image_size: chosen from the data
MIN_IMAGE_SIZE = 24  # pixels per side: the smallest every architecture builds at (seed_cnn's three valid convs)
# What `auto` picks from: the largest of these at most the median short side of the training images. Its top
# bounds the cost a user did not ask for: at 128 px `fast` trains at half its 32-px rate and the cache holds
# 49 KB an image (bench/RESULTS.md, "Memory"); ask for more by number. airbench runs its conv groups at 32-63 px
# whatever the size (model_lib.models).
AUTO_IMAGE_SIZES = (32, 64, 96, 128)  # pixels per side


def parse_image_size(value: str | int) -> int | str:
    """An `--image-size` value as given on a command line: `auto` or a whole number of pixels.

    Raises:
        ConfigError: Neither, naming the option.
    """
    if isinstance(value, int) or value == AUTO:
        return value
    if not str(value).strip().isdigit():
        raise ConfigError(f"{option('image_size')} is a side in pixels or {AUTO}, not {value!r}")
    return int(value)


# Calibration fits no temperature or unsure threshold on fewer validation images than this, so a split holds
# out at least this many where the classes allow it without giving up more than MAX_VALIDATION_SHARE of any.
MIN_VALIDATION_IMAGES = 50  # images
MAX_VALIDATION_SHARE = 0.2  # of a class's images


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. Saved beside each run and in each registered manifest."""

    profile: str = "default"  # the profile these values started from
    architecture: str = "airbench"  # one of CHOICES["architecture"], built by model_lib.models
    data: str = ""  # image folder, cifar-10-batches-py folder or "keras"; "" = CIFAR10_DIR or keras
    model_name: str = ""  # registry name; "" = cifar10 for CIFAR-10's classes, else the data folder's name
    network_width: float = 1.0  # multiplier on airbench's channel widths (64/256/256); compute grows ~squared
    # Set by `prune` (model_lib.prune), never an option: the parent version, the criterion, the share of channels
    # kept, FLOPs and parameters before and after, the conv widths, and the .npz (with its sha256) of the kept
    # weights that training starts from. Saved in the manifest's config: the pruned version's lineage.
    pruned: dict | None = None

    # data
    # Pixels per side the model sees (images are resized to it), or "auto": chosen by ingest from the training
    # images' own sizes (model_lib.sources.auto_image_size; CIFAR-10 gets 32). A run's saved config holds the side.
    image_size: int | str = AUTO
    max_train_images: int | None = None  # class-balanced cap on training images; None = all
    max_test_images: int | None = None  # class-balanced cap on test images; None = all
    # Fraction of training images held out, stratified by class; at least MIN_VALIDATION_IMAGES where it can.
    validation_split: float = 0.02
    skip_corrupt: bool = False  # skip undecodable training files (reported) instead of failing
    # A run must beat always answering the most common class by this much accuracy, on validation
    # and test, to be registered: 0.05 is 5 points, far above chance on CIFAR's 10,000 test images.
    learned_margin: float = 0.05

    # data gates, checked on the data report before training (see model_lib/data_report.py)
    max_leakage: float = 0.0  # fraction of test images allowed to be exact pixel copies of training images
    min_class_images: int = 10  # training images every class needs (before the validation split)
    allow_class_change: bool = False  # let a class of the previous registered version vanish
    balance_shift_warning: float = 0.1  # class-share change (total variation distance) that logs a warning

    # optimisation
    epochs: int = 10  # passes over the training split
    batch_size: int = 512  # images per optimiser step
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum), "muon" (sgd, but Muon on conv kernels) or "adam"
    # SGD values are airbench94's (lr 11.5 and decay 0.0153 per 1,024 summed examples, momentum
    # 0.85) converted to a mean loss over batches of 512 and Keras' decoupled weight decay.
    learning_rate: float = 0.768  # peak learning rate per step on the batch-mean loss
    momentum: float = 0.85  # SGD Nesterov momentum
    weight_decay: float = 8.9e-3  # decoupled weight decay: each step shrinks weights by this times the LR
    bias_lr_scale: float = 64.0  # SGD: learning-rate multiplier for batch-norm offsets
    # airbench94_muon's 0.24 at batch 2,000, taken to this batch_size by the square root (resolve_config).
    muon_learning_rate: float = 0.12  # muon: conv kernels' peak step: each filter (norm about 1) moves about this far
    muon_momentum: float = 0.6  # muon: conv kernels' Nesterov momentum
    label_smoothing: float = 0.2  # mass spread uniformly over all classes in the targets
    lr_schedule: str = "warmup_linear"  # "constant" or "warmup_linear" (linear up, then linear down)
    warmup_fraction: float = 0.23  # fraction of all steps spent rising to the peak ("warmup_linear")
    lr_start_fraction: float = 0.2  # learning rate at the first step, fraction of the peak
    lr_end_fraction: float = 0.07  # learning rate at the last step, fraction of the peak
    lookahead_every: int = 5  # steps between lookahead blends into the slow weights; 0 = off
    lookahead_decay: float = 0.774  # slow weights' share in the last blends (0.95 per step over 5 steps)
    early_stopping_patience: int = 0  # epochs without val_loss improvement before stopping; 0 = off
    reduce_lr_patience: int = 0  # epochs without val_loss improvement before cutting the LR; 0 = off
    reduce_lr_factor: float = 0.1  # LR multiplier applied by the plateau cut

    # augmentation (training only; whole batches: in tf.data under TensorFlow, in the train step elsewhere)
    augment_flip: bool = True  # random horizontal mirror
    # airbench: a seeded half of the images mirrored in even epochs, the other half in odd ones, so each
    # is seen both ways every two epochs (random mirroring repeats a view in half of the epoch pairs).
    alternate_flip: bool = False  # with augment_flip: alternate each image's mirroring by epoch instead
    augment_rotation: float = 0.0  # max rotation, fraction of a full turn (Keras RandomRotation factor)
    augment_zoom: float = 0.0  # max zoom in/out, fraction of the side (Keras RandomZoom factor)
    augment_translate: int = 2  # max shift, pixels per 32 px of side (8 at 128 px), with reflected borders
    tta_flip: bool = True  # saved model averages the image's and its mirror's probabilities
    # airbench's evaluation: that pair at half weight, plus the pairs seen through a window moved one pixel
    # up-left and down-right (reflected borders) at a quarter each; three times flip TTA's inference.
    tta_translate: bool = False  # mirror-plus-translate TTA (model_lib.models.tta_views), whatever tta_flip says

    # transfer learning (architecture "transfer" only)
    weights: str = "none"  # backbone weights: "imagenet" (downloads), a local weights file, or "none"
    head_epochs: int = 2  # epochs training only the new head, backbone frozen, before fine-tuning
    fine_tune_layers: int = 40  # backbone layers, counted from the top, unfrozen for fine-tuning
    fine_tune_learning_rate: float = 1e-4  # constant learning rate while fine-tuning

    # runtime
    seed: int = 0  # seeds the split, weights, shuffling and augmentation
    deterministic: bool = False  # op determinism and serial augmentation: the same model every run (docs/training.md)
    precision: str = "auto"  # "auto", "float32", "mixed_bfloat16" or "mixed_float16"
    jit_compile: str = "auto"  # XLA: "auto" (GPUs only; it halved bf16 throughput on this CPU), "on" or "off"

    def __post_init__(self) -> None:
        """Refuse values no run can use, with the option's name, before any work starts."""
        for field, choices in CHOICES.items():
            if getattr(self, field) not in choices:
                raise ConfigError(f"{option(field)} {getattr(self, field)!r}: choose from {', '.join(choices)}")
        for field in ("epochs", "batch_size", "head_epochs", "max_train_images", "max_test_images"):
            if getattr(self, field) is not None:
                check_count(field, getattr(self, field))
        if self.image_size != AUTO:
            if not isinstance(self.image_size, int) or isinstance(self.image_size, bool):
                raise ConfigError(f"{option('image_size')} is a side in pixels or {AUTO}, not {self.image_size!r}")
            check_count("image_size", self.image_size)
            if self.image_size < MIN_IMAGE_SIZE:
                raise ConfigError(f"{option('image_size')} must be at least {MIN_IMAGE_SIZE}, not {self.image_size}")
        for field in ("max_leakage", "balance_shift_warning"):
            if not 0 <= getattr(self, field) <= 1:
                raise ConfigError(f"{option(field)} is a fraction in [0, 1], not {getattr(self, field)}")
        if self.min_class_images < 1:
            raise ConfigError(f"{option('min_class_images')} must be at least 1, not {self.min_class_images}")
        if not 0 <= self.validation_split < 1:
            raise ConfigError(f"{option('validation_split')} must be in [0, 1), not {self.validation_split}")
        if self.optimizer == "muon" and self.architecture != "airbench":
            # Its rescaling assumes batch norm after every conv: a depthwise kernel would be set to norm 1.
            raise ConfigError(f"optimizer muon (profile {self.profile}) trains the airbench architecture only, "
                              f"not {self.architecture}: leave the optimizer to the profile")  # fmt: skip
        check_number(option("label_smoothing"), self.label_smoothing, at_least=0, at_most=0.999)
        check_number(option("learned_margin"), self.learned_margin, at_least=-1, at_most=1)
        for field in ("learning_rate", "fine_tune_learning_rate", "network_width"):
            if not 0 < getattr(self, field) <= UPPER_LIMITS[field]:
                raise ConfigError(f"{option(field)} must be above 0 and at most {UPPER_LIMITS[field]:g}, "
                                  f"not {getattr(self, field)}")  # fmt: skip

    def at_size(self, side: int) -> TrainConfig:
        """This config for data of `side` pixels: `auto` becomes the side; a number must be it.

        Raises:
            ConfigError: The config asks for another side than the data has.
        """
        if self.image_size not in (AUTO, side):
            raise ConfigError(f"{option('image_size')} {self.image_size}: the ingested images are {side} px")
        return dataclasses.replace(self, image_size=side)

    @property
    def flip_alternates(self) -> bool:
        """Whether mirroring alternates by epoch (`alternate_flip`) rather than being drawn at random."""
        return self.augment_flip and self.alternate_flip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_key(self, dataset_fingerprint: str) -> str:
        """Identity of a run: the same config on the same data resumes the same checkpoint."""
        config = self.to_dict()
        if config["pruned"] is None:  # a field added later counts only when set: earlier runs keep their key
            del config["pruned"]
        payload = json.dumps({"config": config, "data": dataset_fingerprint}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# Prediction engines: auto runs an export that passed parity (model_lib.serving), or a TTA model first view first
# where calibration allows it (model_lib.calibrate); keras runs the saved model as it is.
ENGINES = ("auto", "keras", "onnx")


def check_engine(engine: str) -> None:
    """Raises ConfigError for a prediction engine that does not exist."""
    if engine not in ENGINES:
        raise ConfigError(f"{option('engine')} must be one of {', '.join(ENGINES)}, not {engine!r}")


# How `prune` ranks a conv's channels (model_lib.prune): mean activation times the weights that read it, or those
# weights alone.
PRUNE_CRITERIA = ("activation", "weight")
DEFAULT_KEEP = 0.5  # share of channels `prune` keeps without --keep or --target-speedup
MAX_TARGET_SPEEDUP = 20.0  # --target-speedup above this: a typo (at the narrowest widths airbench runs about 8x)

TOP_K = 3  # prediction: ranked labels (and their probabilities) per image, in the CSV and the app's answers
BATCH_IMAGES = 256  # prediction: images decoded per pool job and classified per model call
SHARD_FILES = 2048  # prediction: files per shard task: measured best of 512-5000 for 10,000 CIFAR JPEGs on 2 cores
# The app (`cifar-pipeline app`): its defaults and limits.
APP_PORT = 8000
MAX_UPLOAD_MB = 10  # MB (10^6 bytes): a request body, all its images together
MAX_MEGAPIXELS = 25  # million pixels per image, read from its header (a 24-megapixel camera photo fits)
RELOAD_SECONDS = 2.0  # how often the served reference is resolved again (an alias may have moved)
# The sane range of each of the app's and watch's numbers: below the floors a loop spins a core, above the
# ceilings a limit means nothing.
APP_BOUNDS = {"--max-upload-mb": dict(above=0, at_most=100_000), "--max-megapixels": dict(above=0, at_most=1_000),
              "--reload-seconds": dict(at_least=0.1, at_most=86_400)}  # fmt: skip
QUIET_SECONDS_BOUNDS = dict(at_least=0.1, at_most=86_400)
MAX_TIMEOUT_MINUTES = 7 * 24 * 60  # a run's time limit: a week
TOKEN_ENV = "CIFAR_PIPELINE_TOKEN"  # the app's token, when not given as --token
CHOICES = {  # the fields that take one of a few names
    "architecture": ("airbench", "seed_cnn", "transfer"),  # model_lib.models.ARCHITECTURES
    "optimizer": ("sgd", "muon", "adam"),
    "lr_schedule": ("warmup_linear", "constant"),
    "precision": ("auto", "float32", "mixed_bfloat16", "mixed_float16"),
    "jit_compile": ("auto", "on", "off"),
}


_PARAMETER_WORDS: ContextVar[Mapping[str, str] | None] = ContextVar("parameter_words", default=None)


def option(field: str) -> str:
    """A request's field as the one who asked named it: the CLI's `--image-size`, or, inside `parameter_words`
    (a deployment's run), the flow's parameter `image_size`. Messages name fields through this, never by a
    rewording of their text."""
    words = _PARAMETER_WORDS.get()
    if words is not None and field in words:
        return words[field]
    return "--" + field.replace("_", "-")


@contextmanager
def parameter_words(names: Mapping[str, str]) -> Iterator[None]:
    """Within it (and in the task threads it starts: Prefect copies the context), `option(field)` says
    `names[field]`, a flow's parameter, where there is one; other fields keep the CLI's words."""
    token = _PARAMETER_WORDS.set(dict(names))
    try:
        yield
    finally:
        _PARAMETER_WORDS.reset(token)


# The origin notebook's optimiser: Adam at a constant 1e-3, without decay, smoothing or lookahead.
ADAM_RECIPE = dict(
    optimizer="adam",
    learning_rate=1e-3,
    weight_decay=0.0,
    label_smoothing=0.0,
    lookahead_every=0,
    lr_schedule="constant",
)

SEED_PROFILE = dict(
    # The origin notebook's recipe, with its augmentation actually applied.
    architecture="seed_cnn",
    validation_split=0.2,
    epochs=100,
    batch_size=64,
    **ADAM_RECIPE,
    early_stopping_patience=10,
    reduce_lr_patience=5,
    reduce_lr_factor=0.1,
    augment_flip=True,
    augment_rotation=0.1,
    augment_zoom=0.1,
    augment_translate=0,
    tta_flip=False,
    precision="float32",
)

# airbench94_muon's recipe: Muon on the conv kernels and alternating flips, 8 epochs instead of
# airbench94's 10 at the same cost per image; more accurate than airbench94 in less time on every CPU
# host and on the H200 (bench/RESULTS.md). Its SGD values (head 0.67 and offsets 0.053 per summed example at
# batch 2,000, coupled decay 2e-6 per example, momentum 0.85) are converted to a batch-mean loss,
# our head's 1/9 logit scale (its is 1/256: the rate scales by (9/256)^2) and Keras' decoupled
# decay (x 1/(1 - 0.85)). Half its batch: on a CPU an image costs the same in any batch, so twice
# the steps are free; the SGD rate halves (linear rule), Muon's step shrinks by sqrt(2) (0.24 -> 0.17):
# +0.19 points over two seeds (bench/RESULTS.md). It serves with airbench's mirror-plus-translate TTA,
# as airbench94_muon is scored: +0.23 and +0.35 points on two runs' models, for 3x the prediction time.
DEFAULT_PROFILE = dict(
    optimizer="muon",
    batch_size=1000,
    epochs=8,
    learning_rate=0.828,
    muon_learning_rate=0.17,
    weight_decay=0.0161,
    lookahead_every=0,
    warmup_fraction=0.0,
    lr_start_fraction=1.0,
    lr_end_fraction=0.0,
    alternate_flip=True,
    tta_translate=True,
)

PROFILES: dict[str, dict] = {
    "default": DEFAULT_PROFILE,
    # For GPUs, where airbench's widths leave most of the card idle: `default` at twice the width (128/512/512
    # channels, 4x the multiply-adds per image) for 12 epochs instead of 8, 6x its training compute, for
    # airbench95's accuracy (91.8% on these JPEGs): 91.98% and 91.89% in two runs on a CPU (bench/RESULTS.md).
    "gpu": {**DEFAULT_PROFILE, "network_width": 2.0, "epochs": 12},
    # airbench94's recipe, the field defaults above: SGD with lookahead, 10 epochs, flip TTA. Muon needs batch
    # norm after every conv, so `default` trains the other architectures with this recipe, and with
    # ARCHITECTURE_OPTIMIZERS' optimiser (resolve_config).
    "airbench94": {},
    "seed": SEED_PROFILE,
    # airbench94's recipe at half width for two epochs: about 900 images/s on two cores, so two
    # epochs of 49,000 images take under two minutes.
    "fast": dict(
        network_width=0.5,
        epochs=2,
        batch_size=256,
    ),
    # airbench94's recipe on 2,000 train / 1,000 test images for 2 epochs: about a minute on two
    # cores, for tests and quick checks of the whole pipeline.
    "smoke": dict(
        max_train_images=2000,
        max_test_images=1000,
        validation_split=0.2,
        epochs=2,
        batch_size=128,
    ),
    # For tests and for trying a setup: airbench94's network and recipe at a quarter of its width (16/64/64
    # channels), on 1,000 train / 200 test images for three epochs. Seconds of training on two cores; it learns
    # a little (one epoch on 500 images learned nothing), and it registers, calibrates, exports and predicts like
    # any other profile.
    "tiny": dict(
        network_width=0.25,
        max_train_images=1000,
        max_test_images=200,
        validation_split=0.2,
        epochs=3,
        batch_size=64,
    ),
}


# The values that belong to an optimiser. A run that asks for another optimiser than its profile's drops
# the profile's values of these for that optimiser's own (OPTIMIZER_RECIPES); before, `--optimizer adam`
# under `smoke` kept airbench's SGD rate of 0.1-0.5 and diverged.
OPTIMIZER_FIELDS = ("optimizer", "learning_rate", "momentum", "weight_decay", "bias_lr_scale", "muon_learning_rate",
                    "muon_momentum", "label_smoothing", "lr_schedule", "warmup_fraction", "lr_start_fraction",
                    "lr_end_fraction", "lookahead_every", "lookahead_decay")  # fmt: skip
OPTIMIZER_RECIPES: dict[str, dict] = {
    "sgd": {"optimizer": "sgd"},  # the field defaults: airbench94's
    "adam": ADAM_RECIPE,
    # with the batch its rates were tuned at, so that resolve_config scales them to the profile's batch
    "muon": {k: v for k, v in DEFAULT_PROFILE.items() if k in OPTIMIZER_FIELDS or k == "batch_size"},
}

# What an architecture trains with under a profile tuned on another network, unless the command sets
# --optimizer. airbench's SGD (64x steps for batch-norm offsets, label smoothing, a short decaying schedule)
# left the seed's dense head at 14% training accuracy after smoke's 26 steps, and Adam took it to 29%
# (34% on test). The transfer backbone under SGD diverged in one of three `smoke` runs under bf16.
ARCHITECTURE_OPTIMIZERS: dict[str, str] = {"seed_cnn": "adam", "transfer": "adam"}

# Wall time of each profile's `train` on a 2-core CPU with the shared CIFAR-10 (bench/RESULTS.md): the
# AMD EPYC and Intel Emerald Rapids hosts, and for `default` and `seed` also the slower Cascade Lake and
# faster Zen 5 and Intel AMX ones.
PROFILE_MINUTES = {
    "default": (12, 35),
    "gpu": (60, 240),  # 50 min on the AMX host, where its training took 4.4x default's: the others scaled by that
    "airbench94": (25, 25),
    "seed": (14, 35),
    "fast": (2, 3),
    "smoke": (1, 1),
    "tiny": (1, 1),
}
TIMEOUT_FACTOR = 4  # a run's time limit: this many times its profile's slowest 2-core time (scaled by epochs),
TIMEOUT_FLOOR_MINUTES = 30  # and never under this (ingest of a new dataset, a busy machine)


def profile_time(profile: str) -> str:
    """A profile's 2-core CPU time in words: "about 12-35 min", "about 1-4 h"."""
    low, high = PROFILE_MINUTES[profile]
    unit, scale = ("h", 60) if low >= 60 else ("min", 1)
    span = f"{low // scale}-{high // scale}" if low != high else f"{low // scale}"
    return f"about {span} {unit}"


def check_run_limits(minutes: float | None, promotion_margin: float) -> None:
    """Raises ConfigError unless `minutes` (a run's time limit, empty for the default) is above 0 and at most a
    week, and the promotion margin is an accuracy difference (inf would never promote, -inf always)."""
    if minutes is not None:
        check_number(option("timeout_minutes"), minutes, above=0, at_most=MAX_TIMEOUT_MINUTES)
    check_number(option("promotion_margin"), promotion_margin, at_least=-1, at_most=1)


def training_timeout_minutes(config: TrainConfig) -> float:
    """The default time limit of a training run: TIMEOUT_FACTOR times its profile's slowest 2-core time,
    scaled by its epochs, at least TIMEOUT_FLOOR_MINUTES. Generous on purpose: it ends a stuck run, not a
    slow machine's."""
    usual = resolve_config(config.profile).epochs
    return max(TIMEOUT_FLOOR_MINUTES, TIMEOUT_FACTOR * PROFILE_MINUTES[config.profile][1] * config.epochs / usual)


def resolve_config(profile: str = "default", **overrides) -> TrainConfig:
    """Build a config from a profile plus overrides; `None` overrides are ignored.

    With SGD (and the SGD part of Muon), a profile or override that changes `batch_size` without
    setting `learning_rate` scales the learning rate by the same factor (the linear scaling rule), so
    the rate per example stays the one the recipe was tuned at and a smaller batch does not diverge.
    Muon's own step on the conv kernels has a fixed size whatever the gradient's scale, so without
    `muon_learning_rate` it scales by the square root of that factor: k times the steps of 1/sqrt(k)
    the size move a kernel as far over an epoch when their directions are independent.

    A profile that trains with Muon (`default`) asked for another architecture trains it with airbench94's
    recipe instead: Muon's rescaling assumes batch norm after every conv. An architecture the profile was
    not tuned on takes its `ARCHITECTURE_OPTIMIZERS` optimiser unless `optimizer` is given, and an optimiser
    other than the profile's comes with its `OPTIMIZER_RECIPES` values unless they are given.

    Raises:
        ConfigError: Unknown profile or unknown field.
    """
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    recipe = PROFILES[profile]
    tuned_for = recipe.get("architecture", TrainConfig.architecture)
    architecture = given.get("architecture", tuned_for)
    if recipe.get("optimizer") == "muon" and architecture != "airbench":
        recipe = PROFILES["airbench94"]
    own_optimizer = recipe.get("optimizer", TrainConfig.optimizer)
    optimizer = given.get("optimizer", own_optimizer)
    if architecture != tuned_for and "optimizer" not in given:
        optimizer = ARCHITECTURE_OPTIMIZERS.get(architecture, own_optimizer)
    layers = [recipe, given]
    if optimizer != own_optimizer and optimizer in OPTIMIZER_RECIPES:  # an unknown one: TrainConfig says so
        rest = {k: v for k, v in recipe.items() if k not in OPTIMIZER_FIELDS}
        layers = [OPTIMIZER_RECIPES[optimizer], rest, given]
    values = {k: v for layer in layers for k, v in layer.items()}
    if optimizer in ("sgd", "muon"):
        values["learning_rate"] = _batch_scaled("learning_rate", 1.0, *layers)
    if optimizer == "muon":
        values["muon_learning_rate"] = _batch_scaled("muon_learning_rate", 0.5, *layers)
    return TrainConfig(profile=profile, **values)


def _batch_scaled(field: str, power: float, *layers: dict) -> float:
    """`field` after the layers of values in turn: a layer that sets it replaces it, one that only changes
    `batch_size` multiplies it by the batch's growth to the `power`."""
    value, batch_size = getattr(TrainConfig, field), TrainConfig.batch_size
    for layer in layers:
        if field in layer:
            value = layer[field]
        elif "batch_size" in layer:
            value *= (layer["batch_size"] / batch_size) ** power
        batch_size = layer.get("batch_size", batch_size)
    return value
