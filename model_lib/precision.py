"""Devices, precision and compilation choices for training: dtype policy, XLA, multi-replica scaling.

On CPUs, bf16 pays off only where the hardware multiplies bf16 natively and fast. AMX does.
AVX-512 BF16 alone is not enough to know: measured on two 2-core machines with that flag and no
AMX, airbench trained 1.4x faster in bf16 on one (AMD EPYC) and 1.7x slower on the other (Intel
Xeon whose AMX the hypervisor hides). There `auto` times a small conv block in both policies, once
per machine: the result is kept in `<cache>/cache/precision_probe.json` (`settings.work_dir`) under the CPU's model,
core count and flags, so every later run on that machine decides the same way (one probe measured
1.14x, 1.36x and 1.86x in three runs on one machine).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from model_lib.config import TrainConfig
from model_lib.fileio import read_json, write_json
from model_lib.settings import MACHINE_CACHE_ENV, cpu_devices, work_dir

# GPUs from Ampere (compute capability 8.0) on multiply bf16 natively. auto does not pick
# mixed_float16 on older ones: float16's range (65,504) overflowed in the forward pass on
# scikit-learn's digits (NaN loss on an H200, with loss scaling), where bf16 and float32 reach 99%.
BF16_GPU_CAPABILITY = (8, 0)
BF16_MIN_SPEEDUP = 1.1  # bf16 must beat float32 by this factor in the probe to be chosen
PROBE_BATCH = 64  # images per probe step: 16x16x64 activations into two convs of PROBE_CHANNELS
# airbench spends most of its multiply-adds in 256-channel convs; a 128-channel block read bf16's gain 10-20% low.
PROBE_CHANNELS = 256
PROBE_STEPS = 2  # timed train steps per policy and round, after one untimed (tracing) step
# The policies alternate for this many rounds and each keeps its fastest: one pass of 3 steps each read
# 0.80x and 0.84x inside flows on a host whose real step runs 1.16-1.40x faster in bf16 (bench/RESULTS.md).
PROBE_ROUNDS = 4
PROBE_VERSION = 2  # cached results of another probe design are measured again
PROBE_CACHE_FILE = "precision_probe.json"  # under <cache>/cache/: the probe's result per machine
JAX_CACHE_FOLDER = "jax"  # under <cache>/cache/: JAX's compiled programs, reused by later runs
JAX_CACHE_MAX_BYTES = 2 << 30  # the cache's size limit; having one also makes JAX lock it for concurrent runs
JAX_PROGRAM_SUFFIX, JAX_ATIME_SUFFIX = "-cache", "-atime"  # a cached program's file and its access time's (JAX 0.10)
JAX_CACHE_LOCK_SECONDS = 10.0  # how long a run waits for the cache's lock to repair it before leaving it be


def machine_cache_dir() -> Path:
    """What runs on this machine keep for later ones (the bf16 probe, JAX's programs): `CIFAR_PIPELINE_MACHINE_CACHE`,
    else <cache>/cache."""
    if os.environ.get(MACHINE_CACHE_ENV):
        return Path(os.environ[MACHINE_CACHE_ENV]).expanduser().resolve()
    return work_dir() / "cache"


@functools.cache
def local_cpuinfo() -> str:
    """This machine's /proc/cpuinfo ("" where there is none), read once a process: serving asks for the machine's key
    each time it picks a version's export."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_bf16_units(cpuinfo: str | None = None) -> str:
    """The CPU's native bf16 units: `amx`, `avx512_bf16`, or "" for none (read from /proc/cpuinfo)."""
    flags = set((local_cpuinfo() if cpuinfo is None else cpuinfo).split())
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else ""


@functools.cache
def measure_bf16_speedup() -> float:
    """float32 step time over mixed_bfloat16 step time for a small conv block (once per process).

    The two policies take turns, and each counts its fastest round: a burst of other work on the cores
    (a flow's server and loggers starting beside the first run) slows a round, never speeds one up.
    """
    steps = {policy: _probe_step(policy) for policy in ("float32", "mixed_bfloat16")}
    fastest = dict.fromkeys(steps, float("inf"))
    for _ in range(PROBE_ROUNDS):
        for policy, step in steps.items():
            started = time.perf_counter()
            for _ in range(PROBE_STEPS):
                step()
            fastest[policy] = min(fastest[policy], (time.perf_counter() - started) / PROBE_STEPS)
    return fastest["float32"] / fastest["mixed_bfloat16"]


def machine_key(cpuinfo: str | None = None) -> str:
    """The CPU's identity for the probe cache: model name, logical cores and instruction-set flags."""
    lines = (local_cpuinfo() if cpuinfo is None else cpuinfo).splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return f"{names[0] if names else 'unknown CPU'} x{len(names)} flags:{digest}"


def cached_bf16_speedup(
    cache_dir: Path | None = None, measure: Callable[[], float] = measure_bf16_speedup, key: str | None = None
) -> float:
    """bf16's measured speed-up on this machine: from the probe cache, or measured once and stored there."""
    from filelock import FileLock

    cache_dir = cache_dir or machine_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if key is None:
        import keras

        backend = keras.backend.backend()  # JAX's CPU kernels are not TensorFlow's: each backend is probed
        key = machine_key() + ("" if backend == "tensorflow" else f" backend:{backend}")
    path = cache_dir / PROBE_CACHE_FILE
    with FileLock(str(cache_dir / f".{PROBE_CACHE_FILE}.lock")):  # two first runs at once measure once
        try:
            known = read_json(path) if path.is_file() else {}
        except ValueError:  # a damaged cache is measured again, not trusted
            known = {}
        entry = known.get(key)
        if not isinstance(entry, dict) or entry.get("probe_version") != PROBE_VERSION:
            known[key] = {
                "bf16_speedup": round(measure(), 3),
                "probe_version": PROBE_VERSION,
                "measured_at": datetime.now(UTC).isoformat(),
            }
            write_json(path, known)
    return float(known[key]["bf16_speedup"])


def _probe_step(policy: str) -> Callable[[], object]:
    """One training step of the probe's conv block in `policy`, traced and run once already."""
    import keras
    from keras import layers

    inputs = keras.Input((16, 16, 64))
    x = inputs
    for _ in range(2):
        x = layers.Conv2D(PROBE_CHANNELS, 3, padding="same", use_bias=False, dtype=policy)(x)
        x = layers.BatchNormalization(dtype=policy)(x)
        x = layers.Activation("gelu", dtype=policy)(x)
    x = layers.GlobalMaxPooling2D(dtype=policy)(x)
    model = keras.Model(inputs, layers.Dense(10, dtype="float32")(x))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images = np.random.default_rng(0).normal(size=(PROBE_BATCH, 16, 16, 64)).astype(np.float32)
    labels = np.zeros(PROBE_BATCH, np.int64)
    model.train_on_batch(images, labels)
    return lambda: model.train_on_batch(images, labels)


def choose_precision(
    requested: str,
    gpu_compute_capabilities: list[tuple[int, int]],
    cpu_bf16: str,
    bf16_speedup: Callable[[], float] = cached_bf16_speedup,
) -> tuple[str, str]:
    """Pick the Keras dtype policy for training.

    Args:
        requested: `auto` or an explicit policy name (kept as given).
        gpu_compute_capabilities: `(major, minor)` of each visible GPU; empty on CPU.
        cpu_bf16: The CPU's bf16 units, as `cpu_bf16_units` names them.
        bf16_speedup: bf16's training speed over float32's (the machine's cached probe result);
            called only for AVX-512 BF16.

    Returns:
        The policy, and why it was chosen.
    """
    if requested != "auto":
        return requested, "requested explicitly"
    if gpu_compute_capabilities:
        if min(gpu_compute_capabilities) >= BF16_GPU_CAPABILITY:
            return "mixed_bfloat16", "GPU with bf16 tensor cores"
        return "float32", "GPU without bf16 tensor cores (auto never picks mixed_float16: it overflowed on digits)"
    if cpu_bf16 == "amx":
        return "mixed_bfloat16", "CPU with AMX bf16 units"
    if cpu_bf16 == "avx512_bf16":
        speedup = bf16_speedup()
        policy = "mixed_bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
        return policy, f"CPU with AVX-512 BF16, no AMX: bf16 measured {speedup:.2f}x float32's speed"
    return "float32", "CPU without bf16 units"


def use_xla(setting: str, on_gpu: bool) -> bool:
    """Whether to compile the train step with XLA: `auto` means on GPUs only."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"jit_compile must be auto, on or off, not {setting!r}")
    return setting == "on" or (setting == "auto" and on_gpu)


def scale_for_replicas(config: TrainConfig, replicas: int) -> TrainConfig:
    """Batch size per replica -> global batch, with the learning rate scaled by the same factor.

    With N GPUs under MirroredStrategy each replica keeps `batch_size` images per step, so the
    global batch is N times larger and the linear scaling rule multiplies the learning rate by N.
    """
    if replicas <= 1:
        return config
    return replace(config, batch_size=config.batch_size * replicas, learning_rate=config.learning_rate * replicas)


@dataclass(frozen=True)
class Replicas:
    """Where `tf.distribute` has a strategy, other backends have this: the replica count and a no-op scope
    (on JAX, `keras.distribution` splits each batch over the devices without one)."""

    num_replicas_in_sync: int  # devices that each take `batch_size` images of a step

    def scope(self):
        return contextlib.nullcontext()


def devices() -> tuple[object, str, list[tuple[int, int]]]:
    """The distribution strategy, a description of the devices, and the GPUs' compute capabilities.

    TensorFlow: `MirroredStrategy` over several GPUs. JAX: `keras.distribution.DataParallel` over
    several devices of its platform, set process-wide, with a `Replicas` standing in for the strategy.
    """
    import keras

    if keras.backend.backend() == "jax":
        _keep_jax_compilations()
        return _jax_devices()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and cpu_devices() > 1:
        return _tensorflow_cpu_devices(cpu_devices())
    capabilities = []
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process: growth was set the first time
            pass
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability", (0, 0))))
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(), f"{len(gpus)} GPUs (MirroredStrategy)", capabilities
    if gpus:
        return tf.distribute.get_strategy(), f"GPU {gpus[0].name}", capabilities
    return tf.distribute.get_strategy(), f"CPU ({os.cpu_count()} cores)", capabilities


def _tensorflow_cpu_devices(count: int):
    """`MirroredStrategy` over the CPU split into `count` logical devices (`CIFAR_PIPELINE_CPU_DEVICES`).

    The split has to happen before TensorFlow's runtime starts in this process; after that the devices
    it already has are used, and said.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:  # the runtime already started (an earlier training in this process)
        pass
    logical = [device.name for device in tf.config.list_logical_devices("CPU")]
    if len(logical) < 2:
        return tf.distribute.get_strategy(), f"CPU ({os.cpu_count()} cores)", []
    strategy = tf.distribute.MirroredStrategy(devices=logical)
    return strategy, f"{len(logical)} CPU devices (MirroredStrategy)", []


def release_devices() -> None:
    """End what `devices()` set process-wide for training: JAX's data-parallel distribution, under which
    every later prediction would have to split its batches evenly (the 20 probe images over 8 GPUs cannot)."""
    import keras

    if keras.backend.backend() == "jax":
        keras.distribution.set_distribution(None)


def _keep_jax_compilations() -> None:
    """Keep JAX's compiled programs on disk, so a later run on this machine skips compiling them.

    On the H200 a warm cache took `fit` from 21.1 s to 8.8 s (issue 13); on a 2-core CPU the ~100
    small programs of a smoke run compile in 0.15 s each, 18 s in all, so every program is kept, not
    only those over JAX's default second. JAX_COMPILATION_CACHE_DIR and JAX's other settings win.
    """
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(machine_cache_dir() / JAX_CACHE_FOLDER))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:  # without a limit JAX writes its files unlocked
        jax.config.update("jax_compilation_cache_max_size", JAX_CACHE_MAX_BYTES)
    if jax.config.jax_compilation_cache_max_size != -1:  # only a limited cache reads the access times
        repair_jax_cache(Path(jax.config.jax_compilation_cache_dir))


