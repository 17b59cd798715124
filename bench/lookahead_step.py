"""What lookahead costs per training step: none, inside the optimiser (now), and the old host callback.

    KERAS_BACKEND=tensorflow python bench/lookahead_step.py --steps 30 --repeats 3
    KERAS_BACKEND=jax python bench/lookahead_step.py --steps 30 --repeats 3

The `airbench94` profile's airbench network and optimiser on fixed random batches of its batch size,
in the precision `auto` picks here; each variant compiles and warms up on 3 steps first, then
`--steps` steps are timed, `--repeats` times in turn. The callback is the one train-cifar used
before lookahead moved into the optimiser: it read the step counter every step and blended
every weight on the host every 5 steps.
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
WARM_UP_STEPS = 3  # compile and settle before the clock starts


def host_lookahead(every: int, final_decay: float, total_steps: int):
    """The callback lookahead (train-cifar before issue 13): weights read back and blended on the host."""
    import keras

    class Lookahead(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.variables = [v for v in self.model.weights if "float" in str(v.dtype)]
            self.slow = [np.array(v.numpy()) for v in self.variables]

        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if step % every == 0:
                decay = final_decay * min(1.0, step / total_steps) ** 3
                for slow, variable in zip(self.slow, self.variables, strict=True):
                    slow += (1 - decay) * (variable.numpy() - slow)
                    variable.assign(slow)

    return Lookahead()


def time_variant(
    variant: str, steps: int, precision: str, profile: str = "airbench94", width: float = 1.0, xla: bool | str = "auto"
) -> float:
    """Seconds per step of `variant` (none, optimiser, callback) over `steps` steps after a warm-up.

    Args:
        variant: "optimiser" (the profile's lookahead, in its optimiser), "none" (lookahead off) or
            "callback" (off in the optimiser, done by the old host callback instead).
        steps: Steps timed after the warm-up.
        precision: Keras dtype policy.
        profile: The profile whose network, batch size and optimiser are timed.
        width: `network_width` of the profile's network.
        xla: Keras' `jit_compile`: True, False or "auto" (XLA under JAX and on GPUs, not on TensorFlow's CPU).
    """
    from dataclasses import replace

    import keras

    from model_lib.config import resolve_config
    from model_lib.models import build_model
    from model_lib.recipe import make_optimizer

    profiled = resolve_config(profile)
    config = profiled if variant == "optimiser" else replace(profiled, lookahead_every=0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (config.batch_size, 32, 32, 3)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, config.batch_size)]
    keras.utils.set_random_seed(0)
    model = build_model(config.architecture, 10, 32, precision, images.astype(np.uint8), width=width)
    total = 1000  # the default profile's steps, for the schedule and the decay ramp (a step costs the same)
    optimizer = make_optimizer(config, total, model, precision)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", jit_compile=xla)
    callbacks = []
    if variant == "callback":
        callbacks = [host_lookahead(profiled.lookahead_every, profiled.lookahead_decay, total)]

    class Clock(keras.callbacks.Callback):  # not async-safe, so Keras runs it in line, after each step has finished
        def on_train_batch_end(self, batch, logs=None):
            if batch == WARM_UP_STEPS - 1:
                self.started = time.perf_counter()

        def on_train_end(self, logs=None):
            self.seconds = time.perf_counter() - self.started

    # One fit, warm-up included: a second fit of a model whose optimiser keeps EMA slots (lookahead's) fails
    # under JAX in Keras 3.15 (the slots' values are gone when the second fit ends).
    clock = Clock()
    x, y = np.repeat(images, WARM_UP_STEPS + steps, axis=0), np.repeat(labels, WARM_UP_STEPS + steps, axis=0)
    model.fit(x, y, batch_size=config.batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[*callbacks, clock])
    return clock.seconds / steps


def main() -> None:
    import keras

    from model_lib.precision import choose_precision, cpu_bf16_units, devices

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _, device, capabilities = devices()
    precision, _ = choose_precision("auto", capabilities, cpu_bf16_units())
    results: dict[str, list[float]] = {"none": [], "optimiser": [], "callback": []}
    for _ in range(args.repeats):
        for variant in results:
            results[variant].append(round(time_variant(variant, args.steps, precision), 4))
            keras.backend.clear_session()
    print(json.dumps({"backend": keras.backend.backend(), "device": device, "host": platform.processor() or "",
                      "precision": precision, "steps": args.steps, "seconds_per_step": results}))  # fmt: skip


if __name__ == "__main__":
    main()
