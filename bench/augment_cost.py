"""What the random translation costs per batch: Keras' RandomTranslation against the whole-pixel slices.

    KERAS_BACKEND=jax python bench/augment_cost.py
    KERAS_BACKEND=tensorflow python bench/augment_cost.py

Both layers take the `default` profile's settings (2 pixels, reflected borders, nearest pixel) on
batches of its size. Under JAX: `eager` is each batch through the layer as a plain call, which is how
the training batches met Keras' layer before (it is marked not compilable, so it ran outside the
step); `compiled` is the layer inside `jax.jit`, as the training step runs it now (Keras' layer only
for comparison: training never compiled it). Under TensorFlow: `tf.data` is the CPU pipeline's own
map over the batches, where both layers run as graphs. Medians of --repeats, after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def layers(config) -> dict:
    import keras

    from model_lib.preprocess import translate_factor, whole_pixel_translation

    factor = translate_factor(config)
    return {
        "keras RandomTranslation": keras.layers.RandomTranslation(
            factor, factor, fill_mode="reflect", interpolation="nearest", seed=3
        ),
        "whole-pixel slices": whole_pixel_translation(factor, seed=3),
    }


def eager(layer, batch: np.ndarray) -> float:
    started = time.perf_counter()
    np.asarray(layer(batch, training=True))  # the host batches waited for it
    return time.perf_counter() - started


def jax_compiled(layer, batch: np.ndarray, repeats: int) -> list[float]:
    import jax

    step = jax.jit(lambda state, images: layer.stateless_call([], state, images, training=True))
    state = [v.value for v in layer.non_trainable_variables]  # the seed state
    images = jax.device_put(batch)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        out, state = step(state, images)
        out.block_until_ready()
        times.append(time.perf_counter() - started)
    return times[1:]


def tf_data(layer, batch: np.ndarray, batches: int) -> float:
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensors(batch).repeat(batches).map(lambda x: layer(x, training=True))
    started = time.perf_counter()
    for _ in dataset:
        pass
    return (time.perf_counter() - started) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats: {args.repeats} times leaves nothing to time; give 1 or more")
    import keras

    from model_lib.config import resolve_config

    config = resolve_config("airbench94")
    batch = np.random.default_rng(0).integers(0, 256, (config.batch_size, 32, 32, 3)).astype(np.float32)
    backend = keras.backend.backend()
    results = {}
    for name, layer in layers(config).items():
        if backend == "jax":
            eager(layer, batch)
            results[f"{name}, eager"] = [eager(layer, batch) for _ in range(args.repeats)]
            results[f"{name}, compiled"] = jax_compiled(layer, batch, args.repeats)
        else:
            tf_data(layer, batch, 2)
            results[f"{name}, tf.data"] = [tf_data(layer, batch, 10) for _ in range(max(1, args.repeats // 5))]
    medians = {name: round(float(np.median(times)) * 1000, 2) for name, times in results.items()}
    print(json.dumps({"backend": backend, "host": platform.processor() or platform.machine(),
                      "batch": config.batch_size, "ms_per_batch": medians}))  # fmt: skip


if __name__ == "__main__":
    main()