def repair_jax_cache(folder: Path) -> list[Path]:
    """Give each compiled program in JAX's cache that lacks its access-time file one, under JAX's own lock.

    With a size limit, JAX 0.10 reads every entry's `-atime` before each write, so one program without it (a run
    killed between its two writes, or a process that used the folder without a limit) made every later write
    fail with a warning, and the cache stopped growing (jax-ml/jax#39880, fixed after 0.10.2). A program given
    the time now is kept, and evicted in its turn like the others.

    Returns:
        The programs repaired.
    """
    from filelock import FileLock, Timeout

    if not folder.is_dir():
        return []
    repaired = []
    try:
        with FileLock(folder / ".lockfile", timeout=JAX_CACHE_LOCK_SECONDS):  # the lock JAX's LRU cache takes
            for program in folder.glob(f"*{JAX_PROGRAM_SUFFIX}"):
                stamp = program.with_name(program.name.removesuffix(JAX_PROGRAM_SUFFIX) + JAX_ATIME_SUFFIX)
                if not stamp.exists():
                    stamp.write_bytes(time.time_ns().to_bytes(8, "little"))
                    repaired.append(program)
    except Timeout:
        pass  # another run holds it for long: its writes are fine, and the next run repairs
    return repaired


def _jax_devices() -> tuple[Replicas, str, list[tuple[int, int]]]:
    import jax
    import keras

    # The default platform's devices: the GPUs where jax[cuda] finds them, else the CPU (one device,
    # or as many as CIFAR_PIPELINE_CPU_DEVICES or XLA_FLAGS=--xla_force_host_platform_device_count ask for;
    # either is read when JAX starts its CPU backend, which the first call below does).
    if cpu_devices() > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        flag = f"--xla_force_host_platform_device_count={cpu_devices()}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    local = jax.local_devices()
    gpus = [device for device in local if device.platform == "gpu"]
    capabilities = [tuple(int(part) for part in str(gpu.compute_capability).split(".")[:2]) for gpu in gpus]
    if len(local) > 1:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=local))
        many = f"{len(local)} GPUs" if gpus else f"{len(local)} CPU devices"
        return Replicas(len(local)), f"{many} (JAX, keras.distribution.DataParallel)", capabilities
    if gpus:
        return Replicas(1), f"GPU {gpus[0].device_kind} (JAX)", capabilities
    return Replicas(1), f"CPU ({os.cpu_count()} cores, JAX)", capabilities
